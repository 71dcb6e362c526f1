"""Training-curve plots from a run's metrics.jsonl records (written by jaxsmooth.train).

Uses matplotlib's object API with the Agg canvas, so it never touches pyplot's global backend state and
works headless.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def plot_curves(records: list[dict], path: str | Path, title: str = "") -> Path:
    """curves.png: train/test loss vs step, test accuracy (or bits/char) vs step, and the smoothing
    profile (token cosine and HFC/LFC vs layer, 0 = the stack's input) at the first and last stats step.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    train = [r for r in records if r.get("type") == "train"]
    evals = [r for r in records if r.get("type") == "eval"]
    stats = [r for r in train if "token_cosine" in r]

    fig = Figure(figsize=(16, 4), layout="constrained")
    ax_loss, ax_acc, ax_cos, ax_hfc = fig.subplots(1, 4)
    if train:
        ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], label="train")
    if evals:
        ax_loss.plot([r["step"] for r in evals], [r["test_loss"] for r in evals], "o-", label="test")
    ax_loss.set(xlabel="step", ylabel="loss", title="loss")
    ax_loss.set_yscale("log")
    ax_loss.legend()

    metric = "test_accuracy" if any("test_accuracy" in r for r in evals) else "test_bpc"
    pts = [(r["step"], r[metric]) for r in evals if metric in r]
    if pts:
        ax_acc.plot(*zip(*pts, strict=True), "o-")
    ax_acc.set(xlabel="step", ylabel=metric.replace("_", " "), title=metric.replace("_", " "))

    picks = [stats[0], stats[-1]] if len(stats) > 1 else stats
    for r in picks:
        for ax, key in ((ax_cos, "token_cosine"), (ax_hfc, "hfc_lfc")):
            y = np.asarray([r[f"{key}_input"], *r[key]])
            ax.plot(np.arange(len(y)), y, "o-", ms=3, label=f"step {r['step']}")
    ax_cos.set(xlabel="layer (0 = input)", ylabel="mean pairwise token cosine", title="token cosine")
    ax_hfc.set(xlabel="layer (0 = input)", ylabel="||HC|| / ||DC||", title="HFC / LFC")
    ax_hfc.set_yscale("log")
    for ax in (ax_cos, ax_hfc):
        if picks:
            ax.legend()
    if title:
        fig.suptitle(title)
    path = Path(path)
    FigureCanvasAgg(fig).print_png(str(path))
    return path
