"""Shared pieces of the benchmarks: the ViT-Tiny-shaped jaxsmooth train step, its PyTorch peer, timing.

Shapes: B batch, T tokens (64 patches + [CLS] = 65), D width, M MLP width, L layers.
Scripts in this folder import this file as a sibling module (`python experiments/benchmarks/x.py`).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxsmooth import ModelConfig, Spectrum
from jaxsmooth.nnx import ViT

IMAGE = (32, 32, 3)
PATCH = 4
CLASSES = 10
SHARPEN = Spectrum("sharpen")  # the paper's "ViT-Ti minus": V = Q of QR(theta), lambda in [-1, 0)


def vit_tiny(depth: int = 12, *, spectral: bool = False, **kw) -> ModelConfig:
    """ViT-Tiny shape: width 192, 3 heads, MLP 4x, pre-LN."""
    base = dict(depth=depth, d_model=192, num_heads=3, mlp_ratio=4.0, residual="pre_ln")
    return ModelConfig(**{**base, **kw, "spectrum": SHARPEN if spectral else None})


def make_train_step(mcfg: ModelConfig, *, image=IMAGE, patch=PATCH, classes=CLASSES, lr=1e-3, init_jit=True):
    """(step, state): one jitted AdamW + cross-entropy step on a jaxsmooth ViT, state donated.

    The state is {"params": pure dict, "opt": optax state}, the layout the trainer uses.
    """

    def build():
        return ViT(mcfg, classes, image, patch, rngs=nnx.Rngs(0))

    abstract = nnx.eval_shape(build)
    graphdef, _ = nnx.split(abstract, nnx.Param)
    tx = optax.adamw(lr, weight_decay=0.05)

    def init():
        params = nnx.split(build(), nnx.Param)[1].to_pure_dict()
        return {"params": params, "opt": tx.init(params)}

    state = jax.jit(init)() if init_jit else init()

    step = adamw_step(classification_loss(graphdef), tx)
    return jax.jit(step, donate_argnums=0), state


def classification_loss(graphdef):
    """loss(params, images, labels): mean softmax cross-entropy of the model (float32 logits)."""

    def loss_fn(params, x_BxHxWxC, y_B):
        logits = nnx.merge(graphdef, params)(x_BxHxWxC).astype(jnp.float32)
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y_B))

    return loss_fn


def adamw_step(loss_fn, tx):
    """step(state, *batch) -> (state, loss): one optimiser step on {"params", "opt"} (not jitted)."""

    def step(state, *batch):
        loss, grads = jax.value_and_grad(loss_fn)(state["params"], *batch)
        updates, opt = tx.update(grads, state["opt"], state["params"])
        return {"params": optax.apply_updates(state["params"], updates), "opt": opt}, loss

    return step


def batch(b: int, *, image=IMAGE, classes=CLASSES, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((b, *image), dtype=np.float32)
    y = rng.integers(0, classes, (b,), dtype=np.int32)
    return x, y


def hand_flops(
    depth: int, b: int, t: int, d: int, m: int, *, classes: int = CLASSES, patch_in: int = 48
) -> dict:
    """Matmul FLOPs of one train step (2 per multiply-add; backward = 2x forward), by hand.

    Per layer forward: Q, K, V, O projections 4 * 2BTD^2; MLP 2 * 2BTDM; QK^T and AV 2 * 2BT^2D.
    Plus patch embedding 2B(T-1)*48*D and the head 2BD*classes. Elementwise work is not counted.
    """
    layer = 8 * b * t * d * d + 4 * b * t * d * m + 4 * b * t * t * d
    fwd = depth * layer + 2 * b * (t - 1) * patch_in * d + 2 * b * d * classes
    return {"forward": fwd, "train_step": 3 * fwd}


def time_fn(fn, n: int) -> list[float]:
    """Wall seconds of n calls of fn() (fn must block until its result is ready)."""
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def matmul_gflops(n: int = 1024, reps: int = 20) -> dict:
    """Sustained GFLOP/s of an n x n float32 matmul in XLA (jax) and in torch (if importable)."""
    a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n), dtype=np.float32))
    mm = jax.jit(lambda a: a @ a)
    mm(a).block_until_ready()
    t = statistics.median(time_fn(lambda: mm(a).block_until_ready(), reps))
    res = {"n": n, "jax_gflops": 2 * n**3 / t / 1e9}
    try:
        import torch

        ta = torch.from_numpy(np.array(a))  # a writable copy
        torch.mm(ta, ta)
        t = statistics.median(time_fn(lambda: torch.mm(ta, ta), reps))
        res["torch_gflops"] = 2 * n**3 / t / 1e9
    except ImportError:
        pass
    return res


def machine() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jax_devices": [str(d) for d in jax.devices()],
        "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
        "loadavg": os.getloadavg(),
    }
    try:
        import torch

        info["torch"] = torch.__version__
    except ImportError:
        pass
    return info


def emit(result: dict, out: str | None) -> None:
    """Print the JSON result to stdout and optionally write it to `out`."""
    text = json.dumps(result, indent=2, default=float)
    print(text)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text + "\n")
    sys.stdout.flush()
