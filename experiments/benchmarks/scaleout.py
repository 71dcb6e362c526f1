"""Scale-out on CPU: training steps/s of `jaxsmooth train` on 1, 2 and 4 (simulated) CPU devices and on 2
processes (jax.distributed over localhost, one device each), for the default config's shape and ViT-Tiny's.

Every variant is a real `jaxsmooth train` run in its own process (device counts are fixed at JAX start-up),
so what is measured is what a user gets, the host-callback linear algebra of several devices included
(jaxsmooth/linalg.py). steps/s is the trainer's own figure (summary.json: between the first and the last
logged step, so compilation and evaluation are left out). The variants run one after the other, round
after round (`--rounds`), so a change in the machine's load hits all of them; medians are reported.

    python experiments/benchmarks/scaleout.py --out results/scaleout.json            # ~15 min on 2 cores
    python experiments/benchmarks/scaleout.py --shapes default --rounds 1            # ~4 min

A 2-core machine cannot run 4 devices faster than 1: the devices share the cores. The point is a number
that moves when a change makes multi-device or multi-process runs slower (or hang: each run has a limit).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHAPES = {
    # the README's main job: digits, width 64, 4 layers, 17 tokens, batch 32
    "default": ["--config", "digits", "--config.train.steps=60"],
    # ViT-Tiny: width 192, 3 heads, 12 layers, 65 tokens (Fashion-MNIST padded to 32x32, patch 4), batch 64
    "vit_tiny": [
        "--config", "fashion_mnist", "--config.model.d_model=192", "--config.model.num_heads=3",
        "--config.model.depth=12", "--config.model.mlp_ratio=4.0", "--config.data.batch_size=64",
        "--config.train.steps=16", "--config.train.test_max_examples=64", "--config.data.eval_batch_size=64",
    ],
}  # fmt: skip
COMMON = [
    "--config.train.log_every=4", "--config.train.stats_every=100000", "--config.train.eval_every=100000",
    "--config.train.checkpoint_every=100000", "--config.train.tensorboard=False",
]  # fmt: skip
VARIANTS = ("1 device", "2 devices", "4 devices", "2 processes")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def run(shape: str, variant: str, limit_s: float) -> dict:
    """One `jaxsmooth train` run (or two cooperating processes); its steps/s and wall time."""
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "jaxsmooth", "train", *SHAPES[shape], *COMMON, "--workdir", str(workdir)]
        if variant == "2 processes":
            port = _free_port()
            envs = [
                {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
                 "JAX_COORDINATOR_ADDRESS": f"localhost:{port}", "JAX_NUM_PROCESSES": "2",
                 "JAX_PROCESS_ID": str(i)}
                for i in range(2)
            ]  # fmt: skip
        else:
            n = int(variant.split()[0])
            envs = [{**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={n}"}]
        t0 = time.perf_counter()
        procs = [subprocess.Popen(cmd, env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for e in envs]  # fmt: skip
        outs = []
        try:
            outs = [p.communicate(timeout=limit_s)[0] for p in procs]
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            return {"error": f"did not finish in {limit_s:.0f} s"}
        wall = time.perf_counter() - t0
        if any(p.returncode for p in procs):
            return {"error": f"exit {[p.returncode for p in procs]}: {outs[0][-500:]}"}
        summary = json.loads((workdir / "summary.json").read_text())
        return {"steps_per_sec": summary["steps_per_sec"], "wall_s": wall, "devices": summary["devices"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="default,vit_tiny", help="comma-separated: default, vit_tiny")
    p.add_argument(
        "--variants", default=",".join(VARIANTS), help="comma-separated subset of " + str(VARIANTS)
    )
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--limit", type=float, default=900.0, help="seconds per run before it counts as hung")
    p.add_argument("--out", help="also write the JSON here")
    args = p.parse_args()
    shapes, variants = args.shapes.split(","), args.variants.split(",")
    raw: dict = {f"{s} / {v}": [] for s in shapes for v in variants}
    for r in range(args.rounds):
        for s in shapes:
            for v in variants:
                res = run(s, v, args.limit)
                raw[f"{s} / {v}"].append(res)
                print(
                    f"round {r + 1} {s} / {v}: {res.get('steps_per_sec') or res.get('error')}",
                    file=sys.stderr,
                )
    table = {}
    for s in shapes:
        base = None
        for v in variants:
            rates = [x["steps_per_sec"] for x in raw[f"{s} / {v}"] if x.get("steps_per_sec")]
            med = statistics.median(rates) if rates else None
            base = med if v == "1 device" else base
            table[f"{s} / {v}"] = {
                "steps_per_sec": med,
                "vs_1_device": (med / base) if med and base else None,
                "errors": [x["error"] for x in raw[f"{s} / {v}"] if "error" in x],
            }
    out = {"cpu_count": len(os.sched_getaffinity(0)), "load_avg": os.getloadavg(), "table": table, "raw": raw}
    text = json.dumps(out, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
