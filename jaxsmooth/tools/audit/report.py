"""The audit itself (`audit`: load, measure, predict, assemble the JSON-able result), its table and JSON
output, and the `jaxsmooth audit` command line (`main`)."""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys
from collections.abc import Sequence
from typing import Any

from jaxsmooth import theory
from jaxsmooth.tools.audit.loading import DEFAULT_MAX_LEN, MINILM, AuditError, load_model
from jaxsmooth.tools.audit.prediction import fold_description, spectral_audit
from jaxsmooth.tools.audit.spectra import gain_counts

SCHEMA_VERSION = 2  # 2: the effective map per residual type (see the package docstring)
REGIMES = theory.REGIMES

# =========================================================================================== the audit


def audit(
    path: str | pathlib.Path,
    texts: Sequence[str] | None = None,
    data: str | None = None,
    num_inputs: int | None = None,
    *,
    step: int | None = None,
    max_len: int = DEFAULT_MAX_LEN,
    heads: bool = True,
) -> dict:
    """Audit the model at ``path`` (module docstring) and return the JSON-able result.

    texts: text inputs (BERT, CausalLM); data: a dataset name (jaxsmooth runs: test split of that dataset;
    default the run's own) or a UTF-8 text file, one input per line (text models); num_inputs: at most
    this many inputs; step: checkpoint step of a run (default newest); max_len: BERT tokens per input;
    heads: include per-head spectra and predictions. Raises AuditError for unusable paths and inputs.
    """
    if num_inputs is not None and num_inputs < 1:
        raise AuditError(f"num_inputs={num_inputs} must be >= 1")
    if max_len < 2:
        raise AuditError(f"max_len={max_len} must be >= 2")
    m = load_model(path, step=step, max_len=max_len, texts=texts, data=data, num_inputs=num_inputs)
    stats, att_LxHxTxT, input_info = m.measure(m.inputs)
    layers = spectral_audit(
        m.w_v_LxDxD,
        m.w_o_LxDxD,
        m.gain_LxD,
        att_LxHxTxT,
        residual=m.residual,
        value_norm=m.value_norm,
        alpha=m.alpha,
        heads=heads,
    )
    fold = fold_description(m.residual, m.value_norm, m.alpha)
    folded = m.residual == "pre_ln" and m.value_norm == "ln"
    cos, hfc = stats["token_cosine"], stats["hfc_lfc"]
    for l, entry in enumerate(layers):
        entry["ln_gain"] = gain_counts(m.gain_LxD[l], m.gain_sources[l]) | {"folded": folded}
        entry["ln_gains_other"] = {k: gain_counts(g, k) for k, g in m.other_gains[l].items()}
        if m.exact_eigs_LxD is not None:
            entry["constrained_eigenvalue_range"] = [
                float(m.exact_eigs_LxD[l].min()),
                float(m.exact_eigs_LxD[l].max()),
            ]
        for key, prof in stats.items():
            entry[key] = float(prof[l + 1])
        entry["delta_token_cosine"] = float(cos[l + 1] - cos[l])
        entry["measured_effect"] = "smooth" if cos[l + 1] > cos[l] else "sharpen"
        # The same judged by HFC/LFC (falls when the DC component grows relative to the rest).
        entry["measured_effect_hfc"] = "smooth" if hfc[l + 1] < hfc[l] else "sharpen"
        # Measured counterpart of prediction["hc_dc_rate"]: the change of HFC/LFC across the layer.
        entry["hfc_lfc_factor"] = float(hfc[l + 1] / hfc[l]) if hfc[l] > 0 else float("nan")
        entry["agrees"] = entry["measured_effect"] == entry["predicted_effect"]
        # Put the required keys first for readers of the raw JSON.
        layers[l] = {
            k: entry[k] for k in ("layer", "dominant_eigenvalue", "predicted_regime", "token_cosine")
        } | entry
    result = {
        "schema_version": SCHEMA_VERSION,
        "model": m.info | {"fold": fold},
        **input_info,
        **{key: [float(v) for v in prof] for key, prof in stats.items()},
        "layers": layers,
        "notes": [
            "layer l is 1-based; profile index 0 is the embedding output, index l the output of layer l",
            "dominant_eigenvalue: largest-modulus eigenvalue of W_V W_O (x @ W), imag >= 0 of a pair",
            f"predicted_regime: theory.predict(A, M) with M = theory.effective_update, here {fold}; A "
            "averaged over inputs and heads",
            "effective: spectrum of M (for pre-LN 'ln' without the centring's structural zero); h_alone: "
            "what H / alpha alone would predict",
            "predicted_effect: smooth if the DC mode (lambda_A = 1) dominates, else sharpen",
            "measured_effect: sign of the change of the mean pairwise token cosine across the layer",
            "heads: the k nonzero eigenvalues of W_V[:, h] W_O[h, :] (and of the head's effective map, "
            "folded like the layer's); regime of the head's value coordinates under its own attention",
            "the theory models X + A X H; real blocks add LayerNorm, biases, an MLP and input-dependent "
            "attention, so the prediction is a guide",
        ],
    }
    return _finite(result)


def _finite(x: Any) -> Any:
    """Replace NaN / inf by None so the JSON is strict (json.dumps would write NaN)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_finite(v) for v in x]
    return x


# =========================================================================================== output


def _fmt_c(z: Sequence[float] | None) -> str:
    if z is None:
        return "n/a"
    return f"{z[0]:+.3f}{z[1]:+.3f}j"


def _fmt_f(x: float | None) -> str:
    return f"{'n/a':>6}" if x is None else f"{x:6.3f}"


def format_table(result: dict) -> str:
    """The per-layer table printed by `jaxsmooth audit`."""
    m, inp, pin = result["model"], result["inputs"], result["prediction_inputs"]
    head = (
        f"jaxsmooth audit: {m['name']} ({m['kind']}, {m['residual']}, {m['num_layers']} layers, "
        f"D={m['d_model']}, {m['num_heads']} heads"
        + (f", step {m['step']}" if m.get("step") is not None else "")
        + f") on {inp['num_inputs']} inputs ({inp['kind']})"
    )
    if pin.get("truncated"):
        head += f"; attention for the prediction: inputs truncated to {pin['seq_len']} tokens"
    head += f"\neffective map M = {m['fold']}"
    cols = (
        f"{'layer':>5}  {'dom eig W_V W_O':>16}  {'dom eig M':>16}  {'neg H':>5}  {'neg M':>6}  "
        f"{'LN g<0':>6}  {'predicted (M)':>17}  {'pred':>7}  {'HC/DC':>6}  {'cos':>6}  {'dcos':>7}  "
        f"{'meas':>7}  {'HFC/LFC':>8}  {'factor':>6}"
    )
    lines = [head, cols, "-" * len(cols)]
    cos, hfc = result["token_cosine"], result["hfc_lfc"]
    lines.append(
        f"{'emb':>5}  {'':>16}  {'':>16}  {'':>5}  {'':>6}  {'':>6}  {'':>17}  {'':>7}  {'':>6}  "
        f"{cos[0]:6.3f}  {'':>7}  {'':>7}  {hfc[0]:8.3f}"
    )
    for e in result["layers"]:
        f = e["effective"]
        lines.append(
            f"{e['layer']:>5}  {_fmt_c(e['dominant_eigenvalue']):>16}  "
            f"{_fmt_c(f['dominant_eigenvalue']):>16}  "
            f"{e['frac_negative_real']:5.2f}  {f['frac_negative_real']:6.2f}  {e['ln_gain']['negative']:>6}  "
            f"{e['predicted_regime']:>17}  {e['predicted_effect']:>7}  "
            f"{_fmt_f(e['prediction']['hc_dc_rate'])}  "
            f"{e['token_cosine']:6.3f}  {e['delta_token_cosine']:+7.3f}  {e['measured_effect']:>7}  "
            f"{e['hfc_lfc']:8.3f}  {_fmt_f(e['hfc_lfc_factor'])}"
        )
    n_agree = sum(e["agrees"] for e in result["layers"])
    lines.append(
        f"predicted effect (DC mode dominant -> smooth) matches the sign of the measured cosine change in "
        f"{n_agree}/{len(result['layers'])} layers.\nneg = fraction of eigenvalues with negative real part; "
        "HC/DC = max |mu| of non-DC over DC modes of X + A X M (< 1: smooths); factor = measured HFC/LFC "
        "after / before the layer."
    )
    return "\n".join(lines)


def save_json(result: dict, path: str | pathlib.Path) -> pathlib.Path:
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1, allow_nan=False) + "\n")
    return path


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="jaxsmooth audit",
        description="Spectra of W_V W_O, predicted regime and measured smoothing of a trained model.",
    )
    p.add_argument("path", help=f"run directory, checkpoint, Hugging Face BERT directory, or '{MINILM}'")
    p.add_argument(
        "--text",
        action="append",
        default=None,
        metavar="T",
        help="a text input (repeatable); BERT default: a built-in list of sentences",
    )
    p.add_argument(
        "--data",
        default=None,
        metavar="NAME",
        help="dataset name (jaxsmooth runs; default the run's) or a text file, one input per line",
    )
    p.add_argument("--num-inputs", type=int, default=None, metavar="N", help="at most N inputs")
    p.add_argument("--step", type=int, default=None, help="checkpoint step of a run (default: newest)")
    p.add_argument("--max-len", type=int, default=DEFAULT_MAX_LEN, help="BERT: tokens per input")
    p.add_argument("--no-heads", action="store_true", help="skip per-head spectra and predictions")
    p.add_argument("--json", default=None, metavar="OUT", help="write the result as JSON to OUT")
    p.add_argument("--plots", default=None, metavar="DIR", help="write PNG plots into DIR")
    return p


def main(argv: list[str]) -> int:
    """`jaxsmooth audit ...`; returns the exit status (0 ok, 2 bad arguments or unusable input)."""
    parser = _parser()
    try:
        args = parser.parse_args(list(argv))
    except SystemExit as e:  # argparse exits on --help (0) and on bad arguments (2)
        return int(e.code or 0)
    try:
        result = audit(
            args.path,
            texts=args.text,
            data=args.data,
            num_inputs=args.num_inputs,
            step=args.step,
            max_len=args.max_len,
            heads=not args.no_heads,
        )
    except AuditError as e:
        print(f"jaxsmooth audit: error: {e}", file=sys.stderr)
        return 2
    print(format_table(result), flush=True)
    if args.json:
        print(f"wrote {save_json(result, args.json)}")
    if args.plots:
        from jaxsmooth.tools.audit import plots

        for p in plots.plot_audit(result, args.plots):
            print(f"wrote {p}")
    return 0
