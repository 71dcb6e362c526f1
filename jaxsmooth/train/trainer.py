"""The one trainer of jaxsmooth: a ViT on images or a causal LM on characters, from one config.

    jaxsmooth train --config digits:quick --workdir runs/x --config.train.steps=200
    summary = jaxsmooth.train.train(jaxsmooth.configs.load("digits:quick"), "runs/x")

`train` resolves the ConfigDict once into typed settings (jaxsmooth.train.settings), takes the workdir's
lock, and then:
  1. checks the workdir before compiling: the checkpoints' files, their configs against this one
     (jaxsmooth.train.migrate brings older ones to today's form), the free space;
  2. sets the run up (`setup`): mesh, data, model, optimiser, the initial state (state.new_state) and the
     compiled programs, in one typed RunContext;
  3. restores the newest verified checkpoint, if any, and opens the logs (metrics.jsonl, TensorBoard,
     the best-validation parameters);
  4. runs the loop (jaxsmooth.train.loop): the step plus its hooks (jaxsmooth.train.hooks);
  5. evaluates the selected parameters once (jaxsmooth.train.evaluation) and writes summary.json and the
     curves.

State, step and resume: jaxsmooth.train.state (the state dict every checkpoint holds) and
jaxsmooth.train.step (the pure train step). The dropout key of step t is fold_in(rng, t), and the batch of
step t is `Batcher.batch(t)`, so a resumed run repeats an uninterrupted one bit for bit. Non-finite loss,
gradient norm or parameters are recorded on device in `bad_step`; the hooks check it at every log step and
before every checkpoint, so a bad state is never saved and the error names the first bad step.
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

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from jaxsmooth import data as data_lib
from jaxsmooth.config import ModelConfig
from jaxsmooth.train import checkpoint, hooks, migrate, optim, parallel, runlog, runtime, tblog, watchdog
from jaxsmooth.train import workdir as wd
from jaxsmooth.train.checkpoint import Checkpoints, NoUsableCheckpointError
from jaxsmooth.train.context import RunContext
from jaxsmooth.train.evaluation import BestParams, final_evaluation
from jaxsmooth.train.loop import Interrupted, Loop, NonFiniteError
from jaxsmooth.train.runlog import read_metrics  # noqa: F401 - re-exported: train.read_metrics is used widely
from jaxsmooth.train.settings import RunSettings, check_config, resolve  # noqa: F401 - check_config: re-export
from jaxsmooth.train.state import build_model, new_state
from jaxsmooth.train.step import make_eval_step, make_train_step

__all__ = ["train", "setup", "Interrupted", "NonFiniteError", "IncompatibleWorkdirError", "RESTART_HINT"]

# What a workdir that holds a run but no usable checkpoint needs (NoUsableCheckpointError).
RESTART_HINT = (
    "To start over from step 0, rerun with --restart (train.train(..., restart=True)): the previous run's "
    "files are kept as metrics.1.jsonl, checkpoints.1/, ...; or use another --workdir."
)
# The workdir holds a run whose model, data or optimiser config differs from the config (a ValueError).
IncompatibleWorkdirError = wd.IncompatibleWorkdirError


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
      config: the run config (jaxsmooth/configs/; `jaxsmooth.configs.load`).
      workdir: the run directory (created if missing; locked for the run's life).
      stop_after: stop after this global step as if interrupted (checkpoint, then `Interrupted`): for
        tests and time-boxed jobs; the schedule still follows config.opt.decay_steps.
      verbose: print the start-up lines and progress (process 0).
      restart: start over from step 0, renaming the previous run's files (metrics.jsonl, summary.json,
        config.json, curves.png, checkpoints/) to <name>.<k>... first; nothing is deleted. Needed when the
        workdir holds a run but no usable checkpoint, or to reuse a workdir for another config.
    Returns:
      The summary (also written to workdir/summary.json).
    Raises:
      ValueError (bad config), data.DataNotFoundError, workdir.WorkdirError (the workdir cannot hold
      the run; WorkdirLockedError: another trainer uses it), IncompatibleWorkdirError,
      checkpoint.NoUsableCheckpointError, workdir.MetadataError, workdir.DiskFullError, NonFiniteError,
      Interrupted.
    """
    t_start = time.perf_counter()
    wd.check_finite(json.loads(config.to_json_best_effort()))
    settings = resolve(config)
    primary = jax.process_index() == 0
    workdir = wd.prepare_workdir(workdir)  # before compiling: a bad path fails at once
    with ExitStack() as stack:
        lock = _lock(stack, workdir, primary)
        if lock is not None and lock.took_over:
            print(lock.took_over, file=sys.stderr, flush=True)
        session = _Session(settings, workdir, primary, verbose, t_start)
        return session.train(stop_after=stop_after, restart=restart)


@dataclasses.dataclass
class _Outputs:
    """What the run writes as it goes: metrics.jsonl, TensorBoard events, the best-validation parameters."""

    log: runlog.MetricsLog
    tb: tblog.TensorBoard
    best: BestParams


@dataclasses.dataclass
class _Session:
    """One `train` call with the workdir locked: the steps of the module docstring, one method each."""

    settings: RunSettings
    workdir: Path
    primary: bool
    verbose: bool
    t_start: float

    def say(self, text: str) -> None:
        if self.verbose and self.primary:
            print(text)

    def warn(self, text: str) -> None:
        if self.primary:
            print(text, file=sys.stderr, flush=True)

    def train(self, *, stop_after: int | None, restart: bool) -> dict:
        """Steps 1-5 of the module docstring; returns the summary."""
        s = self.settings
        if restart and self.primary:
            moved = wd.archive_previous_run(self.workdir)
            if moved:
                self.warn(f"restart: starting over; the previous run's files are kept ({', '.join(moved)})")
        checkpoint.sync_processes("jaxsmooth_restart")
        ckpt = Checkpoints(
            self.workdir, s.train.max_to_keep, metadata={"config": s.config_dict, "resolved": s.resolved}
        )
        with ExitStack() as stack:
            stack.callback(ckpt.close)
            self.preflight(ckpt, restart)  # before compiling
            run, state = setup(s, self.workdir, self.primary)
            devices = self.devices(run)
            ckpt.metadata["devices"] = {k: v for k, v in devices.items() if k != "allocator"}
            start, state, notes = self.restore(ckpt, state, devices)
            out = self.open_outputs(start, stack)
            self.announce(run, out.log, ckpt, start, devices, notes)
            ev, steps_per_sec = self.fit(run, state, start, stop_after, ckpt, out)
        return self.finish(run, out, start, ev, steps_per_sec, devices)

    def preflight(self, ckpt: Checkpoints, restart: bool) -> None:
        """Verify the checkpoints' files, compare their configs with this one, check the space."""
        candidates = ckpt.inspect()
        _check_workdir_config(
            self.workdir, self.settings.resolved, ckpt
        )  # every process: all refuse together
        if not candidates and not restart:
            _refuse_silent_restart(self.workdir, ckpt)
        _check_space(self.workdir, self.settings, ckpt)

    def devices(self, run: RunContext) -> dict:
        """Where the run runs (stored with each checkpoint, reported in the summary)."""
        return {
            "count": run.mesh.devices.size,
            "platform": jax.devices()[0].platform,
            "processes": jax.process_count(),
            "allocator": runtime.active_allocator(),
            "host_cpus": len(os.sched_getaffinity(0)),  # XLA:CPU splits its work over these threads
        }

    def restore(self, ckpt: Checkpoints, state, devices: dict):
        """(start step, state, notes): the newest verified checkpoint's, else (0, the initial state, [])."""
        abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state)
        try:
            restored = ckpt.restore_latest(abstract)  # only a verified step
        except NoUsableCheckpointError as e:
            raise NoUsableCheckpointError(f"{e}. {RESTART_HINT}") from None
        if restored is None:
            return 0, state, []
        start, state = restored
        total = self.settings.train.steps
        if start > total:
            raise ValueError(
                f"train.steps={total} is below the step {start} already reached in {self.workdir}; "
                "raise train.steps to continue the run"
            )
        notes = []
        saved_devices = (ckpt.metas.get(start) or {}).get("devices")
        if saved_devices and any(saved_devices.get(k) != v for k, v in ckpt.metadata["devices"].items()):
            notes.append(
                f"note: step {start} was saved on {_devices_line(saved_devices)}; this run uses "
                f"{_devices_line(devices)}: it continues from the same state, but its losses will not be "
                "bit-identical to an uninterrupted run's (README: resuming)"
            )
        return start, state, notes

    def open_outputs(self, start: int, stack: ExitStack) -> _Outputs:
        """metrics.jsonl, TensorBoard and the best parameters, cut back to `start` (later steps are redone
        identically), and config.json."""
        t = self.settings.train
        # TensorBoard events (when tensorboardX is installed): events after the restart step are purged.
        tb = tblog.TensorBoard(
            self.workdir / "tensorboard",
            enabled=self.primary and t.tensorboard,
            purge_step=start + 1 if start else None,
        )
        stack.callback(tb.close)
        log = runlog.MetricsLog(self.workdir / "metrics.jsonl", self.primary)
        log.truncate_after(start)  # records of steps after the checkpoint are re-logged, identically
        best = BestParams(self.workdir, t.select == "best_val", self.primary)
        best.truncate_after(start)
        if self.primary:
            text = json.dumps(self.settings.config_dict, indent=2)
            wd.atomic_write_text(self.workdir / "config.json", text + "\n")
        return _Outputs(log, tb, best)

    def announce(self, run: RunContext, log, ckpt: Checkpoints, start: int, devices: dict, notes) -> None:
        """The start-up lines, and the events of this start (resumed, corrupt checkpoints, other devices)."""
        s = self.settings
        self.say(
            f"jaxsmooth train: {s.name} ({run.num_params:,} parameters) in {self.workdir}\n"
            f"  data {s.data.name}: {len(run.ds.x_train)} train / {len(run.ds.x_test)} test; "
            f"batch {s.data.batch_size} over {devices['count']} {devices['platform']} device(s), "
            f"{devices['processes']} process(es); {devices['allocator']} allocator\n"
            + (f"  resumed from step {start} (verified)\n" if start else "")
            + "".join(f"  {r}\n" for r in ckpt.reports)
        )
        for n in notes:
            self.warn(n)
            log.write({"type": "event", "step": start, "event": "resumed_on_other_devices", "detail": n})
        for r in ckpt.reports:
            log.write({"type": "event", "step": start, "event": "corrupt_checkpoint", "detail": r})
        if start:
            log.write({"type": "event", "step": start, "event": "resumed"})

    def fit(self, run: RunContext, state, start: int, stop_after, ckpt: Checkpoints, out: _Outputs):
        """The loop, then the final evaluation; returns (the evaluation dict, steps per second)."""
        t = self.settings.train
        stop_at = t.steps if stop_after is None else min(t.steps, stop_after)
        progress = runlog.Progress(start, t.steps, self.verbose and self.primary)
        # Stop signals and the step watchdog run on helper threads: they work while the main thread is
        # stuck inside XLA (jaxsmooth/train/watchdog.py). The watchdog also covers the final evaluation.
        last_ckpt = lambda: checkpoint.describe_last(ckpt.directory, ckpt.steps())
        stuck = lambda m, step: out.log.write(
            {"type": "event", "step": step or start, "event": "stuck", "detail": m}
        )
        watch = watchdog.Watchdog(t.step_timeout_s, report=stuck, last_checkpoint=last_ckpt)
        diverged, steps_per_sec = None, None
        with watchdog.StopSignals(last_ckpt) as signals, watch:
            loop = Loop(run, watch=watch, signals=signals, last_checkpoint=last_ckpt)
            logger = _add_hooks(loop, run, start, ckpt, out, progress)
            try:
                state = loop.run(state, start, stop_at)
                steps_per_sec = logger.steps_per_sec
            except NonFiniteError as e:
                if t.on_nonfinite != "record":
                    raise
                diverged = str(e)  # recorded as an outcome (depth-stability studies)
                self.warn(f"diverged: {e}")
                out.log.write({"type": "event", "step": t.steps, "event": "diverged", "detail": str(e)})
            finally:
                progress.close()
        if stop_at < t.steps and diverged is None:  # stop_after: the loop saved a checkpoint at stop_at
            raise Interrupted(None, stop_at)
        if diverged is not None:
            return {"diverged": True, "diverged_detail": diverged, "test_loss": None}, steps_per_sec
        # The final evaluation: test (clean and corrupted) once, on the selected parameters.
        with watch:
            watch.beat("the final evaluation", "evaluation")
            ev = final_evaluation(run, state, out.best)
        scalars = {k: v for k, v in ev.items() if k.endswith(("_loss", "_accuracy", "_bpc", "_examples"))}
        loop.emit({"type": "eval", "step": t.steps, "split": "final", **scalars})
        return ev, steps_per_sec

    def finish(self, run: RunContext, out: _Outputs, start: int, ev: dict, steps_per_sec, devices) -> dict:
        """summary.json and curves.png (process 0); returns the summary."""
        records = read_metrics(out.log.path) if self.primary else []
        summary = _summary(self.settings, self.workdir, run, records, start, ev)
        summary.update(wall_time_s=time.perf_counter() - self.t_start, steps_per_sec=steps_per_sec,
                       devices=devices, config=self.settings.config_dict)  # fmt: skip
        if self.primary:
            wd.atomic_write_json(self.workdir / "summary.json", summary)
            _plot(self.workdir, records, self.settings, run_tensorboard=self.settings.train.tensorboard)
        return summary


def _add_hooks(loop: Loop, run: RunContext, start: int, ckpt: Checkpoints, out: _Outputs, progress):
    """The trainer's hooks and sinks (jaxsmooth.train.hooks), in their order; returns the LogMetrics hook
    (it measures the steps per second)."""
    t = run.settings.train
    loop.add_sink(out.log.write)  # first: a record metrics.jsonl already holds goes nowhere else
    if out.tb.active:
        loop.add_sink(hooks.TensorBoardSink(out.tb))
    show = hooks.ShowProgress(progress)
    loop.add_sink(show.sink)
    loop.add_hook(hooks.Statistics(t.stats_every, t.steps))
    logger = loop.add_hook(hooks.LogMetrics(t.log_every, run.settings.model))
    loop.add_hook(show)
    selecting = out.best.enabled
    # Model selection sees the whole validation split; other periodic evaluations may be capped.
    loop.add_hook(hooks.Evaluate(t.eval_every, 0 if selecting else t.eval_max_batches, at_end=selecting,
                                 listeners=[hooks.SelectBest(out.best)] if selecting else []))  # fmt: skip
    loop.add_hook(hooks.SaveCheckpoint(ckpt, t.checkpoint_every, last_saved=start))
    return logger


def _summary(
    settings: RunSettings, workdir: Path, run: RunContext, records: list, start: int, ev: dict
) -> dict:
    """The summary's fields from the metrics records and the final evaluation (timing fields are added by
    the caller)."""
    stats = [r for r in records if r.get("type") == "train" and "token_cosine" in r]
    last_train = next((r for r in reversed(records) if r.get("type") == "train"), None)
    last = stats[-1] if stats else None
    total = settings.train.steps
    return {
        "name": settings.name,
        "workdir": str(workdir.absolute()),
        "steps": total,
        "steps_this_run": total - start,
        "resumed_from": start if start else None,
        # test_loss, test_examples, test_accuracy (images) or test_bpc (text), and with the protocol's
        # options val_* / train_* / test_corrupted / profile_init / profile_final / best_step / diverged.
        **ev,
        "diverged": ev.get("diverged", False),
        "final_train_loss": last_train["loss"] if last_train else None,
        "final_test_loss": ev["test_loss"],
        **_profiles(last, settings.model),
        "num_params": run.num_params,
    }


def _profiles(last: dict | None, mcfg: ModelConfig) -> dict:
    """Per-layer profiles at the last stats step (always the final step): [L + 1], input first; the
    spectra of H and of the effective maps (docs/theory.md), and the fraction of eigenvalues on the wrong
    side of zero for the spectrum's mode (None for modes without a side)."""
    keys = ("token_cosine", "hfc_lfc", "eig_min", "eig_max")
    if last is None:
        return {**dict.fromkeys(keys), "eff_wrong_frac": None}
    return {
        "token_cosine": [last["token_cosine_input"], *last["token_cosine"]],
        "hfc_lfc": [last["hfc_lfc_input"], *last["hfc_lfc"]],
        "eig_min": last["eig_min"],
        "eig_max": last["eig_max"],
        **{k: last.get(k) for k in ("eff_re_min", "eff_re_max", "eff_neg_frac")},
        "eff_wrong_frac": runlog.wrong_side(last, mcfg),
    }


def _plot(workdir: Path, records: list, settings: RunSettings, *, run_tensorboard: bool) -> None:
    """curves.png (rendered aside, then renamed: never a half-written file), and the same as a TensorBoard
    image."""
    from jaxsmooth.train.plots import plot_curves  # matplotlib only now: it takes a second to import

    total = settings.train.steps
    tmp = workdir / ".curves.tmp.png"
    try:
        plot_curves(records, tmp, title=f"{settings.name} ({total} steps)")
        os.replace(tmp, workdir / "curves.png")
        if run_tensorboard:  # the curves and smoothing heatmaps, as a TensorBoard image
            tb_img = tblog.TensorBoard(workdir / "tensorboard", enabled=True)
            tb_img.image("curves", workdir / "curves.png", total)
            tb_img.close()
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if wd.is_disk_full(e):
            raise wd.disk_full_error(workdir / "curves.png", e) from None
        raise


def setup(settings: RunSettings, workdir: Path, primary: bool = True) -> tuple[RunContext, dict]:
    """Data, mesh, model, optimiser, the initial state (placed on the mesh) and the compiled programs.

    Args:
      settings: the typed run config (`jaxsmooth.train.settings.resolve`).
      workdir: the run directory.
      primary: whether this process writes the run's files (process 0).
    Returns:
      (the RunContext, the initial state).
    """
    d, t = settings.data, settings.train
    mesh = parallel.make_mesh(t.num_devices, t.model_parallel)  # sharding rules: jaxsmooth.train.parallel
    parallel.check_batch_size(d.batch_size, mesh)
    parallel.check_batch_size(d.eval_batch_size, mesh, "data.eval_batch_size")
    ds, batcher = _data(d)
    make = lambda: build_model(settings.model, ds, d, nnx.Rngs(params=t.seed))
    graphdef, abs_params, abs_rest = nnx.split(nnx.eval_shape(make), nnx.Param, ...)
    if jax.tree.leaves(abs_rest):
        raise NotImplementedError("the trainer supports models whose variables are all nnx.Param")
    tx = optim.make_optimizer(settings.opt, abs_params)

    def init():
        return new_state(nnx.to_pure_dict(nnx.split(make(), nnx.Param, ...)[1]), tx, seed=t.seed)

    # Under jit: no eager per-layer ops, and the state is born on the mesh, placed as the rules say.
    shardings = parallel.state_shardings(mesh, t.param_sharding, abs_params, jax.eval_shape(init), tx)
    init_fn = jax.jit(init, out_shardings=shardings)
    state = init_fn()
    compiled = _compile(settings, graphdef, tx, shardings, state, mesh, ds, batcher)
    num_params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(abs_params))
    steps = {False: compiled["step"], True: compiled["stats_step"]}
    run = RunContext(settings, workdir, ds, batcher, mesh, graphdef, steps, compiled["eval"], primary,
                     num_params, init_fn)  # fmt: skip
    return run, state


def _data(d) -> tuple[data_lib.Dataset, data_lib.Batcher]:
    """The prepared dataset (train fraction, validation split, training corruption) and its batches."""
    loaded = data_lib.load(d.name, **d.kwargs)
    ds = data_lib.prepare(
        loaded, d.train_fraction, d.seed, val_size=d.val_size, corrupt_train=d.corrupt_train
    )
    if ds.kind == "image" and (ds.image_shape[0] % d.patch_size or ds.image_shape[1] % d.patch_size):
        raise ValueError(f"data.patch_size={d.patch_size} must divide the image shape {ds.image_shape}")
    return ds, data_lib.Batcher(ds, d.batch_size, d.seed, d.seq_len if ds.kind == "text" else None)


def _compile(settings: RunSettings, graphdef, tx, shardings, state, mesh, ds, batcher) -> dict:
    """The train step (with and without statistics) and the eval step, compiled ahead of time, the three
    programs at once: XLA releases the GIL, so on a multi-core host this overlaps most of the compile time
    (seconds per program even for a one-layer model on CPU)."""
    mcfg = settings.model
    n_out = ds.vocab_size if ds.kind == "text" else ds.num_classes
    schedule = optim.make_schedule(settings.opt)
    kw = dict(dropout=mcfg.dropout > 0 or mcfg.drop_path > 0, spectral=mcfg.spectrum is not None,
              aug=settings.augment, num_classes=n_out)  # fmt: skip
    train_step = lambda with_stats: jax.jit(
        make_train_step(graphdef, tx, schedule, with_stats=with_stats, **kw),
        donate_argnums=0,
        out_shardings=(shardings, None),
    )
    jitted = {
        "step": train_step(False),
        "stats_step": train_step(True),
        "eval": jax.jit(make_eval_step(graphdef)),
    }
    spec = lambda a, sharding: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding)
    x0, y0 = batcher.batch(0)
    xe, ye, _ = next(data_lib.eval_batches(ds, settings.data.eval_batch_size, seq_len=batcher.seq_len))
    abs_state = jax.tree.map(lambda a: spec(a, a.sharding), state)
    data_sharding = parallel.batch_sharding(mesh)
    train_args = (abs_state, spec(x0, data_sharding), spec(y0, data_sharding))
    eval_args = (abs_state["params"], spec(xe, data_sharding), spec(ye, data_sharding), jnp.int32(0))
    args = {"step": train_args, "stats_step": train_args, "eval": eval_args}
    with ThreadPoolExecutor(len(jitted)) as pool:
        futures = {k: pool.submit(lambda k=k: jitted[k].lower(*args[k]).compile()) for k in jitted}
        return {k: f.result() for k, f in futures.items()}


# ----------------------------------------------------------------------------------------- workdir


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
            old, _ = migrate.migrate_config(old)
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
            [r["step"] for r in runlog.read_metrics(metrics) if r.get("type") == "train"]
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


def _check_space(workdir: Path, settings: RunSettings, ckpt: Checkpoints) -> None:
    """Before compiling: room for the checkpoints still to be written (one more than max_to_keep exists
    while a save is in progress) and the logs."""
    if ckpt.candidates:
        per, how = wd.tree_size(ckpt.directory / str(ckpt.candidates[0])), "as large as the last"
    else:
        per, how = _estimate_checkpoint_bytes(settings.model), "at least"
    count = max(1, settings.train.max_to_keep + 1 - len(ckpt.candidates or []))
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
