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
"""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from jaxsmooth import checkpoint, optim, parallel, runtime
from jaxsmooth import data as data_lib
from jaxsmooth.checkpoint import Checkpoints
from jaxsmooth.config import ModelConfig
from jaxsmooth.nnx import CausalLM, ViT

# Per-layer statistics written to metrics.jsonl at stats steps (a subset of metrics.LAYER_STAT_KEYS).
LOGGED_LAYER_STATS = ("token_cosine", "hfc_lfc")
# Side length of the images of each built-in image dataset (before data.kwargs.pad_to), so a patch size
# that does not divide the image fails before any data is loaded.
_IMAGE_SIZE = {"digits": 8, "mnist": 28, "fashion_mnist": 28, "cifar10": 32, "cifar100": 32}
# Data fields that change what the model sees; resuming with different values is refused.
_DATA_IDENTITY = ("name", "kwargs", "patch_size", "seq_len")


class NonFiniteError(FloatingPointError):
    """Loss, gradients or parameters became NaN/Inf; the message names the first bad step."""


class Interrupted(KeyboardInterrupt):
    """SIGINT/SIGTERM (or `stop_after`) stopped the run after saving a checkpoint."""

    def __init__(self, signum: int | None, step: int):
        super().__init__(f"stopped at step {step} (checkpoint saved)")
        self.signum, self.step = signum, step


class IncompatibleWorkdirError(ValueError):
    """The workdir holds a run whose model or data differs from the config."""


# ---------------------------------------------------------------------------------------- config checks


def check_config(config: ml_collections.ConfigDict) -> ModelConfig:
    """Validate everything that can be checked without data; returns the typed model config.

    Raises ValueError naming the field (model fields are checked by ModelConfig / Spectrum).
    """
    for section in ("model", "data", "opt", "train"):
        if section not in config:
            raise ValueError(f"config has no '{section}' section")
    d = config.data
    positive, non_negative = (lambda v: v >= 1, "must be >= 1"), (lambda v: v >= 0, "must be >= 0")
    rules = {
        **{f"train.{k}": positive for k in ("steps", "log_every", "stats_every", "eval_every")},
        "train.checkpoint_every": positive,
        "train.max_to_keep": positive,
        "train.seed": non_negative,
        "train.num_devices": (lambda v: v >= 0, "must be >= 0 (0 = all devices)"),
        "train.eval_max_batches": (lambda v: v >= 0, "must be >= 0 (0 = the whole test split)"),
        "data.name": (lambda v: v in data_lib.DATASETS, f"is unknown; choose one of {data_lib.DATASETS}"),
        "data.batch_size": positive,
        "data.eval_batch_size": positive,
        "data.seed": non_negative,
        "data.train_fraction": (lambda v: 0 < v <= 1, "must be in (0, 1]"),
        # Text needs a context length, images a patch size (the other field may stay None).
        **({"data.seq_len": positive} if is_text(config) else {"data.patch_size": positive}),
    }
    for field, (ok, why) in rules.items():
        section, name = field.split(".")
        value = config[section][name]
        try:
            good = ok(value) and not isinstance(value, bool)
        except TypeError:  # e.g. None where a number is needed
            good = False
        if not good:
            raise ValueError(f"{field}={value!r} {why}")
    if not is_text(config):
        size = d.kwargs.get("pad_to") or _IMAGE_SIZE.get(d.name)
        if size and size % d.patch_size:
            raise ValueError(
                f"data.patch_size={d.patch_size} must divide the {size}x{size} images of {d.name}"
                + (" (after data.kwargs.pad_to)" if d.kwargs.get("pad_to") else "")
            )
    optim.make_schedule(config.opt)  # validates opt.*
    return ModelConfig.from_dict(config.model.to_dict())


def is_text(config: ml_collections.ConfigDict) -> bool:
    return config.data.name in ("shakespeare_char", "char_file")


@dataclasses.dataclass
class LoadedRun:
    """A trained model rebuilt from a run directory (see `load_run`)."""

    config: ml_collections.ConfigDict
    model_config: ModelConfig
    dataset: data_lib.Dataset  # the full dataset (test split as trained against; no train_fraction subset)
    model: nnx.Module
    step: int


def load_run(workdir: str | Path, step: int | None = None) -> LoadedRun:
    """Rebuild a run's model from DIR/config.json and restore its parameters (newest step by default).

    Read-only: a corrupt step raises `checkpoint.CheckpointError` naming the other steps; nothing is
    moved. For evaluation, audits and experiments on trained models.
    """
    workdir = Path(workdir)
    cfg_path = workdir / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{workdir} has no config.json: not a jaxsmooth run directory")
    config = ml_collections.ConfigDict(json.loads(cfg_path.read_text()))
    mcfg = ModelConfig.from_dict(config.model.to_dict())
    ds = data_lib.load(config.data.name, **config.data.kwargs.to_dict())
    abstract = nnx.eval_shape(lambda: build_model(mcfg, ds, config, nnx.Rngs(params=0)))
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    step, pure = checkpoint.restore_params(workdir, nnx.to_pure_dict(params), step)
    nnx.replace_by_pure_dict(params, pure)
    return LoadedRun(config, mcfg, ds, nnx.merge(graphdef, params, rest), step)


# ---------------------------------------------------------------------------------------- model / task


def build_model(mcfg: ModelConfig, ds: data_lib.Dataset, config, rngs: nnx.Rngs) -> nnx.Module:
    if ds.kind == "text":
        return CausalLM(mcfg, ds.vocab_size, config.data.seq_len, rngs=rngs)
    return ViT(mcfg, ds.num_classes, ds.image_shape, config.data.patch_size, rngs=rngs)


def per_example_loss(logits: jax.Array, y: jax.Array) -> jax.Array:
    """Cross-entropy per example [B] (images: logits [B, C]; text: logits [B, T, V], mean over T)."""
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)  # [B] or [B, T]
    return ce if ce.ndim == 1 else jnp.mean(ce, axis=1)


def _all_finite(tree) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(a)) for a in jax.tree.leaves(tree)]))


def make_train_step(graphdef, tx, schedule, *, dropout: bool, with_stats: bool, spectral: bool):
    """The pure train step (state, x, y) -> (state, metrics); see the module docstring."""

    def train_step(state, x, y):
        step = state["step"]
        key = jax.random.fold_in(state["rng"], step) if dropout else None

        def loss_fn(params):
            model = nnx.merge(graphdef, params)
            out = model(x, dropout_key=key, return_stats=with_stats)
            logits, aux = out if with_stats else (out, None)
            return jnp.mean(per_example_loss(logits, y)), aux

        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & _all_finite(params)
        # Remember the first bad step (1-based, like the logged steps); a later log or checkpoint stops.
        bad_step = jnp.where((state["bad_step"] < 0) & ~ok, step + 1, state["bad_step"])
        metrics = {"loss": loss, "lr": schedule(step), "grad_norm": grad_norm, "bad_step": bad_step}
        if with_stats:
            metrics["layers"] = {k: aux[k] for k in LOGGED_LAYER_STATS}  # [L] each
            metrics["input"] = {k: aux["input"][k] for k in LOGGED_LAYER_STATS}  # scalars
            # Spectra of the parameters this forward pass used (before the update).
            stack = nnx.merge(graphdef, state["params"]).transformer
            if spectral:
                lam_LxD = stack.eigenvalues()  # exact, real
                metrics["eig_min"], metrics["eig_max"] = jnp.min(lam_LxD, axis=1), jnp.max(lam_LxD, axis=1)
            else:  # unconstrained H has complex eigenvalues: XLA has no general eig; the host computes them
                metrics["h_LxDxD"] = stack.effective_h()
        new_state = dict(state, params=params, opt_state=opt_state, step=step + 1, bad_step=bad_step)
        return new_state, metrics

    return train_step


def make_eval_step(graphdef):
    """(params, x, y, n_valid) -> (sum of per-example losses, number correct) over the first n_valid rows."""

    def eval_step(params, x, y, n_valid):
        logits = nnx.merge(graphdef, params)(x)
        valid_B = jnp.arange(x.shape[0]) < n_valid
        loss_sum = jnp.sum(jnp.where(valid_B, per_example_loss(logits, y), 0.0))
        if logits.ndim == 2:
            correct = jnp.sum(jnp.where(valid_B, jnp.argmax(logits, axis=-1) == y, False))
        else:
            correct = jnp.zeros((), jnp.int32)
        return loss_sum, correct

    return eval_step


# ---------------------------------------------------------------------------------------- logging


class MetricsLog:
    """metrics.jsonl: one JSON object per line, at most one "train" and one "eval" record per step.
    Only process 0 writes."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled
        self._seen: set[tuple[str, int]] = set()  # (type, step) of the train/eval records in the file

    def truncate_after(self, step: int) -> None:
        """Keep records with step <= `step` (a resumed run re-logs the later ones identically)."""
        if not (self.enabled and self.path.exists()):
            return
        kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= step]
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        tmp.replace(self.path)
        self._seen = {(r.get("type"), r.get("step")) for r in kept}

    def write(self, record: dict) -> None:
        key = (record.get("type"), record.get("step"))
        if not self.enabled or (key[0] in ("train", "eval") and key in self._seen):
            return  # e.g. the final eval of a finished run that is rerun unchanged
        self._seen.add(key)
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def read_metrics(path: str | Path) -> list[dict]:
    """All records of a metrics.jsonl (a torn last line, from a killed writer, is skipped)."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def _host_record(step: int, m: dict, alpha: float) -> dict:
    """Device metrics of one step -> a JSON-able record (lists of floats for per-layer arrays)."""
    m = jax.device_get(m)
    rec = {"type": "train", "step": step, "loss": float(m["loss"]), "lr": float(m["lr"])}
    rec["grad_norm"] = float(m["grad_norm"])
    if "layers" in m:
        for k in LOGGED_LAYER_STATS:
            rec[k] = np.asarray(m["layers"][k], np.float64).tolist()
            rec[f"{k}_input"] = float(m["input"][k])
        if "h_LxDxD" in m:  # baseline: real parts of the complex eigenvalues, and the spectral radius
            ev_LxD = np.linalg.eigvals(np.asarray(m["h_LxDxD"], np.float64))
            m["eig_min"], m["eig_max"] = ev_LxD.real.min(axis=1), ev_LxD.real.max(axis=1)
            rec["eig_abs_max"] = np.abs(ev_LxD).max(axis=1).tolist()
        rec["eig_min"] = np.asarray(m["eig_min"], np.float64).tolist()
        rec["eig_max"] = np.asarray(m["eig_max"], np.float64).tolist()
        rec["eig_alpha"] = alpha  # eigenvalues are of H; the effective update is H / alpha (DeepNorm)
    return rec


class Progress:
    """tqdm bar with ETA on a terminal; a plain line per log step otherwise (e.g. CI, nohup, pipes)."""

    def __init__(self, start: int, total: int, enabled: bool):
        self.total, self.enabled, self.bar = total, enabled, None
        self.t0, self.step0 = 0.0, None
        if enabled and sys.stdout.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)

    def update(self, step: int) -> None:
        if self.bar is not None:
            self.bar.update(step - self.bar.n)

    def log(self, rec: dict) -> None:
        if not self.enabled:
            return
        text = f"loss {rec['loss']:.4f} lr {rec['lr']:.2e} |g| {rec['grad_norm']:.3f}"
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=False)
            return
        now = time.perf_counter()
        if self.step0 is None or rec["step"] <= self.step0:  # rate from the first log on (warm-up excluded)
            self.step0, self.t0 = rec["step"], now
        done, dt = rec["step"] - self.step0, now - self.t0
        rate = done / dt if dt > 0 else 0.0
        eta = (self.total - rec["step"]) / rate if rate > 0 else float("nan")
        print(
            f"step {rec['step']}/{self.total} {text} ({rate:.1f} steps/s, ETA {_fmt_time(eta)})", flush=True
        )

    def message(self, text: str) -> None:
        if self.enabled:
            (self.bar.write if self.bar is not None else lambda s: print(s, flush=True))(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _fmt_time(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


# ---------------------------------------------------------------------------------------- workdir


def _check_workdir_config(path: Path, config: ml_collections.ConfigDict) -> None:
    """Refuse to resume a run whose model or data identity differs from `config`."""
    if not path.exists():
        return
    old = json.loads(path.read_text())
    new = json.loads(config.to_json_best_effort())
    diffs = _diff("model", old.get("model", {}), new["model"])
    for k in _DATA_IDENTITY:
        diffs += _diff(f"data.{k}", old.get("data", {}).get(k), new["data"].get(k))
    if diffs:
        raise IncompatibleWorkdirError(
            f"{path.parent} holds a run with a different model/data config, so it cannot be resumed:\n  "
            + "\n  ".join(diffs)
            + "\nUse another --workdir, or the workdir's config.json settings."
        )


def _diff(prefix: str, a: Any, b: Any) -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) for d in _diff(f"{prefix}.{k}", a.get(k), b.get(k))]
    return [] if a == b else [f"{prefix}: workdir has {a!r}, config has {b!r}"]


@contextmanager
def _stop_signals() -> Iterator[dict]:
    """SIGINT/SIGTERM set a flag that the loop checks after each step (it then saves and stops). A second
    signal raises KeyboardInterrupt at once. Only the main thread can install handlers."""
    flag: dict = {"signum": None}

    def handler(signum, frame):
        if flag["signum"] is not None:
            raise KeyboardInterrupt
        flag["signum"] = signum

    sigs = (signal.SIGINT, signal.SIGTERM)
    try:
        previous = {s: signal.signal(s, handler) for s in sigs}
    except ValueError:  # not the main thread
        previous = {}
    try:
        yield flag
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


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


def train(
    config: ml_collections.ConfigDict, workdir: str | Path, *, stop_after: int | None = None, verbose=True
) -> dict:
    """Train (or resume) the run of `config` in `workdir`; returns the summary dict.

    stop_after: stop after this global step as if interrupted (checkpoint, then `Interrupted`): for
    tests and time-boxed jobs; the schedule still follows config.train.steps.
    Raises ValueError (bad config), data.DataNotFoundError, IncompatibleWorkdirError, NonFiniteError,
    Interrupted.
    """
    t_start = time.perf_counter()
    mcfg = check_config(config)
    workdir = Path(workdir)
    primary = jax.process_index() == 0
    say = print if (verbose and primary) else (lambda *a, **k: None)
    _check_workdir_config(workdir / "config.json", config)  # every process: all must refuse together

    run, state = _setup(config, mcfg, workdir, primary)  # mesh, data, model, compiled steps
    if primary:
        workdir.mkdir(parents=True, exist_ok=True)
    total = config.train.steps
    ckpt = Checkpoints(workdir, config.train.max_to_keep)
    try:
        abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state)
        restored = ckpt.restore_latest(abstract)
        start = 0
        if restored is not None:
            start, state = restored
            if start > total:
                raise ValueError(
                    f"train.steps={total} is below the step {start} already reached in {workdir}; "
                    "raise train.steps to continue the run"
                )
        log = MetricsLog(workdir / "metrics.jsonl", primary)
        log.truncate_after(start)  # records of steps after the checkpoint are re-logged, identically
        if primary:
            (workdir / "config.json").write_text(config.to_json_best_effort(indent=2) + "\n")
        devices = {
            "count": run.mesh.devices.size,
            "platform": jax.devices()[0].platform,
            "processes": jax.process_count(),
            "allocator": runtime.active_allocator(),
        }
        say(
            f"jaxsmooth train: {config.name} ({run.num_params:,} parameters) in {workdir}\n"
            f"  data {config.data.name}: {len(run.ds.x_train)} train / {len(run.ds.x_test)} test; "
            f"batch {config.data.batch_size} over {devices['count']} {devices['platform']} device(s), "
            f"{devices['processes']} process(es); {devices['allocator']} allocator\n"
            + (f"  resumed from step {start}\n" if start else "")
            + "".join(f"  {r}\n" for r in ckpt.reports)
        )
        for r in ckpt.reports:
            log.write({"type": "event", "step": start, "event": "corrupt_checkpoint", "detail": r})
        if start:
            log.write({"type": "event", "step": start, "event": "resumed"})

        stop_at = total if stop_after is None else min(total, stop_after)
        progress = Progress(start, total, verbose and primary)
        with _stop_signals() as signals:
            try:
                state, steps_per_sec = _loop(run, state, start, stop_at, total, ckpt, log, progress, signals)
            finally:
                progress.close()
        if stop_at < total:  # stop_after: the loop saved a checkpoint at stop_at
            raise Interrupted(None, stop_at)
        # Final evaluation on the whole test split (even if periodic evals were capped).
        ev = evaluate(run, state["params"], max_batches=0)
        log.write({"type": "eval", "step": total, **ev})
    finally:
        ckpt.close()

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
        **ev,  # test_loss, test_examples, and test_accuracy (images) or test_bpc (text)
        "final_train_loss": last_train["loss"] if last_train else None,
        "final_test_loss": ev["test_loss"],
        # Per-layer profiles at the last stats step (always the final step): [L + 1], input first.
        "token_cosine": [last_stats["token_cosine_input"], *last_stats["token_cosine"]]
        if last_stats
        else None,
        "hfc_lfc": [last_stats["hfc_lfc_input"], *last_stats["hfc_lfc"]] if last_stats else None,
        "eig_min": last_stats["eig_min"] if last_stats else None,
        "eig_max": last_stats["eig_max"] if last_stats else None,
        "num_params": run.num_params,
        "wall_time_s": time.perf_counter() - t_start,
        "steps_per_sec": steps_per_sec,
        "devices": devices,
        "config": json.loads(config.to_json_best_effort()),
    }
    if primary:
        (workdir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        from jaxsmooth.plots import plot_curves  # matplotlib only now: it takes a second to import

        plot_curves(records, workdir / "curves.png", title=f"{config.name} ({total} steps)")
    return summary


def _setup(config, mcfg: ModelConfig, workdir: Path, primary: bool):
    """Data, mesh, model, optimiser and the initial state (placed on the mesh)."""
    d, t = config.data, config.train
    # Parameter sharding (jaxsmooth.parallel.RULES); fields absent from older configs mean replicated.
    mesh = parallel.make_mesh(t.num_devices, t.get("model_parallel", 1))
    parallel.check_batch_size(d.batch_size, mesh)
    parallel.check_batch_size(d.eval_batch_size, mesh, "data.eval_batch_size")
    ds = data_lib.prepare(data_lib.load(d.name, **d.kwargs.to_dict()), d.train_fraction, d.seed)
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
        params = nnx.to_pure_dict(nnx.split(make(), nnx.Param, ...)[1])
        return {
            "params": params,
            "opt_state": tx.init(params),
            "step": jnp.zeros((), jnp.int32),
            "rng": jax.random.PRNGKey(t.seed + 1),  # base dropout key (params use t.seed)
            "bad_step": jnp.full((), -1, jnp.int32),
        }

    # Under jit: no eager per-layer ops, and the state is born on the mesh, placed as the rules say.
    shardings = parallel.state_shardings(mesh, t.get("param_sharding", "replicated"), abs_params,
                                         jax.eval_shape(init), tx)  # fmt: skip
    state = jax.jit(init, out_shardings=shardings)()

    kw = dict(dropout=mcfg.dropout > 0, spectral=mcfg.spectrum is not None)
    jitted = {
        "step": jax.jit(make_train_step(graphdef, tx, schedule, with_stats=False, **kw), donate_argnums=0,
                        out_shardings=(shardings, None)),
        "stats_step": jax.jit(make_train_step(graphdef, tx, schedule, with_stats=True, **kw),
                              donate_argnums=0, out_shardings=(shardings, None)),
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
               num_params)  # fmt: skip
    return run, state


def _put(run: _Run, *arrays: np.ndarray):
    """This process's rows of global [B, ...] arrays -> global arrays sharded over the mesh."""
    b = arrays[0].shape[0]
    rows = parallel.local_rows(run.mesh, b)
    return parallel.put_batch(run.mesh, b, *(a[rows] for a in arrays))


def evaluate(run: _Run, params, max_batches: int = 0) -> dict:
    """Test-split loss (and accuracy for images, bits per character for text)."""
    loss_sum, correct, n = 0.0, 0, 0
    for i, (x, y, n_valid) in enumerate(data_lib.eval_batches(run.ds, run.config.data.eval_batch_size,
                                                             seq_len=run.batcher.seq_len)):  # fmt: skip
        if max_batches and i >= max_batches:
            break
        ls, c = run.eval_step(params, *_put(run, x, y), jnp.int32(n_valid))
        loss_sum, correct, n = loss_sum + float(ls), correct + int(c), n + n_valid
    out = {"test_loss": loss_sum / n, "test_examples": n}
    if run.ds.kind == "text":
        out["test_bpc"] = out["test_loss"] / math.log(2)  # nats per character -> bits per character
    else:
        out["test_accuracy"] = correct / n
    return out


def _loop(run: _Run, state, start, stop_at, total, ckpt, log, progress, signals):
    """Steps start+1 .. stop_at; returns (state, steps/s measured between the first and last log)."""
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
        bad = int(jax.device_get(m["bad_step"]))
        if bad >= 0:
            raise NonFiniteError(
                f"non-finite loss, gradient or parameters at step {bad} (loss at step {step}: "
                f"{float(m['loss'])}); stopped. The last checkpoint ({_last(ckpt)}) is intact."
            )
        rec = _host_record(step, m, run.mcfg.alpha_beta[0])
        last = (step, time.perf_counter())
        first = first or last
        rec["time"] = time.time()  # wall clock (unix seconds)
        log.write(rec)
        progress.log(rec)

    def check_state(s) -> None:
        bad = int(jax.device_get(s["bad_step"]))
        if bad >= 0:
            raise NonFiniteError(
                f"non-finite loss, gradient or parameters at step {bad}; stopped before saving. "
                f"The last checkpoint ({_last(ckpt)}) is intact."
            )

    for step in range(start + 1, stop_at + 1):  # `step` = updates done once this iteration's step ran
        x, y = _put(run, *run.batcher.batch(step - 1))
        with_stats = step % t.stats_every == 0 or step == total
        state, metrics = run.steps[with_stats](state, x, y)  # dispatch step t ...
        flush()  # ... then read step t-1's metrics (if it was a log step)
        if step == 1 or step % t.log_every == 0 or step == total or with_stats:
            pending = (step, metrics)
        progress.update(step)
        stopping = signals["signum"] is not None or step == stop_at
        if step % t.eval_every == 0 and step != total:
            flush()
            check_state(state)
            ev = evaluate(run, state["params"], t.eval_max_batches)
            log.write({"type": "eval", "step": step, **ev})
            progress.message(f"step {step}: eval " + " ".join(f"{k} {v:.4g}" for k, v in ev.items()))
        if step % t.checkpoint_every == 0 or step == total or stopping:
            flush()
            check_state(state)  # never save a bad state
            if step != last_saved:
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
    steps = ckpt.steps()
    return f"step {steps[-1]}" if steps else "none saved yet"
