"""Lower + compile time of the jaxsmooth train step at depth 12, 100 and 1000.

    python experiments/benchmarks/compile_time.py [--depths 12,100,1000] [--repeats 2]
        [--out experiments/benchmarks/results/compile_time.json]

Every measurement runs in a fresh subprocess (no warm tracing or compilation caches; the persistent
compilation cache is off by default), after one throw-away compile of a tiny function so LLVM start-up is
not billed to the first model. The model is small (width 64, 2 heads, 16x16x3 images, 4x4 patches: 17
tokens, batch 8) so depth 1000 fits easily; compile time depends on the program's shape, not its sizes.
Configs: unconstrained pre-LN, and spectral (sharpen) DeepNorm, each with remat none and nested.
Target: depth 1000 <= 1.5 x depth 12. We report the median over `repeats` subprocesses.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

import common

CONFIGS = {
    "unconstrained/none": dict(spectral=False, residual="pre_ln", remat="none"),
    "unconstrained/nested": dict(spectral=False, residual="pre_ln", remat="nested"),
    "spectral_deepnorm/none": dict(spectral=True, residual="deepnorm", remat="none"),
    "spectral_deepnorm/nested": dict(spectral=True, residual="deepnorm", remat="nested"),
}


def measure(depth: int, cfg: dict) -> dict:
    """Runs in the child: trace/lower and compile times of one train step (seconds)."""
    import time

    import jax
    import jax.numpy as jnp

    jax.jit(lambda a: a + 1).lower(jnp.ones(3)).compile()  # LLVM / backend start-up, not billed
    kw = dict(cfg)
    spectral = kw.pop("spectral")
    mcfg = common.vit_tiny(depth, spectral=spectral, d_model=64, num_heads=2, **kw)
    t0 = time.perf_counter()
    step, state = common.make_train_step(mcfg, image=(16, 16, 3))
    t_init = time.perf_counter() - t0
    x, y = common.batch(8, image=(16, 16, 3))
    t0 = time.perf_counter()
    lowered = step.lower(state, x, y)
    t_lower = time.perf_counter() - t0
    t0 = time.perf_counter()
    compiled = lowered.compile()
    t_compile = time.perf_counter() - t0
    return {
        "init_s": t_init,
        "lower_s": t_lower,
        "compile_s": t_compile,
        "lower_plus_compile_s": t_lower + t_compile,
        "hlo_lines": len(compiled.as_text().splitlines()),
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--depths", default="12,100,1000")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:  # one measurement, printed as JSON for the parent
        depth, name = json.loads(args.child)
        print(json.dumps(measure(depth, CONFIGS[name])))
        return

    depths = [int(d) for d in args.depths.split(",")]
    table = {}
    for name in args.configs.split(","):
        table[name] = {}
        for depth in depths:
            runs = []
            for _ in range(args.repeats):
                out = subprocess.run(
                    [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps([depth, name])],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
            med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            table[name][str(depth)] = med
            print(
                f"{name:26s} depth {depth:5d}: lower+compile {med['lower_plus_compile_s']:.2f}s",
                file=sys.stderr,
            )
    ratios = {
        name: {
            f"{d}/{depths[0]}": row[str(d)]["lower_plus_compile_s"]
            / row[str(depths[0])]["lower_plus_compile_s"]
            for d in depths[1:]
        }
        for name, row in table.items()
    }
    common.emit(
        {
            "benchmark": "compile_time",
            "machine": common.machine(),
            "model": "ViT, width 64, 2 heads, MLP 4x, 17 tokens, batch 8, AdamW train step",
            "repeats": args.repeats,
            "seconds": table,
            f"ratio_to_depth_{depths[0]}": ratios,
        },
        args.out,
    )


if __name__ == "__main__":
    main()
