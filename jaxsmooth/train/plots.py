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
    if train:
        ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], label="train")
    for split in ("val", "test"):  # periodic evaluations use the validation split when there is one
        pts = [(r["step"], r[f"{split}_loss"]) for r in evals if f"{split}_loss" in r]
        if pts:
            ax_loss.plot(*zip(*pts, strict=True), "o-", label=split)
    ax_loss.set(xlabel="step", ylabel="loss", title="loss")
    ax_loss.set_yscale("log")
    ax_loss.legend()

    kind = "accuracy" if any(k.endswith("_accuracy") for r in evals for k in r) else "bpc"
    for split in ("val", "test"):
        pts = [(r["step"], r[f"{split}_{kind}"]) for r in evals if f"{split}_{kind}" in r]
        if pts:
            ax_acc.plot(*zip(*pts, strict=True), "o-", label=split)
    ax_acc.set(xlabel="step", ylabel=kind, title=f"{kind} (validation / test)")
    if evals:
        ax_acc.legend()

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

    if stats:
        steps = [r["step"] for r in stats]
        for ax, key, log, label in ((ax_hcos, "token_cosine", False, "token cosine"),
                                    (ax_hhfc, "hfc_lfc", True, "log10 HFC/LFC")):  # fmt: skip
            z_LxS = np.asarray([[r[f"{key}_input"], *r[key]] for r in stats], np.float64).T
            if log:
                z_LxS = np.log10(np.maximum(z_LxS, 1e-12))
            # Columns at the stats steps (uneven spacing is fine: pcolormesh takes the edges).
            edges = np.concatenate([[steps[0] - 0.5], np.asarray(steps, np.float64) + 0.5])
            if len(steps) > 1:
                mids = (np.asarray(steps[:-1]) + np.asarray(steps[1:])) / 2
                edges = np.concatenate([[2 * steps[0] - mids[0]], mids, [2 * steps[-1] - mids[-1]]])
            limits = {} if log else {"vmin": min(0.0, float(z_LxS.min())), "vmax": 1.0}
            rows = np.arange(z_LxS.shape[0] + 1) - 0.5
            mesh = ax.pcolormesh(edges, rows, z_LxS, shading="flat", cmap="viridis", **limits)
            fig.colorbar(mesh, ax=ax, label=label)
            ax.set(xlabel="step", ylabel="layer (0 = input)", title=f"{label} over training")
        last = stats[-1]
        if "eff_re_min" in last:
            layers = np.arange(1, len(last["eff_re_min"]) + 1)
            ax_eff.fill_between(layers, last["eff_re_min"], last["eff_re_max"], alpha=0.4,
                                label="effective map", step="mid")  # fmt: skip
            alpha = last.get("eig_alpha", 1.0)
            h_lo, h_hi = np.asarray(last["eig_min"]) / alpha, np.asarray(last["eig_max"]) / alpha
            ax_eff.plot(layers, h_lo, "k_", ms=6, label="H / alpha (min, max)")
            ax_eff.plot(layers, h_hi, "k_", ms=6)
            ax_eff.axhline(0.0, color="r", lw=0.8)
            ax_eff.legend()
        ax_eff.set(
            xlabel="layer", ylabel="Re(eigenvalue)", title=f"effective map spectrum (step {last['step']})"
        )
    if title:
        fig.suptitle(title)
    path = Path(path)
    FigureCanvasAgg(fig).print_png(str(path))
    return path
