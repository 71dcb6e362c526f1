"""The one trainer of jaxsmooth: a ViT on images or a causal LM on characters, from one ConfigDict.

    jaxsmooth train --config digits:quick --workdir runs/x --config.train.steps=200

Shapes: B batch, H/W/C image, T tokens, V vocabulary, L layers, D width.

State. The model is split once, `graphdef, params, rest = nnx.split(model, nnx.Param, ...)`; the train
state is a plain dict pytree
    {"params": nnx.to_pure_dict(params), "opt_state": optax state, "step": int32 (updates done),
     "rng": uint32[2] (base dropout key), "bad_step": int32 (first non-finite step, -1 if none)}
that the jitted step donates and returns, Orbax checkpoints as is, and `nnx.merge(graphdef, params)`
turns back into the model inside the step.

The step. `train_step(state, x, y)` is one pure function: forward, loss, gradients, optax update, and
metrics (loss, lr, grad_norm). A static flag `with_stats` compiles a second variant that also returns
the per-layer smoothing statistics of the *same* forward pass (the model's scan emits them as [L]
arrays) and the per-layer eigenvalue range of H = W_V W_O; it runs every `train.stats_every` steps.
The dropout key of step t is fold_in(rng, t), and the batch of step t is `Batcher.batch(t)`, so a
resumed run repeats an uninterrupted one bit for bit.

The loop dispatches step t before it reads the metrics of step t-1 (nanodo), and reads metrics only on
log steps: the host never waits for the device except to log, evaluate or checkpoint. Non-finite
loss, gradient norm or parameters are recorded on device in `bad_step`; it is checked at every log
step and before every checkpoint, so a bad state is never saved and the error names the first bad step.

Around the loop: `jaxsmooth.train.workdir` (lock, config comparison, atomic metadata),
`jaxsmooth.train.checkpoint`
(verified saves and restores), `jaxsmooth.train.runlog` (metrics.jsonl, TensorBoard, progress) and
`jaxsmooth.train.evaluation` (splits, best-validation selection, the final evaluation).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from jaxsmooth import data as data_lib
from jaxsmooth.config import ModelConfig
from jaxsmooth.data import augment
from jaxsmooth.train import checkpoint, optim, parallel, runlog, runtime, tblog, watchdog
from jaxsmooth.train import workdir as wd
from jaxsmooth.train.checkpoint import Checkpoints, NoUsableCheckpointError
from jaxsmooth.train.evaluation import BestParams, evaluate, final_evaluation, put, selection_score, setting
from jaxsmooth.train.runlog import read_metrics  # noqa: F401 - re-exported: train.read_metrics is used widely
from jaxsmooth.train.settings import check_config
from jaxsmooth.train.state import build_model, new_state
from jaxsmooth.train.step import make_eval_step, make_train_step

# What a workdir that holds a run but no usable checkpoint needs (NoUsableCheckpointError).
RESTART_HINT = (
    "To start over from step 0, rerun with --restart (train.train(..., restart=True)): the previous run's "
    "files are kept as metrics.1.jsonl, checkpoints.1/, ...; or use another --workdir."
)


class NonFiniteError(FloatingPointError):
    """Loss, gradients or parameters became NaN/Inf; the message names the first bad step."""


class Interrupted(KeyboardInterrupt):
    """SIGINT/SIGTERM (or `stop_after`) stopped the run after saving a checkpoint."""

    def __init__(self, signum: int | None, step: int):
        super().__init__(f"stopped at step {step} (checkpoint saved)")
        self.signum, self.step = signum, step


# The workdir holds a run whose model, data or optimiser config differs from the config (a ValueError).
IncompatibleWorkdirError = wd.IncompatibleWorkdirError


# ---------------------------------------------------------------------------------------- workdir


def _check_workdir_config(workdir: Path, resolved: dict, ckpt: Checkpoints) -> None:
    """Refuse to resume checkpoints made with a config whose model, data or optimiser fields differ.

    Each verified step carries the resolved config it was saved with (a step saved by an older jaxsmooth:
    DIR/config.json stands in). Every field counts except `workdir.RESUMABLE_CHANGES`. Nothing is moved.
    """
    for step in ckpt.candidates or []:
        meta = ckpt.metas.get(step)
        if meta is not None and isinstance(meta.get("resolved"), dict):
            saved, source = meta["resolved"], f"checkpoint step {step}"
        else:
            path = workdir / "config.json"
            if not path.is_file():
                raise IncompatibleWorkdirError(
                    f"checkpoint step {step} in {workdir} was saved without its config (an older jaxsmooth) "
                    f"and {path} is missing, so nothing tells whether it belongs to this config: restore "
                    "config.json, use another --workdir, or --restart"
                )
            old = wd.read_json(path, "restore it from a copy of the run, or use --restart")
            try:
                saved = wd.resolved_config(old, ModelConfig.from_dict(old["model"]))
            except (KeyError, TypeError, ValueError) as e:
                raise wd.MetadataError(f"{path} is not a valid run config ({e}); use --restart") from None
            source = f"{path} (checkpoint step {step} predates stored configs)"
        diffs = wd.config_differences(saved, resolved)
        if diffs:
            raise IncompatibleWorkdirError(
                f"{workdir} holds a run made with a different config ({source}); resuming would mix two "
                "runs:\n  "
                + "\n  ".join(diffs)
                + "\nUse the same values, another --workdir, or --restart to "
                "start over (the previous run's files are kept)."
            )


def _refuse_silent_restart(workdir: Path, ckpt: Checkpoints) -> None:
    """No checkpoint to resume from: raise NoUsableCheckpointError if the workdir holds a run's progress
    (checkpoints that all failed, checkpoints found corrupt earlier, or logged steps)."""
    reasons = []
    if ckpt.found:
        reasons.append(
            f"its checkpoints (steps {ckpt.found}) are all corrupt or unverifiable and were moved to "
            f"{ckpt.corrupt_directory}"
        )
    else:
        corrupt = sorted(ckpt.corrupt_directory.iterdir()) if ckpt.corrupt_directory.is_dir() else []
        metrics = workdir / "metrics.jsonl"
        logged = (
            [r["step"] for r in read_metrics(metrics) if r.get("type") == "train"]
            if metrics.is_file()
            else []
        )
        if logged:
            reasons.append(f"metrics.jsonl records steps up to {max(logged)}")
        if corrupt:
            reasons.append(
                f"{ckpt.corrupt_directory} holds {len(corrupt)} checkpoint(s) found corrupt before"
            )
    if reasons:
        raise NoUsableCheckpointError(
            f"{workdir} holds a run but no checkpoint to resume from ({'; '.join(reasons)}). {RESTART_HINT}"
        )


def _estimate_checkpoint_bytes(mcfg: ModelConfig) -> int:
    """A lower bound on one checkpoint's size: the layer stack's parameters and two Adam moments (float32),
    plus Orbax's files. Embeddings and head are left out (they need the data); 0 if it cannot be built."""
    from jaxsmooth.nnx import Transformer

    try:
        abstract = nnx.eval_shape(lambda: Transformer(mcfg, rngs=nnx.Rngs(0)))
        n = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    except Exception:  # noqa: BLE001 - only an estimate
        return 0
    return 3 * 4 * n + (256 << 10)


def _check_space(workdir: Path, config, mcfg: ModelConfig, ckpt: Checkpoints) -> None:
    """Before compiling: room for the checkpoints still to be written (one more than max_to_keep exists
    while a save is in progress) and the logs."""
    if ckpt.candidates:
        per, how = wd.tree_size(ckpt.directory / str(ckpt.candidates[0])), "as large as the last"
    else:
        per, how = _estimate_checkpoint_bytes(mcfg), "at least"
    count = max(1, config.train.max_to_keep + 1 - len(ckpt.candidates or []))
    wd.check_free_space(
        workdir,
        count * per + (8 << 20),
        f"{count} checkpoint(s) of {how} {per / 2**20:.2f} MiB, and the logs",
    )


def _devices_line(d: dict) -> str:
    return (
        f"{d.get('count')} {d.get('platform')} device(s), {d.get('processes')} process(es), "
        f"{d.get('host_cpus')} host CPU(s)"
    )


def _lock(stack: ExitStack, workdir: Path, primary: bool) -> wd.WorkdirLock:
    """Take the workdir's lock on process 0; every process learns whether it got it (all stop together)."""
    try:
        lock = stack.enter_context(wd.WorkdirLock(workdir, enabled=primary))
        ok = True
    except wd.WorkdirLockedError:
        if jax.process_count() == 1:
            raise
        lock, ok, error = None, False, sys.exc_info()[1]
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        ok_all = bool(multihost_utils.broadcast_one_to_all(np.int32(ok)))
        if not ok:
            raise error
        if not ok_all:
            raise wd.WorkdirLockedError(
                f"{workdir} is in use by another trainer (process 0 could not lock it)"
            )
    return lock


# ---------------------------------------------------------------------------------------- train


@dataclasses.dataclass
class _Run:
    """What the loop needs besides the state; built once by `_setup`."""

    config: Any
    workdir: Path
    mcfg: ModelConfig
    ds: data_lib.Dataset
    batcher: data_lib.Batcher
    mesh: Any
    graphdef: Any
    steps: dict  # with_stats -> jitted step
    eval_step: Any
    primary: bool
    num_params: int
    init_fn: Any = None  # jitted: the initial state (the profile at init is measured on its params)

    @property
    def eval_split(self) -> str:
        """Periodic evaluations and model selection use the validation split when there is one; the test
        split is then evaluated once, at the end."""
        return "val" if self.ds.x_val is not None else "test"


def train(
    config: ml_collections.ConfigDict,
    workdir: str | Path,
    *,
    stop_after: int | None = None,
    verbose=True,
    restart: bool = False,
) -> dict:
    """Train (or resume) the run of `config` in `workdir`; returns the summary dict.

    Args:
      config: the run config (see jaxsmooth/configs/).
      workdir: the run directory (created if missing; locked for the run's life).
      stop_after: stop after this global step as if interrupted (checkpoint, then `Interrupted`): for
        tests and time-boxed jobs; the schedule still follows config.opt.decay_steps.
      verbose: print the start-up lines and progress (process 0).
      restart: start over from step 0, renaming the previous run's files (metrics.jsonl, summary.json,
        config.json, curves.png, checkpoints/) to <name>.<k>... first; nothing is deleted. Needed when the
        workdir holds a run but no usable checkpoint, or to reuse a workdir for another config.
    Returns the summary (also written to workdir/summary.json).
    Raises ValueError (bad config), data.DataNotFoundError, workdir.WorkdirError (the workdir cannot hold
    the run; WorkdirLockedError: another trainer uses it), IncompatibleWorkdirError,
    checkpoint.NoUsableCheckpointError, workdir.MetadataError, workdir.DiskFullError, NonFiniteError,
    Interrupted.
    """
    t_start = time.perf_counter()
    wd.check_finite(json.loads(config.to_json_best_effort()))
    mcfg = check_config(config)
    primary = jax.process_index() == 0
    workdir = wd.prepare_workdir(workdir)  # before compiling: a bad path fails at once
    with ExitStack() as stack:
        lock = _lock(stack, workdir, primary)
        if lock is not None and lock.took_over:
            print(lock.took_over, file=sys.stderr, flush=True)
        return _train(config, mcfg, workdir, primary, t_start, stop_after, verbose, restart)


def _train(config, mcfg: ModelConfig, workdir: Path, primary: bool, t_start, stop_after, verbose, restart):
    """`train` with the workdir locked."""
    say = print if (verbose and primary) else (lambda *a, **k: None)
    warn = (lambda m: print(m, file=sys.stderr, flush=True)) if primary else (lambda m: None)
    if restart and primary:
        moved = wd.archive_previous_run(workdir)
        if moved:
            warn(f"restart: starting over; the previous run's files are kept ({', '.join(moved)})")
    checkpoint.sync_processes("jaxsmooth_restart")
    config_dict = json.loads(config.to_json_best_effort())
    resolved = wd.resolved_config(config_dict, mcfg)
    total = config.train.steps
    ckpt = Checkpoints(
        workdir, config.train.max_to_keep, metadata={"config": config_dict, "resolved": resolved}
    )
    try:
        # Before compiling: verify the checkpoints' files, compare configs, check the space.
        candidates = ckpt.inspect()
        _check_workdir_config(workdir, resolved, ckpt)  # every process: all must refuse together
        if not candidates and not restart:
            _refuse_silent_restart(workdir, ckpt)
        _check_space(workdir, config, mcfg, ckpt)

        run, state = _setup(config, mcfg, workdir, primary)  # mesh, data, model, compiled steps
        devices = {
            "count": run.mesh.devices.size,
            "platform": jax.devices()[0].platform,
            "processes": jax.process_count(),
            "allocator": runtime.active_allocator(),
            "host_cpus": len(os.sched_getaffinity(0)),  # XLA:CPU splits its work over these threads
        }
        ckpt.metadata["devices"] = {k: v for k, v in devices.items() if k != "allocator"}
        abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state)
        try:
            restored = ckpt.restore_latest(abstract)  # only a verified step
        except NoUsableCheckpointError as e:
            raise NoUsableCheckpointError(f"{e}. {RESTART_HINT}") from None
        start = 0
        notes = []
        if restored is not None:
            start, state = restored
            if start > total:
                raise ValueError(
                    f"train.steps={total} is below the step {start} already reached in {workdir}; "
                    "raise train.steps to continue the run"
                )
            saved_devices = (ckpt.metas.get(start) or {}).get("devices")
            if saved_devices and any(saved_devices.get(k) != v for k, v in ckpt.metadata["devices"].items()):
                notes.append(
                    f"note: step {start} was saved on {_devices_line(saved_devices)}; this run uses "
                    f"{_devices_line(devices)}: it continues from the same state, but its losses will not be "
                    "bit-identical to an uninterrupted run's (README: resuming)"
                )
        # TensorBoard events (when tensorboardX is installed): events after the restart step are purged.
        use_tb = primary and setting(config, "train.tensorboard", True)
        tb = tblog.TensorBoard(
            workdir / "tensorboard", enabled=use_tb, purge_step=start + 1 if start else None
        )
        log = runlog.MetricsLog(workdir / "metrics.jsonl", primary, tb)
        log.truncate_after(start)  # records of steps after the checkpoint are re-logged, identically
        best = BestParams(workdir, setting(config, "train.select", "last") == "best_val", primary)
        best.truncate_after(start)
        if primary:
            wd.atomic_write_text(workdir / "config.json", config.to_json_best_effort(indent=2) + "\n")
        say(
            f"jaxsmooth train: {config.name} ({run.num_params:,} parameters) in {workdir}\n"
            f"  data {config.data.name}: {len(run.ds.x_train)} train / {len(run.ds.x_test)} test; "
            f"batch {config.data.batch_size} over {devices['count']} {devices['platform']} device(s), "
            f"{devices['processes']} process(es); {devices['allocator']} allocator\n"
            + (f"  resumed from step {start} (verified)\n" if start else "")
            + "".join(f"  {r}\n" for r in ckpt.reports)
        )
        for n in notes:
            warn(n)
            log.write({"type": "event", "step": start, "event": "resumed_on_other_devices", "detail": n})
        for r in ckpt.reports:
            log.write({"type": "event", "step": start, "event": "corrupt_checkpoint", "detail": r})
        if start:
            log.write({"type": "event", "step": start, "event": "resumed"})

        stop_at = total if stop_after is None else min(total, stop_after)
        progress = runlog.Progress(start, total, verbose and primary)
        diverged = None
        # Stop signals and the step watchdog run on helper threads: they work while the main thread is
        # stuck inside XLA (jaxsmooth/watchdog.py). The watchdog also covers the final evaluation.
        last_ckpt = lambda: _last(ckpt)
        stuck = lambda m, step: log.write(
            {"type": "event", "step": step or start, "event": "stuck", "detail": m}
        )
        watch = watchdog.Watchdog(
            setting(config, "train.step_timeout_s", watchdog.AUTO), report=stuck, last_checkpoint=last_ckpt
        )
        with watchdog.StopSignals(last_ckpt) as signals, watch:
            try:
                state, steps_per_sec = _loop(
                    run, state, start, stop_at, total, ckpt, log, progress, signals, best, watch=watch
                )
            except NonFiniteError as e:
                if setting(config, "train.on_nonfinite", "stop") != "record":
                    raise
                diverged, steps_per_sec = str(e), None  # recorded as an outcome (depth-stability studies)
                warn(f"diverged: {e}")
                log.write({"type": "event", "step": total, "event": "diverged", "detail": str(e)})
            finally:
                progress.close()
        if stop_at < total and diverged is None:  # stop_after: the loop saved a checkpoint at stop_at
            raise Interrupted(None, stop_at)
        if diverged is None:
            # The final evaluation: test (clean and corrupted) once, on the selected parameters.
            with watch:
                watch.beat("the final evaluation", "evaluation")
                ev = final_evaluation(run, state, best)
            scalars = {k: v for k, v in ev.items() if k.endswith(("_loss", "_accuracy", "_bpc", "_examples"))}
            log.write({"type": "eval", "step": total, "split": "final", **scalars})
        else:
            ev = {"diverged": True, "diverged_detail": diverged, "test_loss": None}
    finally:
        ckpt.close()
        if "tb" in locals():
            tb.close()

    records = read_metrics(log.path) if primary else []
    stats = [r for r in records if r.get("type") == "train" and "token_cosine" in r]
    last_train = next((r for r in reversed(records) if r.get("type") == "train"), None)
    last_stats = stats[-1] if stats else None
    summary = {
        "name": config.name,
        "workdir": str(workdir.absolute()),
        "steps": total,
        "steps_this_run": total - start,
        "resumed_from": start if restored is not None else None,
        # test_loss, test_examples, test_accuracy (images) or test_bpc (text), and with the protocol's
        # options val_* / train_* / test_corrupted / profile_init / profile_final / best_step / diverged.
        **ev,
        "diverged": ev.get("diverged", False),
        "final_train_loss": last_train["loss"] if last_train else None,
        "final_test_loss": ev["test_loss"],
        # Per-layer profiles at the last stats step (always the final step): [L + 1], input first.
        "token_cosine": [last_stats["token_cosine_input"], *last_stats["token_cosine"]]
        if last_stats
        else None,
        "hfc_lfc": [last_stats["hfc_lfc_input"], *last_stats["hfc_lfc"]] if last_stats else None,
        "eig_min": last_stats["eig_min"] if last_stats else None,
        "eig_max": last_stats["eig_max"] if last_stats else None,
        # The effective maps' spectra per layer (docs/theory.md) and the fraction of eigenvalues on the
        # wrong side of zero for the spectrum's mode (None for modes without a side).
        **(
            {k: last_stats.get(k) for k in ("eff_re_min", "eff_re_max", "eff_neg_frac")} if last_stats else {}
        ),
        "eff_wrong_frac": runlog.wrong_side(last_stats, run.mcfg) if last_stats else None,
        "num_params": run.num_params,
        "wall_time_s": time.perf_counter() - t_start,
        "steps_per_sec": steps_per_sec,
        "devices": devices,
        "config": config_dict,
    }
    if primary:
        wd.atomic_write_json(workdir / "summary.json", summary)
        from jaxsmooth.train.plots import plot_curves  # matplotlib only now: it takes a second to import

        tmp = workdir / ".curves.tmp.png"  # rendered aside, then renamed: never a half-written curves.png
        try:
            plot_curves(records, tmp, title=f"{config.name} ({total} steps)")
            os.replace(tmp, workdir / "curves.png")
            if use_tb:  # the curves and smoothing heatmaps, as a TensorBoard image
                tb_img = tblog.TensorBoard(workdir / "tensorboard", enabled=True)
                tb_img.image("curves", workdir / "curves.png", total)
                tb_img.close()
        except OSError as e:
            tmp.unlink(missing_ok=True)
            if wd.is_disk_full(e):
                raise wd.disk_full_error(workdir / "curves.png", e) from None
            raise
    return summary


def _setup(config, mcfg: ModelConfig, workdir: Path, primary: bool):
    """Data, mesh, model, optimiser and the initial state (placed on the mesh)."""
    d, t = config.data, config.train
    # Parameter sharding (jaxsmooth.train.parallel.RULES); fields absent from older configs mean replicated.
    mesh = parallel.make_mesh(t.num_devices, t.get("model_parallel", 1))
    parallel.check_batch_size(d.batch_size, mesh)
    parallel.check_batch_size(d.eval_batch_size, mesh, "data.eval_batch_size")
    val_size, corrupt = setting(config, "data.val_size", 0), setting(config, "data.corrupt_train", None)
    loaded = data_lib.load(d.name, **d.kwargs.to_dict())
    ds = data_lib.prepare(loaded, d.train_fraction, d.seed, val_size=val_size, corrupt_train=corrupt)
    if ds.kind == "image" and (ds.image_shape[0] % d.patch_size or ds.image_shape[1] % d.patch_size):
        raise ValueError(f"data.patch_size={d.patch_size} must divide the image shape {ds.image_shape}")
    batcher = data_lib.Batcher(ds, d.batch_size, d.seed, d.seq_len if ds.kind == "text" else None)

    make = lambda: build_model(mcfg, ds, config, nnx.Rngs(params=t.seed))
    graphdef, abs_params, abs_rest = nnx.split(nnx.eval_shape(make), nnx.Param, ...)
    if jax.tree.leaves(abs_rest):
        raise NotImplementedError("the trainer supports models whose variables are all nnx.Param")
    tx = optim.make_optimizer(config.opt, abs_params)
    schedule = optim.make_schedule(config.opt)

    def init():
        return new_state(nnx.to_pure_dict(nnx.split(make(), nnx.Param, ...)[1]), tx, seed=t.seed)

    # Under jit: no eager per-layer ops, and the state is born on the mesh, placed as the rules say.
    shardings = parallel.state_shardings(mesh, t.get("param_sharding", "replicated"), abs_params,
                                         jax.eval_shape(init), tx)  # fmt: skip
    init_fn = jax.jit(init, out_shardings=shardings)
    state = init_fn()

    aug = augment.Augment.from_config(config)
    n_out = ds.vocab_size if ds.kind == "text" else ds.num_classes
    kw = dict(dropout=mcfg.dropout > 0 or mcfg.drop_path > 0, spectral=mcfg.spectrum is not None, aug=aug,
              num_classes=n_out)  # fmt: skip
    jitted = {
        "step": jax.jit(
            make_train_step(graphdef, tx, schedule, with_stats=False, **kw),
            donate_argnums=0,
            out_shardings=(shardings, None),
        ),
        "stats_step": jax.jit(
            make_train_step(graphdef, tx, schedule, with_stats=True, **kw),
            donate_argnums=0,
            out_shardings=(shardings, None),
        ),
        "eval": jax.jit(make_eval_step(graphdef)),
    }
    # Compile ahead of time, the three programs at once: XLA releases the GIL, so on a multi-core host
    # this overlaps most of the compile time (seconds per program even for a one-layer model on CPU).
    spec = lambda a, sharding: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding)
    x0, y0 = batcher.batch(0)
    xe, ye, _ = next(data_lib.eval_batches(ds, d.eval_batch_size, seq_len=batcher.seq_len))
    abs_state = jax.tree.map(lambda a: spec(a, a.sharding), state)
    data_sharding = parallel.batch_sharding(mesh)
    train_args = (abs_state, spec(x0, data_sharding), spec(y0, data_sharding))
    eval_args = (abs_state["params"], spec(xe, data_sharding), spec(ye, data_sharding), jnp.int32(0))
    args = {"step": train_args, "stats_step": train_args, "eval": eval_args}
    with ThreadPoolExecutor(len(jitted)) as pool:
        futures = {k: pool.submit(lambda k=k: jitted[k].lower(*args[k]).compile()) for k in jitted}
        compiled = {k: f.result() for k, f in futures.items()}
    steps = {False: compiled["step"], True: compiled["stats_step"]}
    num_params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(abs_params))
    run = _Run(config, workdir, mcfg, ds, batcher, mesh, graphdef, steps, compiled["eval"], primary,
               num_params, init_fn)  # fmt: skip
    return run, state


def _loop(run: _Run, state, start, stop_at, total, ckpt, log, progress, signals, best: BestParams, *, watch):
    """Steps start+1 .. stop_at; returns (state, steps/s measured between the first and last log).
    `watch` (a watchdog.Watchdog) is told whenever a step, an evaluation or a checkpoint starts."""
    t = run.config.train
    pending: tuple[int, dict] | None = None  # (step, device metrics) dispatched but not yet logged
    first = last = None  # (step, time) of the first / last log: steps/s leaves out compilation
    last_saved = start

    def flush():
        """Read and log the pending metrics (the only place the loop waits for the device)."""
        nonlocal pending, first, last
        if pending is None:
            return
        step, m = pending
        pending = None
        watch.waiting_for(f"step {step}", step)  # steps are dispatched ahead: name the one waited for
        bad = int(jax.device_get(m["bad_step"]))
        if bad >= 0:
            raise NonFiniteError(
                f"non-finite loss, gradient or parameters at step {bad} (loss at step {step}: "
                f"{float(m['loss'])}); stopped. {_last(ckpt)}"
            )
        rec = runlog.host_record(step, m, run.mcfg.alpha_beta[0], run.mcfg.residual, run.mcfg.value_norm)
        last = (step, time.perf_counter())
        first = first or last
        rec["time"] = time.time()  # wall clock (unix seconds)
        log.write(rec)
        progress.log(rec)

    def check_state(s) -> None:
        bad = int(jax.device_get(s["bad_step"]))
        if bad >= 0:
            raise NonFiniteError(
                f"non-finite loss, gradient or parameters at step {bad}; stopped before saving. {_last(ckpt)}"
            )

    for step in range(start + 1, stop_at + 1):  # `step` = updates done once this iteration's step ran
        watch.beat(f"step {step}", step=step)
        x, y = put(run, *run.batcher.batch(step - 1))
        with_stats = step % t.stats_every == 0 or step == total
        state, metrics = run.steps[with_stats](state, x, y)  # dispatch step t ...
        flush()  # ... then read step t-1's metrics (if it was a log step)
        if step == 1 or step % t.log_every == 0 or step == total or with_stats:
            pending = (step, metrics)
        progress.update(step)
        stopping = signals["signum"] is not None or step == stop_at
        if step % t.eval_every == 0 or (step == total and best.enabled):
            flush()
            check_state(state)
            watch.beat(f"the evaluation at step {step}", "evaluation", step)
            split = run.eval_split
            # Model selection sees the whole validation split; other periodic evals may be capped.
            ev = evaluate(run, state["params"], 0 if best.enabled else t.eval_max_batches, split=split)
            log.write({"type": "eval", "step": step, "split": split, **ev})
            best.offer(step, selection_score(ev, split), state["params"])
            progress.message(f"step {step}: eval " + " ".join(f"{k} {v:.4g}" for k, v in ev.items()))
        if step % t.checkpoint_every == 0 or step == total or stopping:
            flush()
            check_state(state)  # never save a bad state
            if step != last_saved:
                watch.beat(f"the checkpoint at step {step}", "checkpoint", step)
                ckpt.save(step, state)
                last_saved = step
        if signals["signum"] is not None:
            flush()
            raise Interrupted(signals["signum"], step)
    flush()
    check_state(state)
    rate = (last[0] - first[0]) / (last[1] - first[1]) if first and last[0] > first[0] else None
    return state, rate


def _last(ckpt: Checkpoints) -> str:
    """A true sentence about the newest checkpoint, checked now (for the messages of a stopped run)."""
    return checkpoint.describe_last(ckpt.directory, ckpt.steps())
