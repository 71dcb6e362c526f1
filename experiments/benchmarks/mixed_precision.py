"""Accuracy effect of bf16 compute: the same small ViT trained on scikit-learn digits in f32 and bf16.

    python experiments/benchmarks/mixed_precision.py [--steps 400] [--seeds 0,1]
        [--out experiments/benchmarks/results/mixed_precision.json]

`ModelConfig(dtype="bfloat16")`: matmuls in bf16 with float32 parameters, float32 spectral composition,
softmax and LayerNorm statistics. Model: ViT, 8x8x1 digits, 2x2 patches (16 + [CLS] = 17 tokens), width
64, 4 heads, depth 4, MLP 4x, pre-LN, spectral (sharpen) and unconstrained. Same seed, same batches, same
AdamW schedule for both dtypes; we report final train loss, test accuracy, and the step time of each
(CPU bf16 may well be slower than f32: see train_step.py for the ViT-Tiny shape).
"""

from __future__ import annotations

import argparse
import statistics
import time

import common
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxsmooth import ModelConfig, Spectrum
from jaxsmooth.data import load_digits
from jaxsmooth.nnx import ViT


def train(ds, spectral: bool, dtype: str, steps: int, seed: int, batch: int = 64) -> dict:
    mcfg = ModelConfig(
        depth=4, d_model=64, num_heads=4, mlp_ratio=4.0, dtype=dtype,
        spectrum=Spectrum("sharpen") if spectral else None,
    )  # fmt: skip
    build = lambda: ViT(mcfg, ds.num_classes, ds.image_shape, 2, rngs=nnx.Rngs(seed))
    graphdef = nnx.graphdef(nnx.eval_shape(build))
    tx = optax.adamw(
        optax.warmup_cosine_decay_schedule(0.0, 2e-3, min(20, steps // 2), max(steps, 2)), weight_decay=0.05
    )

    @jax.jit
    def init():
        params = nnx.split(build(), nnx.Param)[1].to_pure_dict()
        return {"params": params, "opt": tx.init(params)}

    step = jax.jit(common.adamw_step(common.classification_loss(graphdef), tx))

    @jax.jit
    def evaluate(params, x, y):
        logits = nnx.merge(graphdef, params)(x).astype(jnp.float32)
        return jnp.mean(jnp.argmax(logits, -1) == y), jnp.mean(
            optax.softmax_cross_entropy_with_integer_labels(logits, y)
        )

    state = init()
    rng = np.random.default_rng(seed)
    order = np.concatenate(
        [rng.permutation(len(ds.y_train)) for _ in range(steps * batch // len(ds.y_train) + 2)]
    )
    idx = order[: steps * batch].reshape(steps, batch)
    state, loss = step(state, ds.x_train[idx[0]], ds.y_train[idx[0]])  # compile
    losses, times = [float(loss)], []
    for i in range(1, steps):
        t0 = time.perf_counter()
        state, loss = step(state, ds.x_train[idx[i]], ds.y_train[idx[i]])
        losses.append(float(loss))  # blocks: per-step timing
        times.append(time.perf_counter() - t0)
    acc, test_loss = evaluate(state["params"], ds.x_test, ds.y_test)
    return {
        "final_train_loss_mean_last20": float(np.mean(losses[-20:])),
        "test_accuracy": float(acc),
        "test_loss": float(test_loss),
        "median_step_ms": 1e3 * statistics.median(times),
        "nonfinite": bool(not np.all(np.isfinite(losses))),
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    ds = load_digits()
    seeds = [int(s) for s in args.seeds.split(",")]
    table = {}
    for model in ("unconstrained", "spectral"):
        for dtype in ("float32", "bfloat16"):
            runs = [train(ds, model == "spectral", dtype, args.steps, s) for s in seeds]
            table[f"{model}/{dtype}"] = {
                "per_seed": runs,
                "test_accuracy_mean": float(np.mean([r["test_accuracy"] for r in runs])),
                "final_train_loss_mean": float(np.mean([r["final_train_loss_mean_last20"] for r in runs])),
                "median_step_ms": float(np.median([r["median_step_ms"] for r in runs])),
            }
    delta = {
        m: table[f"{m}/bfloat16"]["test_accuracy_mean"] - table[f"{m}/float32"]["test_accuracy_mean"]
        for m in ("unconstrained", "spectral")
    }
    common.emit(
        {
            "benchmark": "mixed_precision",
            "machine": common.machine(),
            "model": "ViT digits 8x8x1, patch 2 (17 tokens), width 64, 4 heads, depth 4, MLP 4x, pre-LN",
            "steps": args.steps,
            "seeds": seeds,
            "table": table,
            "bf16_minus_f32_test_accuracy": delta,
        },
        args.out,
    )


if __name__ == "__main__":
    main()
