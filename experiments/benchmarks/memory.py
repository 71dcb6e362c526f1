"""Memory of training at depth 100 and 1000 for each remat mode (none, full, nested).

    python experiments/benchmarks/memory.py [--depths 100,1000] [--remats none,full,nested]
        [--steps 3] [--out experiments/benchmarks/results/memory.json]

Model: the DeepNorm spectral (sharpen) ViT of deep1000.py's family, width 64, 2 heads, MLP 4x,
16x16x3 images with 4x4 patches (17 tokens), batch 16. For every (depth, remat) a fresh subprocess
  - compiles d loss / d images alone and reads `memory_analysis()`: it backpropagates through every
    layer but computes no parameter gradient, so its temp size is the activation memory (what the forward
    keeps for the backward, plus scratch); d loss / d params adds the [L, ...] gradient stacks (O(L));
  - compiles the full AdamW train step (state donated) and reads temp / argument / output sizes;
  - runs `--steps` train steps and reports the process's peak RSS (ru_maxrss), which also counts
    the Python / XLA runtime (~0.4 GB) and the parameters, gradients and optimizer state.
Target: nested remat at depth 1000 uses <= 3x its own activation (temp) memory at depth 100.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

import common

MB = 2**20


def measure(depth: int, remat: str, steps: int) -> dict:
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from jaxsmooth.nnx import ViT

    mcfg = common.vit_tiny(depth, spectral=True, d_model=64, num_heads=2, residual="deepnorm", remat=remat)
    image = (16, 16, 3)
    x, y = common.batch(16, image=image)
    step, state = common.make_train_step(mcfg, image=image)

    graphdef = nnx.graphdef(
        nnx.eval_shape(lambda: ViT(mcfg, common.CLASSES, image, common.PATCH, rngs=nnx.Rngs(0)))
    )

    def loss(params, images):
        logits = nnx.merge(graphdef, params)(images)
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))

    # d loss / d images: backpropagates through every layer but computes no parameter gradient, so its
    # temp is the activation memory alone; d loss / d params adds the [L, ...] gradient stacks.
    act_mem = jax.jit(jax.grad(loss, argnums=1)).lower(state["params"], x).compile().memory_analysis()
    grad_mem = jax.jit(jax.grad(loss)).lower(state["params"], x).compile().memory_analysis()
    compiled = step.lower(state, x, y).compile()
    step_mem = compiled.memory_analysis()
    for _ in range(steps):
        state, l = compiled(state, x, y)
    l.block_until_ready()
    return {
        "activation_temp_MB": act_mem.temp_size_in_bytes / MB,
        "param_grad_temp_MB": grad_mem.temp_size_in_bytes / MB,
        "param_MB": grad_mem.argument_size_in_bytes / MB,
        "train_step_temp_MB": step_mem.temp_size_in_bytes / MB,
        "train_step_argument_MB": step_mem.argument_size_in_bytes / MB,
        "train_step_output_MB": step_mem.output_size_in_bytes / MB,
        "peak_rss_MB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "final_loss": float(l),
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--depths", default="100,1000")
    ap.add_argument("--remats", default="none,full,nested")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--out", default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        depth, remat = json.loads(args.child)
        print(json.dumps(measure(depth, remat, args.steps)))
        return

    depths = [int(d) for d in args.depths.split(",")]
    table = {}
    for remat in args.remats.split(","):
        table[remat] = {}
        for depth in depths:
            out = subprocess.run(
                [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps([depth, remat]),
                 "--steps", str(args.steps)],
                capture_output=True, text=True,
            )  # fmt: skip
            if out.returncode:
                table[remat][str(depth)] = {"error": out.stderr.strip().splitlines()[-1:]}
                continue
            table[remat][str(depth)] = r = json.loads(out.stdout.strip().splitlines()[-1])
            print(
                f"{remat:7s} depth {depth:5d}: activations {r['activation_temp_MB']:9.1f} MB, "
                f"step temp {r['train_step_temp_MB']:9.1f} MB, peak RSS {r['peak_rss_MB']:8.0f} MB",
                file=sys.stderr,
            )
    growth = {}
    if len(depths) == 2:
        lo, hi = (str(d) for d in depths)
        for remat, row in table.items():
            if "error" not in row[lo] and "error" not in row[hi]:
                growth[remat] = row[hi]["activation_temp_MB"] / row[lo]["activation_temp_MB"]
    common.emit(
        {
            "benchmark": "memory",
            "machine": common.machine(),
            "model": "DeepNorm spectral ViT, width 64, 2 heads, MLP 4x, 17 tokens, batch 16, AdamW",
            "table": table,
            f"activation_growth_{depths[-1]}_over_{depths[0]}": growth,
        },
        args.out,
    )


if __name__ == "__main__":
    main()
