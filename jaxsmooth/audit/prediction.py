"""Theory predictions per layer and per head: `theory.predict` on the measured attention and the layer's
(or head's) value-output map, summarised as JSON-able dicts."""

from __future__ import annotations

import math

import numpy as np

from jaxsmooth import theory
from jaxsmooth.audit.spectra import _c, _one_blas_thread, eig_summary, row_stochastic


def dc_modes(spec: theory.UpdateSpectrum, tol: float = 1e-6) -> np.ndarray:
    """Boolean [n*d]: which pairs of ``spec`` are DC modes, i.e. their A-eigenvector is parallel to 1.

    Same test as `theory.predict` (relative residual from the mean <= sqrt(tol)). For a row-stochastic A
    these are the pairs with lambda_A = 1: mu = 1 + lambda_H, every token moved by the same vector.
    """
    v_NxN = spec.eigvecs_a
    resid_N = np.linalg.norm(v_NxN - v_NxN.mean(axis=0, keepdims=True), axis=0)
    is_dc_N = resid_N <= math.sqrt(tol) * np.linalg.norm(v_NxN, axis=0)
    return is_dc_N[spec.idx_a]


def prediction_summary(pred: theory.Prediction, tol: float = 1e-6) -> dict:
    """JSON-able summary of a theory.Prediction: regime, the dominant modes, the runner-up, and

    hc_dc_rate = max |mu| over the non-DC pairs / max |mu| over the DC pairs: per application of the
    linear layer X + A X H, the high-frequency part (all non-DC token modes) shrinks (< 1) or grows (> 1)
    relative to the DC part by about this factor, once the leading modes of each part dominate. It is
    < 1 exactly when the DC mode dominates (up to ties), so it measures how strongly the layer smooths,
    whereas ``rate`` (= |mu_2| / |mu_1| over all pairs) can be near 1 because the runner-up is another
    DC mode (a competition over which vector all tokens converge to, not over whether they do).
    """
    spec = pred.spectrum
    mod = np.abs(spec.mu)
    is_dc = dc_modes(spec, tol)
    if is_dc.any() and (~is_dc).any():
        hc_dc_rate = float(mod[~is_dc].max() / max(float(mod[is_dc].max()), np.finfo(np.float64).tiny))
    else:  # no DC mode (A not row-stochastic) or a single token: nothing to compare
        hc_dc_rate = float("nan")
    nxt = int(pred.dominant.size)  # pairs are sorted by |mu|: the first one outside the dominant set
    out = {
        "regime": pred.regime,
        "effect": "smooth" if pred.dc_dominant else "sharpen",
        "rate": float(pred.rate),
        "hc_dc_rate": hc_dc_rate,
        "mu_max": float(pred.mu_max),
        "rank_a": int(pred.rank_a),
        "rank_h": int(pred.rank_h),
        "dc_dominant": bool(pred.dc_dominant),
        # |lambda_A| of the strongest non-DC attention mode (0 for a single token): the weaker it is, the
        # less any lambda_H can lift a non-DC mode above the DC one.
        "second_abs_lambda_a": float(np.sort(np.abs(spec.eigvals_a))[-2]) if spec.eigvals_a.size > 1 else 0.0,
        "num_dominant": int(pred.dominant.size),
        # At most 8 listed: a degenerate spectrum (e.g. many zero eigenvalues of H) ties many pairs.
        "dominant_mu": [_c(z) for z in pred.dominant_mu[:8]],
        "dominant_lambda_a": [_c(z) for z in pred.dominant_lambda_a[:8]],
        "dominant_lambda_h": [_c(z) for z in pred.dominant_lambda_h[:8]],
    }
    if nxt < spec.mu.size:
        out["runner_up"] = {
            "mu": _c(spec.mu[nxt]),
            "lambda_a": _c(spec.lam_a[nxt]),
            "lambda_h": _c(spec.lam_h[nxt]),
            "is_dc": bool(is_dc[nxt]),
        }
    return out


def spectral_audit(
    w_v_LxDxD: np.ndarray,
    w_o_LxDxD: np.ndarray,
    gain_LxD: np.ndarray,
    att_LxHxTxT: np.ndarray,
    *,
    alpha: float = 1.0,
    heads: bool = True,
    tol: float = 1e-6,
) -> list[dict]:
    """Per-layer (and per-head) spectra and predictions; one dict per layer, "layer" 1-based.

    w_v, w_o: x @ W convention (H = W_V W_O); gain: the LN gain preceding each attention branch (ones if
    none); att: the batch-averaged attention of each layer and head; alpha: the skip scale (DeepNorm).
    """
    w_v = np.asarray(w_v_LxDxD, np.float64)
    w_o = np.asarray(w_o_LxDxD, np.float64)
    gain = np.asarray(gain_LxD, np.float64)
    att = np.asarray(att_LxHxTxT, np.float64)
    n_layers, d, _ = w_v.shape
    n_heads = att.shape[1]
    k = d // n_heads
    with _one_blas_thread():
        return [_layer_audit(l, w_v, w_o, gain, att, k, alpha, heads, tol) for l in range(n_layers)]


def _layer_audit(l, w_v, w_o, gain, att, k, alpha, heads, tol) -> dict:
    """One layer of `spectral_audit` (arrays already float64)."""
    n_heads = att.shape[1]
    h_DxD = w_v[l] @ w_o[l]
    # diag(gamma) H: LN(x) = x_hat diag(gamma), so the branch computes x_hat diag(gamma) W_V W_O.
    hg_DxD = gain[l][:, None] * h_DxD
    a_TxT = row_stochastic(att[l].mean(axis=0))  # average over heads (inputs already averaged)
    pred = theory.predict(a_TxT, h_DxD / alpha, tol)
    pred_g = theory.predict(a_TxT, hg_DxD / alpha, tol)
    # Reuse the eigen-decompositions predict made (eigenvalues of H / alpha, scaled back).
    entry = {"layer": l + 1, **eig_summary(pred.spectrum.eigvals_h * alpha)}
    entry["predicted_regime"] = pred.regime
    entry["predicted_effect"] = "smooth" if pred.dc_dominant else "sharpen"
    entry["prediction"] = prediction_summary(pred, tol)
    entry["ln_folded"] = {
        **eig_summary(pred_g.spectrum.eigvals_h * alpha),
        "predicted_regime": pred_g.regime,
        "predicted_effect": "smooth" if pred_g.dc_dominant else "sharpen",
        "prediction": prediction_summary(pred_g, tol),
    }
    if heads:
        entry["heads"] = []
        for h in range(n_heads):
            cols = slice(h * k, (h + 1) * k)
            # Nonzero eigenvalues of W_V[:, h] W_O[h, :] (D x D, rank <= k) = eig(W_O[h, :] W_V[:, h]).
            m_KxK = w_o[l][cols, :] @ w_v[l][:, cols]
            mg_KxK = w_o[l][cols, :] @ (gain[l][:, None] * w_v[l][:, cols])
            a_h = row_stochastic(att[l, h])
            p_h = theory.predict(a_h, m_KxK / alpha, tol)
            head = {"head": h, **eig_summary(p_h.spectrum.eigvals_h * alpha, with_values=False)}
            head["predicted_regime"] = p_h.regime
            head["predicted_effect"] = "smooth" if p_h.dc_dominant else "sharpen"
            head["prediction"] = prediction_summary(p_h, tol)
            head["ln_folded"] = eig_summary(np.linalg.eigvals(mg_KxK), with_values=False)
            entry["heads"].append(head)
    return entry
