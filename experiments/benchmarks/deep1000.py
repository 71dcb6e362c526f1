"""A 1000-layer DeepNorm spectral ViT trains on this CPU: scikit-learn digits, >= 100 AdamW steps.

    python experiments/benchmarks/deep1000.py [--depth 1000] [--steps 120] [--width 32]
        [--remat nested] [--out experiments/benchmarks/results/deep1000.json]

Model: 8x8x1 digits cut into 4x4 patches (4 tokens), a linear patch embedding plus learned positions,
the jaxsmooth `Transformer` (width 32, 2 heads, MLP 2x, DeepNorm residual: alpha = (2N)^1/4 = 6.69,
beta = (8N)^-1/4 = 0.106 at N = 1000, sharpen spectrum: eigenvalues of H / alpha in [-1, 0), nested
remat), mean pooling over tokens and a linear head. (Mean pooling, not the ViT's [CLS] token: at init a
1000-layer DeepNorm stack is close to the identity on each token, so a [CLS] token, which starts input-
independent, learns nothing for hundreds of steps, while the pooled tokens carry the image from step 0.)
Our own minimal jitted loop (optax AdamW with a short warmup, donated state, batches drawn by a seeded
permutation), so it does not depend on the trainer. Reports wall time (init, compile, training),
losses (first, last, and means of the first and last 10 steps), test accuracy before and after, and
whether any loss was non-finite.
"""

from __future__ import annotations

import argparse
import time

import common
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxsmooth import ModelConfig, Spectrum
from jaxsmooth.data import load_digits
from jaxsmooth.nnx import Transformer


class PooledClassifier(nnx.Module):
    """Patches -> linear embedding + positions -> Transformer -> mean over tokens -> linear head."""

    def __init__(self, mcfg: ModelConfig, image_shape, patch: int, classes: int, *, rngs: nnx.Rngs):
        h, w, c = image_shape
        self.patch, self.n = patch, (h // patch) * (w // patch)
        d = mcfg.d_model
        self.embed_w = nnx.Param(jax.nn.initializers.lecun_normal()(rngs.params(), (patch * patch * c, d)))
        self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (1, self.n, d)))
        self.transformer = Transformer(mcfg, rngs=rngs)
        self.head_w = nnx.Param(jnp.zeros((d, classes)))
        self.head_b = nnx.Param(jnp.zeros((classes,)))

    def __call__(self, x_BxHxWxC):
        b, h, w, c = x_BxHxWxC.shape
        p = self.patch
        x = x_BxHxWxC.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, self.n, -1)
        y_BxTxD = self.transformer(x @ self.embed_w[...] + self.pos[...])
        return jnp.mean(y_BxTxD, axis=1).astype(jnp.float32) @ self.head_w[...] + self.head_b[...]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--depth", type=int, default=1000)
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--remat", default="nested")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    ds = load_digits()
    mcfg = ModelConfig(
        depth=args.depth, d_model=args.width, num_heads=2, mlp_ratio=2.0, spectrum=Spectrum("sharpen"),
        residual="deepnorm", remat=args.remat,
    )  # fmt: skip
    build = lambda: PooledClassifier(mcfg, ds.image_shape, 4, ds.num_classes, rngs=nnx.Rngs(0))
    graphdef = nnx.graphdef(nnx.eval_shape(build))
    tx = optax.adamw(optax.linear_schedule(0.0, args.lr, 10), weight_decay=0.0)

    t0 = time.perf_counter()

    @jax.jit
    def init():
        params = nnx.split(build(), nnx.Param)[1].to_pure_dict()
        return {"params": params, "opt": tx.init(params)}

    state = jax.block_until_ready(init())
    t_init = time.perf_counter() - t0

    step = common.adamw_step(common.classification_loss(graphdef), tx)

    @jax.jit
    def accuracy(params, x, y):
        return jnp.mean(jnp.argmax(nnx.merge(graphdef, params)(x), -1) == y)

    rng = np.random.default_rng(0)
    order = np.concatenate(
        [rng.permutation(len(ds.y_train)) for _ in range(args.steps * args.batch // 1000 + 2)]
    )
    batches = order[: args.steps * args.batch].reshape(args.steps, args.batch)
    t0 = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=0).lower(state, ds.x_train[:1].repeat(args.batch, 0),
                                                     ds.y_train[: args.batch]).compile()  # fmt: skip
    t_compile = time.perf_counter() - t0
    acc0 = float(accuracy(state["params"], ds.x_test, ds.y_test))

    losses = []
    t0 = time.perf_counter()
    for i in range(args.steps):  # dispatch step i, read step i-1's loss (the host never waits twice)
        state, loss = compiled(state, ds.x_train[batches[i]], ds.y_train[batches[i]])
        losses.append(loss)
    losses = [float(v) for v in jax.block_until_ready(losses)]
    t_train = time.perf_counter() - t0
    acc1 = float(accuracy(state["params"], ds.x_test, ds.y_test))

    common.emit(
        {
            "benchmark": "deep1000",
            "machine": common.machine(),
            "model": f"digits, 4x4 patches (4 tokens), depth {args.depth}, width {args.width}, 2 heads, "
            f"MLP 2x, DeepNorm, sharpen spectrum, remat {args.remat}, mean-pooled head",
            "alpha_beta": mcfg.alpha_beta,
            "batch": args.batch,
            "steps": args.steps,
            "init_s": t_init,
            "compile_s": t_compile,
            "train_s": t_train,
            "s_per_step": t_train / args.steps,
            "loss_first": losses[0],
            "loss_last": losses[-1],
            "loss_mean_first10": float(np.mean(losses[:10])),
            "loss_mean_last10": float(np.mean(losses[-10:])),
            "loss_fell": bool(np.mean(losses[-10:]) < np.mean(losses[:10])),
            "any_nonfinite": bool(not np.all(np.isfinite(losses))),
            "test_accuracy_before": acc0,
            "test_accuracy_after": acc1,
            "losses_every_10": losses[::10],
        },
        args.out,
    )


if __name__ == "__main__":
    main()
