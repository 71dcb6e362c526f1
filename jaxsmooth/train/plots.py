"""Training-curve plots from a run's metrics.jsonl records (written by jaxsmooth.train).

Uses matplotlib's object API with the Agg canvas, so it never touches pyplot's global backend state and
works headless.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def plot_curves(records: list[dict], path: str | Path, title: str = "") -> Path:
    """curves.png. Top row: train/test loss vs step, test accuracy (or bits/char) vs step, and the
    smoothing profile (token cosine and HFC/LFC vs layer, 0 = the stack's input) at the first and last
    stats step. Bottom row: smoothing over training as layer x step heatmaps (token cosine, log10 HFC/LFC),
    and per layer the range of the real parts of the effective map's eigenvalues at the last stats step
    (docs/theory.md), with the range of H's beside it.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    train = [r for r in records if r.get("type") == "train"]
    evals = [r for r in records if r.get("type") == "eval"]
    stats = [r for r in train if "token_cosine" in r]

    fig = Figure(figsize=(16, 8), layout="constrained")
    (ax_loss, ax_acc, ax_cos, ax_hfc), (ax_hcos, ax_hhfc, ax_eff, ax_unused) = fig.subplots(2, 4)
    ax_unused.set_axis_off()
    _plot_loss(ax_loss, train, evals)
    _plot_eval_metric(ax_acc, evals)
    _plot_profiles(ax_cos, ax_hfc, [stats[0], stats[-1]] if len(stats) > 1 else stats)
    if stats:
        _plot_heatmaps(fig, ax_hcos, ax_hhfc, stats)
        _plot_effective_spectrum(ax_eff, stats[-1])
    if title:
        fig.suptitle(title)
    path = Path(path)
    FigureCanvasAgg(fig).print_png(str(path))
    return path


def _plot_loss(ax, train: list[dict], evals: list[dict]) -> None:
    """Training loss and the periodic evaluations' loss against the step (log scale)."""
    if train:
        ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train")
    for split in ("val", "test"):  # periodic evaluations use the validation split when there is one
        pts = [(r["step"], r[f"{split}_loss"]) for r in evals if f"{split}_loss" in r]
        if pts:
            ax.plot(*zip(*pts, strict=True), "o-", label=split)
    ax.set(xlabel="step", ylabel="loss", title="loss")
    ax.set_yscale("log")
    ax.legend()


def _plot_eval_metric(ax, evals: list[dict]) -> None:
    """Validation / test accuracy (bits per character for text) against the step."""
    kind = "accuracy" if any(k.endswith("_accuracy") for r in evals for k in r) else "bpc"
    for split in ("val", "test"):
        pts = [(r["step"], r[f"{split}_{kind}"]) for r in evals if f"{split}_{kind}" in r]
        if pts:
            ax.plot(*zip(*pts, strict=True), "o-", label=split)
    ax.set(xlabel="step", ylabel=kind, title=f"{kind} (validation / test)")
    if evals:
        ax.legend()


def _plot_profiles(ax_cos, ax_hfc, picks: list[dict]) -> None:
    """Token cosine and HFC/LFC against the layer (0 = the stack's input) at the picked stats steps."""
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


def step_edges(steps: list[int]) -> np.ndarray:
    """Cell edges of heatmap columns centred at the (possibly unevenly spaced) stats steps: midpoints
    between neighbours, the outer edges mirrored; one step alone spans step +- 0.5."""
    if len(steps) < 2:
        return np.concatenate([[steps[0] - 0.5], np.asarray(steps, np.float64) + 0.5])
    mids = (np.asarray(steps[:-1]) + np.asarray(steps[1:])) / 2
    return np.concatenate([[2 * steps[0] - mids[0]], mids, [2 * steps[-1] - mids[-1]]])


def _plot_heatmaps(fig, ax_hcos, ax_hhfc, stats: list[dict]) -> None:
    """Layer x step heatmaps of the token cosine and log10 HFC/LFC over training."""
    edges = step_edges([r["step"] for r in stats])
    for ax, key, log, label in ((ax_hcos, "token_cosine", False, "token cosine"),
                                (ax_hhfc, "hfc_lfc", True, "log10 HFC/LFC")):  # fmt: skip
        z_LxS = np.asarray([[r[f"{key}_input"], *r[key]] for r in stats], np.float64).T
        if log:
            z_LxS = np.log10(np.maximum(z_LxS, 1e-12))
        limits = {} if log else {"vmin": min(0.0, float(z_LxS.min())), "vmax": 1.0}
        rows = np.arange(z_LxS.shape[0] + 1) - 0.5
        mesh = ax.pcolormesh(edges, rows, z_LxS, shading="flat", cmap="viridis", **limits)
        fig.colorbar(mesh, ax=ax, label=label)
        ax.set(xlabel="step", ylabel="layer (0 = input)", title=f"{label} over training")


def _plot_effective_spectrum(ax, last: dict) -> None:
    """Per layer, the range of the effective map's real eigenvalue parts at the last stats step, with
    the range of H / alpha beside it."""
    if "eff_re_min" in last:
        layers = np.arange(1, len(last["eff_re_min"]) + 1)
        ax.fill_between(layers, last["eff_re_min"], last["eff_re_max"], alpha=0.4, label="effective map",
                        step="mid")  # fmt: skip
        alpha = last.get("eig_alpha", 1.0)
        h_lo, h_hi = np.asarray(last["eig_min"]) / alpha, np.asarray(last["eig_max"]) / alpha
        ax.plot(layers, h_lo, "k_", ms=6, label="H / alpha (min, max)")
        ax.plot(layers, h_hi, "k_", ms=6)
        ax.axhline(0.0, color="r", lw=0.8)
        ax.legend()
    ax.set(xlabel="layer", ylabel="Re(eigenvalue)", title=f"effective map spectrum (step {last['step']})")
