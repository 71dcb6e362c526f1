"""PNG plots of an oversmoothing audit (`jaxsmooth.tools.audit`) or of a training run's metrics.jsonl.

    plot_audit(result, out_dir)  smoothing.png    token cosine and HFC/LFC vs layer (0 = embedding output),
                                                  each layer's point coloured by the effect the spectrum
                                                  predicts (DC mode dominant: smooth, else sharpen)
                                 eigenvalues.png  eigenvalues of W_V W_O and of the effective map M the
                                                  block applies (theory.effective_update) in the complex
                                                  plane, coloured by layer; real-part range per layer
                                 heads.png        per-head dominant eigenvalue (real part) and predicted
                                                  effect, layers x heads (if the audit has per-head data)
    plot_run(workdir, out_dir)   run_smoothing.png, run_eigenvalues.png from metrics.jsonl: the smoothing
                                 profile at every stats step and the eigenvalue range of H per layer

`result` is the dict `jaxsmooth.tools.audit.audit` returns, or the JSON it writes, loaded back. matplotlib's
object API with the Agg canvas: no pyplot global state, works headless.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from jaxsmooth.train import jsonl

_EFFECT_COLOURS = {"smooth": "tab:red", "sharpen": "tab:blue"}


def _figure(figsize):
    from matplotlib.figure import Figure

    return Figure(figsize=figsize, layout="constrained")


def _save(fig, path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig).print_png(str(path))
    return path


def _title(result: dict) -> str:
    m, inp = result.get("model", {}), result.get("inputs", {})
    step = f", step {m['step']}" if m.get("step") is not None else ""
    model = f"{m.get('name', '?')} ({m.get('kind', '?')}, {m.get('residual', '?')}{step})"
    return f"{model}, {inp.get('num_inputs', '?')} inputs"


# ------------------------------------------------------------------------------------------- audit


def plot_smoothing(result: dict, path: str | Path) -> Path:
    """Token cosine and HFC/LFC vs layer; layer markers coloured by the predicted effect."""
    fig = _figure((11, 4))
    ax_cos, ax_hfc = fig.subplots(1, 2)
    layers = result["layers"]
    effects = [e.get("predicted_effect") for e in layers]
    for ax, key, label in (
        (ax_cos, "token_cosine", "mean pairwise token cosine"),
        (ax_hfc, "hfc_lfc", "||HC|| / ||DC||"),
    ):
        y = np.asarray(result[key], np.float64)
        x = np.arange(len(y))
        ax.plot(x, y, "-", color="0.5", lw=1)
        ax.plot(x[:1], y[:1], "o", color="0.3", label="embedding output")
        for effect, colour in _EFFECT_COLOURS.items():
            pick = [l for l, e in enumerate(effects, start=1) if e == effect]
            if pick:
                ax.plot(x[pick], y[pick], "o", color=colour, label=f"spectrum predicts {effect}")
        if key == "token_cosine" and result.get("prediction_inputs", {}).get("token_cosine"):
            y2 = result["prediction_inputs"]["token_cosine"]
            ax.plot(np.arange(len(y2)), y2, ":", color="0.4", label="inputs truncated for A")
        ax.set(xlabel="layer (0 = embedding output)", ylabel=label, xticks=x)
        ax.legend(fontsize=8)
    ax_cos.set_title("token cosine")
    ax_hfc.set_title("HFC / LFC")
    if np.all(np.asarray(result["hfc_lfc"], np.float64) > 0):
        ax_hfc.set_yscale("log")
    fig.suptitle(_title(result))
    return _save(fig, Path(path))


def _eigs(entry: dict) -> np.ndarray:
    if "eigenvalues" not in entry:
        return np.asarray([complex(*entry["dominant_eigenvalue"])])
    return np.asarray([complex(re, im) for re, im in entry["eigenvalues"]])


def plot_eigenvalues(result: dict, path: str | Path) -> Path:
    """Complex-plane scatter of the eigenvalues of H and of the effective map M coloured by layer, and the
    real-part range of each layer (bar: min..max real part, marker: the dominant eigenvalue's real part)."""
    from matplotlib import cm, colors

    layers = result["layers"]
    n = len(layers)
    norm = colors.Normalize(vmin=1, vmax=max(n, 2))
    cmap = cm.viridis
    fig = _figure((16, 4.5))
    ax_h, ax_g, ax_r = fig.subplots(1, 3)
    fold = result.get("model", {}).get("fold", "?")
    for ax, folded, title in (
        (ax_h, False, "eigenvalues of H = W_V W_O"),
        (ax_g, True, "eigenvalues of M = " + fold.replace(" (", "\n(", 1)),
    ):
        for e in layers:
            src = e["effective"] if folded else e
            ev = _eigs(src)
            ax.scatter(ev.real, ev.imag, s=6, color=cmap(norm(e["layer"])), alpha=0.7, lw=0)
            dom = src["dominant_eigenvalue"]
            ax.scatter(
                [dom[0]], [dom[1]], s=50, marker="*", color=cmap(norm(e["layer"])), edgecolor="k", lw=0.5
            )
        ax.axvline(0, color="0.6", lw=0.8)
        ax.axhline(0, color="0.6", lw=0.8)
        ax.axvspan(-1, 0, color="tab:blue", alpha=0.06, label="[-1, 0): sharpening condition")
        ax.set(xlabel="real part", ylabel="imaginary part")
        ax.set_title(title, fontsize=9 if folded else None)
        ax.legend(fontsize=8, loc="upper left")
        fig.colorbar(cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, label="layer")
    x = np.arange(1, n + 1)
    for offset, folded, colour, label in (
        (-0.12, False, "tab:green", "W_V W_O"),
        (0.12, True, "tab:purple", "M (effective)"),
    ):
        srcs = [e["effective"] if folded else e for e in layers]
        lo = np.asarray([s["eig_real_min"] for s in srcs])
        hi = np.asarray([s["eig_real_max"] for s in srcs])
        dom = np.asarray([s["dominant_eigenvalue"][0] for s in srcs])
        ax_r.vlines(x + offset, lo, hi, color=colour, lw=4, alpha=0.6, label=f"real parts, {label}")
        ax_r.plot(x + offset, dom, "k*", ms=8)
    ax_r.plot([], [], "k*", ms=8, label="dominant eigenvalue (real part)")
    ax_r.axhline(0, color="0.6", lw=0.8)
    ax_r.set(xlabel="layer", ylabel="real part", xticks=x, title="real-part range per layer")
    ax_r.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2)
    fig.suptitle(_title(result))
    return _save(fig, Path(path))


def plot_heads(result: dict, path: str | Path) -> Path | None:
    """Layers x heads: the real part of each head's dominant eigenvalue, annotated with the predicted effect
    (sm = smooth, SH = sharpen). None if the audit has no per-head data."""
    layers = result["layers"]
    if not layers or "heads" not in layers[0]:
        return None
    dom_LxH = np.asarray([[h["dominant_eigenvalue"][0] for h in e["heads"]] for e in layers])
    n_l, n_h = dom_LxH.shape
    fig = _figure((max(6, 0.6 * n_h + 2), max(3, 0.5 * n_l + 1.5)))
    ax = fig.subplots()
    v = float(np.max(np.abs(dom_LxH))) or 1.0
    im = ax.imshow(dom_LxH, cmap="coolwarm", vmin=-v, vmax=v, aspect="auto")
    for l, e in enumerate(layers):
        for h, head in enumerate(e["heads"]):
            mark = "sm" if head["predicted_effect"] == "smooth" else "SH"
            ax.text(h, l, mark, ha="center", va="center", fontsize=8)
    ax.set(
        xlabel="head",
        ylabel="layer",
        xticks=range(n_h),
        yticks=range(n_l),
        yticklabels=[str(e["layer"]) for e in layers],
        title="per-head dominant eigenvalue (real part); predicted: sm = smooth, SH = sharpen",
    )
    fig.colorbar(im, ax=ax, label="Re(dominant eigenvalue of W_O[h] W_V[:, h])")
    return _save(fig, Path(path))


def plot_audit(result: dict, out_dir: str | Path) -> list[Path]:
    """Write smoothing.png, eigenvalues.png and (with per-head data) heads.png into out_dir."""
    out = Path(out_dir)
    paths = [plot_smoothing(result, out / "smoothing.png"), plot_eigenvalues(result, out / "eigenvalues.png")]
    heads = plot_heads(result, out / "heads.png")
    return paths + ([heads] if heads is not None else [])


# ------------------------------------------------------------------------------------------- runs


def _records(workdir: Path) -> list[dict]:
    path = workdir / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no metrics.jsonl in {workdir} (is it a `jaxsmooth train` workdir?)")
    return jsonl.read_jsonl(path)  # a torn last line is skipped with a warning, a bad middle line is an error


def plot_run(workdir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """run_smoothing.png (token cosine and HFC/LFC vs layer at every stats step, coloured by step) and
    run_eigenvalues.png (per layer: min..max of the real parts of the eigenvalues of H over training)."""
    from matplotlib import cm, colors

    workdir = Path(workdir)
    out = Path(out_dir) if out_dir is not None else workdir
    stats = [r for r in _records(workdir) if r.get("type") == "train" and "token_cosine" in r]
    if not stats:
        raise ValueError(f"{workdir}/metrics.jsonl has no per-layer statistics yet")
    steps = [r["step"] for r in stats]
    norm = colors.Normalize(vmin=min(steps), vmax=max(max(steps), min(steps) + 1))
    cmap = cm.viridis

    fig = _figure((11, 4))
    ax_cos, ax_hfc = fig.subplots(1, 2)
    for r in stats:
        for ax, key in ((ax_cos, "token_cosine"), (ax_hfc, "hfc_lfc")):
            y = np.asarray([r[f"{key}_input"], *r[key]], np.float64)
            ax.plot(np.arange(len(y)), y, "o-", ms=3, color=cmap(norm(r["step"])))
    ax_cos.set(xlabel="layer (0 = input)", ylabel="mean pairwise token cosine", title="token cosine")
    ax_hfc.set(xlabel="layer (0 = input)", ylabel="||HC|| / ||DC||", title="HFC / LFC")
    ax_hfc.set_yscale("log")
    fig.colorbar(cm.ScalarMappable(norm=norm, cmap=cmap), ax=[ax_cos, ax_hfc], label="step")
    fig.suptitle(f"{workdir.name}: smoothing profile during training")
    paths = [_save(fig, out / "run_smoothing.png")]

    fig = _figure((11, 4))
    ax_rng, ax_t = fig.subplots(1, 2)
    last = stats[-1]
    lo, hi = np.asarray(last["eig_min"]), np.asarray(last["eig_max"])
    x = np.arange(1, len(lo) + 1)
    ax_rng.vlines(x, lo, hi, lw=6, color="tab:green", alpha=0.7)
    ax_rng.axhline(0, color="0.6", lw=0.8)
    ax_rng.set(
        xlabel="layer",
        ylabel="real part of eig(H)",
        xticks=x,
        title=f"eigenvalue range per layer, step {last['step']}",
    )
    for l in range(len(lo)):
        colour = cm.viridis(l / max(len(lo) - 1, 1))
        ax_t.plot(steps, [r["eig_min"][l] for r in stats], "o-", ms=3, color=colour, label=f"layer {l + 1}")
        ax_t.plot(steps, [r["eig_max"][l] for r in stats], "o--", ms=3, color=colour)
    ax_t.axhline(0, color="0.6", lw=0.8)
    ax_t.set(xlabel="step", ylabel="real part of eig(H)", title="min (solid) / max (dashed) over training")
    ax_t.legend(fontsize=7)
    paths.append(_save(fig, out / "run_eigenvalues.png"))
    return paths
