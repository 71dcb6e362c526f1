"""Evaluation of a run: a split's loss and accuracy (or bits per character), the best-validation
selection kept in the workdir, and the final evaluation the summary reports (test once, clean and
corrupted, on the selected parameters; validation and training splits; per-layer profiles; LN-gain signs).

`run` is the trainer's `jaxsmooth.train.context.RunContext` (typed settings, dataset, batcher, mesh,
graphdef, the compiled eval step, init_fn).
"""

from __future__ import annotations

import functools
import math
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxsmooth import data as data_lib
from jaxsmooth.train import workdir as wd
from jaxsmooth.train.context import RunContext


def evaluate(
    run: RunContext,
    params,
    max_batches: int = 0,
    *,
    split: str = "test",
    ds: data_lib.Dataset | None = None,
    max_examples: int = 0,
) -> dict:
    """A split's loss (and accuracy for images, bits per character for text), keys prefixed by the split
    ("test_loss", "val_accuracy", ...). ds: another dataset to take the split from (a corrupted test set)."""
    loss_sum, correct, n = 0.0, 0, 0
    batch_size, seq_len = run.settings.data.eval_batch_size, run.batcher.seq_len
    batches = data_lib.eval_batches(ds or run.ds, batch_size, seq_len, split=split, max_examples=max_examples)
    for i, (x, y, n_valid) in enumerate(batches):
        if max_batches and i >= max_batches:
            break
        ls, c = run.eval_step(params, *run.put(x, y), jnp.int32(n_valid))
        loss_sum, correct, n = loss_sum + float(ls), correct + int(c), n + n_valid
    out = {f"{split}_loss": loss_sum / n, f"{split}_examples": n}
    if run.ds.kind == "text":
        out[f"{split}_bpc"] = out[f"{split}_loss"] / math.log(2)  # nats per character -> bits per character
    else:
        out[f"{split}_accuracy"] = correct / n
    return out


def selection_score(ev: dict, split: str) -> float:
    """Higher is better: accuracy for images, minus the loss for text."""
    acc = ev.get(f"{split}_accuracy")
    return acc if acc is not None else -ev[f"{split}_loss"]


class BestParams:
    """train.select=best_val: the parameters of the best validation evaluation so far, kept in the workdir
    (best/params.npz + best/best.json, written atomically), so a resumed run keeps selecting correctly."""

    def __init__(self, workdir: Path, enabled: bool, primary: bool):
        self.dir, self.enabled, self.primary = workdir / "best", enabled, primary
        self.step, self.score = None, -math.inf
        if enabled and (self.dir / "best.json").is_file():
            info = wd.read_json(self.dir / "best.json")
            self.step, self.score = info["step"], info["score"]

    def truncate_after(self, step: int) -> None:
        """Forget a best found after `step` (a resumed run re-evaluates those steps identically)."""
        if self.step is not None and self.step > step:
            self.step, self.score = None, -math.inf

    def offer(self, step: int, score: float, params) -> None:
        if not self.enabled or score <= self.score:
            return
        self.step, self.score = step, score
        if self.primary:
            flat = {
                jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(params)
            }
            self.dir.mkdir(exist_ok=True)
            tmp = self.dir / f"params.{os.getpid()}.tmp.npz"
            np.savez(tmp, **flat)
            os.replace(tmp, self.dir / "params.npz")
            wd.atomic_write_json(self.dir / "best.json", {"step": step, "score": score})

    def load(self, like):
        """The saved parameters, shaped like `like` (the current parameters)."""
        with np.load(self.dir / "params.npz") as f:
            leaves = [f[jax.tree_util.keystr(k)] for k, _ in jax.tree_util.tree_leaves_with_path(like)]
        return jax.tree.unflatten(jax.tree.structure(like), [jnp.asarray(a) for a in leaves])


def final_evaluation(run: RunContext, state, best: BestParams) -> dict:
    """What the summary reports once training is done: the test split (clean and corrupted) on the
    selected parameters, the validation and training splits, per-layer profiles and LN-gain signs."""
    t, params = run.settings.train, state["params"]
    out: dict[str, Any] = {"select": "last", "best_step": None}
    if run.ds.x_val is not None:
        out.update(evaluate(run, params, split="val"))
    if best.enabled and best.step is not None:
        params = best.load(params)
        out.update({"select": "best_val", "best_step": best.step})
        out.update(evaluate(run, params, split="val"))  # of the selected parameters
    max_test = t.test_max_examples
    out.update(evaluate(run, params, split="test", max_examples=max_test))
    corrupted = {}
    for name, severity in data_lib.parse_corruptions(run.settings.data.eval_corruptions):
        ds_c = data_lib.corrupted_test(run.ds, name, severity, max_test)
        corrupted[f"{name}:{severity}"] = evaluate(run, params, split="test", ds=ds_c)["test_accuracy"]
    if corrupted:
        out["test_corrupted"] = corrupted
    n_train = t.train_eval_size
    if n_train:
        out.update(evaluate(run, params, split="train", max_examples=n_train))
    if t.profile:
        out["profile_init"] = profile(run, run.init_fn()["params"])
        out["profile_final"] = profile(run, params)
    model = nnx.merge(run.graphdef, params)
    gains_LxTwoxD = np.asarray(model.transformer.ln_gains(), np.float64)
    out["ln_gain_neg_frac"] = np.mean(gains_LxTwoxD < 0, axis=2).round(4).tolist()  # [L, (ln1, ln2)]
    return out


def profile(run: RunContext, params) -> dict:
    """Per-layer smoothing of held-out data in evaluation mode: every `metrics.FULL_LAYER_STAT_KEYS`
    statistic ([L + 1], the stack's input first) on one batch of the validation split (else the test
    split)."""
    batches = data_lib.eval_batches(
        run.ds, run.settings.data.eval_batch_size, seq_len=run.batcher.seq_len, split=run.eval_split
    )
    x, _, n = next(batches)
    stats = _profile_fn(run.graphdef)(params, jnp.asarray(x[:n]))
    return {
        k: [float(v_in), *np.asarray(v_L, np.float64).round(6).tolist()] for k, (v_in, v_L) in stats.items()
    }


@functools.cache
def _profile_fn(graphdef):
    @jax.jit
    def fn(params, x):
        model = nnx.merge(graphdef, params)
        stats = model.forward(x, stats="full", deterministic=True).stats
        return {k: (stats["input"][k], stats[k]) for k in stats["input"]}

    return fn
