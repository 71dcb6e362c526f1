"""Depth, data-size, corruption and text ablations: spectral (sharpen / smooth) attention against the
unconstrained baseline and the Wang et al. (2022) anti-oversmoothing baselines (AttnScale, FeatScale).

Every run goes through the one trainer (`jaxsmooth.train.train`) from a packaged config plus the overrides
below, into OUT/<ablation>/<variant>/<value>/; rerunning resumes or skips finished runs. Tables (markdown)
and plots (PNG) are written to OUT from the runs' summary.json files. Nothing here is committed output.

    python experiments/ablations.py depth      --config fashion_mnist --out results/ablations
    python experiments/ablations.py data       --config fashion_mnist --out results/ablations
    python experiments/ablations.py corruption --config fashion_mnist --out results/ablations
    python experiments/ablations.py text       --out results/ablations
    python experiments/ablations.py depth --config digits --quick   # a CPU smoke version (minutes)

Stand-ins (say so in any write-up): Fashion-MNIST (padded to 32x32, patch 4 -> 64 tokens) replaces
CIFAR-10/100, ImageNet-C-style corruptions of Fashion-MNIST replace CIFAR-C, and a character-level LM on
Shakespeare replaces the paper's crammed BERT on The Pile. `--quick` uses each config's `quick` variant
and smaller grids: a check that the pipeline works, not a result.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from jaxsmooth import cli, train
from jaxsmooth import data as data_lib

# What differs between the compared models (dotted config field -> value).
VARIANTS = {
    "baseline": {"model.spectrum.mode": "none"},
    "sharpen": {"model.spectrum.mode": "sharpen"},  # the paper's "minus": eig(H) in [-1, 0)
    "smooth": {"model.spectrum.mode": "smooth"},  # the paper's "plus": eig(H) in (0, 1]
    "attnscale": {"model.spectrum.mode": "none", "model.branch_scale": "attnscale"},
    "featscale": {"model.spectrum.mode": "none", "model.branch_scale": "featscale"},
}
TEXT_VARIANTS = ("baseline", "sharpen", "smooth")
GRIDS = {  # ablation -> (config field, full grid, --quick grid)
    "depth": ("model.depth", (2, 6, 12, 24), (1, 2, 4)),
    "data": ("data.train_fraction", (0.02, 0.1, 0.3, 1.0), (0.1, 0.5, 1.0)),
}
CORRUPTIONS = ("gaussian_noise", "defocus_blur", "contrast", "jpeg_compression")
SEVERITIES = (1, 3, 5)


def _set(config, dotted: str, value) -> None:
    *path, field = dotted.split(".")
    node = config
    for part in path:
        node = node[part]
    node[field] = value


def make_config(name: str, quick: bool, overrides: dict):
    config, _, _ = cli.parse_train_args(["--config", f"{name}:quick" if quick else name])
    for key, value in overrides.items():
        _set(config, key, value)
    return config


def run(out: Path, ablation: str, variant: str, value, config) -> dict:
    workdir = out / ablation / variant / str(value)
    summary_path = workdir / "summary.json"
    if summary_path.is_file():
        summary = json.loads(summary_path.read_text())
        if summary.get("steps") == config.train.steps:
            return summary  # finished earlier
    print(f"[{ablation}] {variant} {value}: training into {workdir}", flush=True)
    return train.train(config, workdir, verbose=False)


def sweep(args, ablation: str) -> list[dict]:
    field, full, small = GRIDS[ablation]
    rows = []
    for variant, overrides in VARIANTS.items():
        for value in small if args.quick else full:
            config = make_config(args.config, args.quick, {**overrides, field: value})
            s = run(args.out, ablation, variant, value, config)
            rows.append({"variant": variant, field: value, "test_accuracy": s["test_accuracy"],
                         "final_token_cosine": s["token_cosine"][-1], "steps": s["steps"]})  # fmt: skip
    return rows


def corruption(args) -> list[dict]:
    """Train each variant once (the config's default depth), then test it on corrupted test images."""
    rows = []
    n_test = 500 if args.quick else 2000
    for variant, overrides in VARIANTS.items():
        config = make_config(args.config, args.quick, overrides)
        run(args.out, "corruption", variant, "default", config)
        loaded = train.load_run(args.out / "corruption" / variant / "default")
        x, y = loaded.dataset.x_test[:n_test], loaded.dataset.y_test[:n_test]
        for name in CORRUPTIONS[:2] if args.quick else CORRUPTIONS:
            for severity in SEVERITIES:
                xc = data_lib.corrupt(x, name, severity, seed=0)
                rows.append({"variant": variant, "corruption": name, "severity": severity,
                             "test_accuracy": _accuracy(loaded.model, xc, y)})  # fmt: skip
        rows.append({"variant": variant, "corruption": "none", "severity": 0,
                     "test_accuracy": _accuracy(loaded.model, x, y)})  # fmt: skip
    return rows


def _accuracy(model, x, y, batch: int = 250) -> float:
    preds = [np.argmax(np.asarray(model(jnp.asarray(x[i : i + batch]))), -1) for i in range(0, len(x), batch)]
    return float(np.mean(np.concatenate(preds) == y))


def text(args) -> list[dict]:
    rows = []
    for variant in TEXT_VARIANTS:
        config = make_config("shakespeare_char", args.quick, VARIANTS[variant])
        s = run(args.out, "text", variant, "default", config)
        rows.append({"variant": variant, "test_bpc": s.get("test_bpc"),
                     "final_token_cosine": s["token_cosine"][-1], "steps": s["steps"]})  # fmt: skip
    return rows


def report(out: Path, ablation: str, rows: list[dict]) -> None:
    """OUT/<ablation>.json, a markdown table and (for sweeps) a plot of accuracy against the swept field."""
    (out / f"{ablation}.json").write_text(json.dumps(rows, indent=1) + "\n")
    keys = list(rows[0])
    fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(keys) + " |", "|" + " --- |" * len(keys)]
    lines += ["| " + " | ".join(fmt(r[k]) for k in keys) + " |" for r in rows]
    (out / f"{ablation}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if ablation in GRIDS or ablation == "corruption":
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        x_key = GRIDS[ablation][0] if ablation in GRIDS else "severity"
        for variant in VARIANTS:
            pts = [r for r in rows if r["variant"] == variant]
            if ablation == "corruption":  # accuracy averaged over corruptions, per severity
                sev = sorted({r["severity"] for r in pts})
                ys = [np.mean([r["test_accuracy"] for r in pts if r["severity"] == s]) for s in sev]
                ax.plot(sev, ys, marker="o", label=variant)
            else:
                ax.plot([r[x_key] for r in pts], [r["test_accuracy"] for r in pts], marker="o", label=variant)
        ax.set_xlabel(x_key)
        ax.set_ylabel("test accuracy")
        if ablation == "data":
            ax.set_xscale("log")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / f"{ablation}.png", dpi=120)
        plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("ablation", choices=["depth", "data", "corruption", "text"])
    p.add_argument("--config", default="fashion_mnist", help="packaged image config (e.g. digits)")
    p.add_argument("--out", type=Path, default=Path("results/ablations"))
    p.add_argument("--quick", action="store_true", help="quick configs and small grids (a smoke test)")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = {"depth": lambda: sweep(args, "depth"), "data": lambda: sweep(args, "data"),
            "corruption": lambda: corruption(args), "text": lambda: text(args)}[args.ablation]()  # fmt: skip
    report(args.out, args.ablation, rows)


if __name__ == "__main__":
    main()
