"""Loss curves of the packaged deep config at depth 12, 100 and 1000, side by side (JSON + PNG).

    PYTHONPATH=$PWD python experiments/benchmarks/deep_curves.py [--depths 12,100,1000] [--steps 1000]
        [--modes sharpen] [--set model.ln_lr=none ...] [--out experiments/results/deep/curves.json]
        [--workdir-root DIR] [--order mode|depth]

Each (mode, depth) is one run of the real trainer (`jaxsmooth.train.train`) on this checkout's
jaxsmooth/configs/deep1000.py (DeepNorm, width 32, 2 heads, digits in 2x2 patches, batch 32, lr 1e-3, warmup
200,
cosine over --steps) with `depth=<d>,mode=<m>`, in a temporary workdir or DIR/d<depth>_<mode>: the
training loss every 10 steps, the test accuracy every 100 steps and at the end, and the training time
(the run's clock from its first to its last logged step). A finished run found in DIR is resumed, which
trains no further steps, so its records are reused: a long depth-1000 run can be made once, with
`jaxsmooth train --config jaxsmooth/configs/deep1000.py:mode=<m> --workdir DIR/d1000_<m>`, and collected here.
`--set` overrides any config field for every run, e.g. `--set model.ln_lr=none` for the library's
behaviour before the LayerNorm learning-rate factor (the collapse). The PNG (next to the JSON) has one
panel per mode: loss against step, one line per depth, ln 10 (chance) dashed.
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
import tempfile
import time
from pathlib import Path

import common

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # experiments/: deep_diagnosis
from deep_diagnosis import load_config  # noqa: E402  (this checkout's jaxsmooth/configs/deep1000.py)

from jaxsmooth import train  # noqa: E402


def run(depth: int, mode: str, steps: int, sets: list[str], root: Path | None) -> dict:
    """One trainer run in root/d<depth>_<mode> (a finished run there is resumed: no steps, its records
    reused), or in a temporary directory."""
    cfg = load_config(f"depth={depth},mode={mode}", [
        f"train.steps={steps}", "train.log_every=10", "train.eval_every=100", "train.stats_every=100000",
        f"train.checkpoint_every={min(steps, 250)}", *sets,
    ])  # fmt: skip
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp) if root is None else root / f"d{depth}_{mode}"
        summary = train.train(cfg, workdir, verbose=False)
        records = train.read_metrics(workdir / "metrics.jsonl")
    wall = time.perf_counter() - t0
    tr = [r for r in records if r.get("type") == "train"]
    ev = [r for r in records if r.get("type") == "eval"]
    # Training time from the run's own clock: first to last logged step (compilation excluded).
    train_s = tr[-1]["time"] - tr[0]["time"] if len(tr) > 1 else 0.0
    out = {
        "depth": depth,
        "mode": mode,
        "alpha_beta": list(train.check_config(cfg).alpha_beta),
        "steps": [r["step"] for r in tr],
        "loss": [round(r["loss"], 4) for r in tr],
        "grad_norm": [round(r["grad_norm"], 4) for r in tr],
        "eval_steps": [r["step"] for r in ev],
        "test_accuracy": [r["test_accuracy"] for r in ev],
        "final_test_accuracy": summary["test_accuracy"],
        "steps_this_invocation": summary["steps_this_run"],
        "wall_s_this_invocation": round(wall, 1),
        "train_s": round(train_s, 1),
        "s_per_step": round(train_s / max(tr[-1]["step"] - tr[0]["step"], 1), 3),
    }
    print(f"mode {mode} depth {depth}: final test accuracy {out['final_test_accuracy']:.4f}, "
          f"training {train_s:.0f} s ({out['s_per_step']} s/step)", flush=True)  # fmt: skip
    return out


def plot(result: dict, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    modes = result["modes"]
    fig = Figure(figsize=(6 * len(modes), 4), layout="constrained")
    axes = fig.subplots(1, len(modes), squeeze=False)[0]
    for ax, mode in zip(axes, modes, strict=True):
        for r in (r for r in result["runs"] if r["mode"] == mode):
            ax.plot(
                r["steps"], r["loss"], label=f"depth {r['depth']} (test acc {r['final_test_accuracy']:.2f})"
            )
        ax.axhline(math.log(10), ls="--", c="grey", lw=1, label="chance (ln 10)")
        ax.set(xlabel="step", ylabel="train loss", title=f"deep1000:mode={mode}", ylim=(0, 2.6))
        ax.legend()
    if result["overrides"]:
        fig.suptitle("overrides: " + " ".join(result["overrides"]))
    FigureCanvasAgg(fig).print_png(str(path))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--depths", default="12,100,1000")
    ap.add_argument(
        "--modes", default="sharpen", help="comma-separated spectrum modes (none = unconstrained)"
    )
    ap.add_argument(
        "--steps", type=int, default=1000, help="the packaged budget of jaxsmooth/configs/deep1000.py"
    )
    ap.add_argument("--set", action="append", default=[], help="section.field=value, for every run")
    ap.add_argument("--out", default="experiments/results/deep/curves.json")
    ap.add_argument("--workdir-root", default=None, help="keep runs in DIR/d<depth>_<mode> (resumable)")
    ap.add_argument("--order", choices=("mode", "depth"), default="mode", help="outer loop")
    args = ap.parse_args(argv)
    modes = args.modes.split(",")
    result = {
        "benchmark": "deep_curves",
        "command": "PYTHONPATH=$PWD python "
        + shlex.join(["experiments/benchmarks/deep_curves.py", *(argv or sys.argv[1:])]),
        "machine": common.machine(),
        "modes": modes,
        "overrides": args.set,
        "runs": [],
    }
    out = Path(args.out)
    root = None if args.workdir_root is None else Path(args.workdir_root)
    depths = [int(d) for d in args.depths.split(",")]
    pairs = [(m, d) for m in modes for d in depths]
    if args.order == "depth":
        pairs.sort(key=lambda md: depths.index(md[1]))
    for mode, depth in pairs:
        result["runs"].append(run(depth, mode, args.steps, args.set, root))
        common.emit(result, str(out))  # after every run: a long job keeps what it has
    plot(result, out.with_suffix(".png"))


if __name__ == "__main__":
    main()
