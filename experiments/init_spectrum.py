"""Does a deep stack start collapsed? Token cosine per layer and W_Q gradients at init, per initial spectrum.

A smooth stack whose eigenvalues start uniform over (0, 1] pushes every layer's update towards the DC
(all-tokens-equal) mode, so at depth 24 its tokens are nearly parallel before training, and the attention
(W_Q) gradients of deep layers vanish: a comparison with the baseline would then measure the init. This
script builds the same pre-LN ViT (digits, 8x8 images, patch 2 -> 17 tokens, width 64, 4 heads, depth 24)
with each initial spectrum (`Spectrum.init`, `Spectrum.init_scale`) and reports, averaged over seeds:
  - the mean pairwise token cosine after layers 1, 6, 12 and 24 (evaluation mode, 256 test images);
  - ||dL/dW_Q||_F at those layers for the cross-entropy of a random head (N(0, 1/D): the trained model's
    head is zero at init, which would make every gradient 0), and its ratio to the baseline's.

    python experiments/init_spectrum.py --json experiments/results/init_spectrum.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import jaxsmooth
from jaxsmooth import data as data_lib
from jaxsmooth.nnx import ViT

LAYERS = (1, 6, 12, 24)
# (label, spectrum kwargs or None for the unconstrained baseline)
OPTIONS = [
    ("baseline", None),
    ("smooth uniform x1", dict(mode="smooth", init="uniform", init_scale=1.0)),
    ("smooth matched x1", dict(mode="smooth", init="matched", init_scale=1.0)),
    ("smooth matched x0.5", dict(mode="smooth", init="matched", init_scale=0.5)),
    ("smooth matched x0.25", dict(mode="smooth", init="matched", init_scale=0.25)),
    ("sharpen uniform x1", dict(mode="sharpen", init="uniform", init_scale=1.0)),
    ("sharpen matched x1", dict(mode="sharpen", init="matched", init_scale=1.0)),
    ("sharpen matched x0.5", dict(mode="sharpen", init="matched", init_scale=0.5)),
    ("neutral matched x1", dict(mode="neutral", init="matched", init_scale=1.0)),
]


def measure(spectrum_kw: dict | None, seed: int, depth: int, x, y) -> dict:
    spectrum = None if spectrum_kw is None else jaxsmooth.Spectrum(**spectrum_kw)
    cfg = jaxsmooth.ModelConfig(depth=depth, d_model=64, num_heads=4, mlp_ratio=2.0, spectrum=spectrum)
    model = ViT(cfg, 10, (8, 8, 1), 2, rngs=nnx.Rngs(seed))
    model.head_w[...] = jax.random.normal(jax.random.key(1000 + seed), model.head_w[...].shape) / 8.0
    graphdef, params = nnx.split(model, nnx.Param)

    @jax.jit
    def run(params):
        def loss(p):
            out = nnx.merge(graphdef, p).forward(x, stats="logged")
            return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(out.logits, y)), out.stats

        (_, aux), grads = jax.value_and_grad(loss, has_aux=True)(params)
        g_q = grads["transformer"]["blocks"]["attn"]["w_q"].get_value()  # [L, D, D]
        return aux["token_cosine"], jnp.sqrt(jnp.sum(jnp.square(g_q), axis=(1, 2)))

    cos_L, gq_L = (np.asarray(a, np.float64) for a in run(params))
    return {"cos": [float(cos_L[i - 1]) for i in LAYERS], "grad_wq": [float(gq_L[i - 1]) for i in LAYERS]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--depth", type=int, default=24)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    ds = data_lib.load("digits")
    x, y = jnp.asarray(ds.x_test[:256]), jnp.asarray(ds.y_test[:256])
    rows = {}
    for label, kw in OPTIONS:
        runs = [measure(kw, s, args.depth, x, y) for s in range(args.seeds)]
        rows[label] = {k: np.mean([r[k] for r in runs], axis=0).tolist() for k in ("cos", "grad_wq")}
    base = np.asarray(rows["baseline"]["grad_wq"])
    head = " ".join(f"L{i:<3d}" for i in LAYERS)
    print(f"{'option':24s} token cosine {head}   |dW_Q| / baseline's {head}")
    for label, r in rows.items():
        r["grad_wq_ratio"] = (np.asarray(r["grad_wq"]) / base).tolist()
        cos = " ".join(f"{c:5.2f}" for c in r["cos"])
        ratio = " ".join(f"{v:5.2f}" for v in r["grad_wq_ratio"])
        print(f"{label:24s}              {cos}                      {ratio}")
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        cmd = "python experiments/init_spectrum.py " + " ".join(sys.argv[1:] if argv is None else argv)
        path.write_text(json.dumps({"command": cmd, "layers": LAYERS, "seeds": args.seeds,
                                    "depth": args.depth, "results": rows}, indent=1) + "\n")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
