"""How fast does H = W_V W_O move per optimiser step: spectral variants against the unconstrained baseline.

A fair spectral-vs-baseline comparison needs the constrained layer's H to move at the same relative rate
per step as the baseline's under the same optimiser settings (docs/design.md, "Matched learning
dynamics"). This script trains each variant with the packaged config's optimiser on its real data and, at
chosen steps, measures the relative change of every layer's H caused by one optimiser step,

    rate_l(t) = ||H_l(t + 1) - H_l(t)||_F / ||H_l(t)||_F,

averaged over layers and over a window of steps, and prints each variant's rate and its ratio to the
baseline's, in two phases: "init", the first 10 steps at the config's peak learning rate (constant, no
warmup: the early rate is not hidden by a tiny warmup lr), and "trained", the last 25 of `--steps` steps
with the config's own schedule. The models share the data order and the seed; only the attention
parameterisation differs.

    python experiments/dynamics.py                                   # digits, 300 steps
    python experiments/dynamics.py --config fashion_mnist --set model.depth=4 --steps 300 \
        --json experiments/results/dynamics/fashion_mnist.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from jaxsmooth import data as data_lib
from jaxsmooth import train
from jaxsmooth.tools import cli
from jaxsmooth.train import optim
from jaxsmooth.train.state import new_state

VARIANTS = ("none", "sharpen", "smooth", "neutral", "free")


def _set(config, dotted: str, text: str) -> None:
    *path, field = dotted.split(".")
    node = config
    for part in path:
        node = node[part]
    old = node[field]
    node[field] = type(old)(text) if old is not None and not isinstance(old, bool) else json.loads(text)


def measure(config, mode: str, steps: int, windows: list[tuple[int, int]]) -> dict:
    """Train `steps` steps of `config` with spectrum.mode=`mode`; the mean per-step relative change of H
    over each window [a, b) of steps, and the final training loss."""
    config = config.copy_and_resolve_references()
    config.model.spectrum.mode = mode
    mcfg = train.check_config(config)
    d = config.data
    ds = data_lib.prepare(data_lib.load(d.name, **d.kwargs.to_dict()), d.train_fraction, d.seed)
    batcher = data_lib.Batcher(ds, d.batch_size, d.seed, d.seq_len if ds.kind == "text" else None)
    model = train.build_model(mcfg, ds, config, nnx.Rngs(params=config.train.seed))
    graphdef, params, _ = nnx.split(model, nnx.Param, ...)
    tx = optim.make_optimizer(config.opt, params)
    schedule = optim.make_schedule(config.opt)
    state = new_state(nnx.to_pure_dict(params), tx, seed=config.train.seed)
    step_fn = jax.jit(
        train.make_train_step(
            graphdef,
            tx,
            schedule,
            dropout=mcfg.dropout > 0,
            with_stats=False,
            spectral=mcfg.spectrum is not None,
        )  # fmt: skip
    )

    @jax.jit
    def h_stack(p):
        return nnx.merge(graphdef, p).transformer.effective_h()

    want = sorted({t for a, b in windows for t in range(a, b + 1)})
    rates: dict[int, np.ndarray] = {}
    h_prev = None
    losses = []
    for t in range(steps):
        if t in want:
            h = np.asarray(h_stack(state["params"]), np.float64)
            if h_prev is not None and t - 1 in want:
                num = np.linalg.norm(h - h_prev, axis=(1, 2))
                rates[t - 1] = num / np.linalg.norm(h_prev, axis=(1, 2))
            h_prev = h
        state, m = step_fn(state, *batcher.batch(t))
        losses.append(float(m["loss"]))
    out = {"final_loss_mean20": float(np.mean(losses[-20:]))}
    for a, b in windows:
        per_step = [rates[t] for t in range(a, b) if t in rates]
        out[f"{a}-{b}"] = float(np.mean(per_step)) if per_step else None
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="digits", help="packaged config name or file (default digits)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a config field, e.g. model.depth=4 (repeatable)")  # fmt: skip
    p.add_argument("--steps", type=int, default=300, help="training steps (default 300)")
    p.add_argument("--variants", default=",".join(VARIANTS), help="spectrum modes; none = the baseline")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    config, _, _ = cli.parse_train_args(["--config", args.config])
    for kv in args.set:
        field, _, value = kv.partition("=")
        _set(config, field, value)
    s = args.steps
    config.train.steps = s
    init_config = config.copy_and_resolve_references()
    init_config.opt.warmup_steps, init_config.opt.schedule = 0, "constant"
    phases = {"init": (init_config, 11, (0, 10)), "trained": (config, s, (s - 25, s - 1))}
    results: dict = {}
    for mode in args.variants.split(","):
        t0 = time.perf_counter()
        results[mode] = {}
        for phase, (cfg, n, (a, b)) in phases.items():
            r = measure(cfg, mode, n, [(a, b)])
            results[mode][phase] = r[f"{a}-{b}"]
        results[mode]["final_loss_mean20"] = r["final_loss_mean20"]
        results[mode]["seconds"] = round(time.perf_counter() - t0, 1)
        print(f"{mode:8s} " + " ".join(f"{k}: {v:.4g}" for k, v in results[mode].items()), flush=True)
    base = results.get("none")
    if base:
        print("\nrelative rate of H per step, ratio to the baseline (within 2x = fair):")
        for mode, r in results.items():
            print(f"  {mode:8s} " + "  ".join(f"{p}: {r[p] / base[p]:.2f}" for p in phases))
            r["ratio_to_baseline"] = {p: r[p] / base[p] for p in phases}
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        record = {
            "command": "python experiments/dynamics.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "config": args.config, "overrides": args.set, "steps": s, "results": results,
        }  # fmt: skip
        path.write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
