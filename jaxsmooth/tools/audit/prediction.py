"""Theory predictions per layer and per head: `theory.predict` on the measured attention and the layer's
(or head's) value-output map, summarised as JSON-able dicts."""

from __future__ import annotations

import math

import numpy as np

from jaxsmooth import theory
from jaxsmooth.tools.audit.spectra import complex_pair, eig_summary, one_blas_thread, row_stochastic


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
        "dominant_mu": [complex_pair(z) for z in pred.dominant_mu[:8]],
        "dominant_lambda_a": [complex_pair(z) for z in pred.dominant_lambda_a[:8]],
        "dominant_lambda_h": [complex_pair(z) for z in pred.dominant_lambda_h[:8]],
    }
    if nxt < spec.mu.size:
        out["runner_up"] = {
            "mu": complex_pair(spec.mu[nxt]),
            "lambda_a": complex_pair(spec.lam_a[nxt]),
            "lambda_h": complex_pair(spec.lam_h[nxt]),
            "is_dc": bool(is_dc[nxt]),
        }
    return out


def fold_description(residual: str, value_norm: str, alpha: float = 1.0) -> str:
    """Which effective map `theory.effective_update` builds for this block type, in words."""
    if residual == "pre_ln":
        if value_norm == "ln":
            return "C diag(g) H (pre-LN, value path reads LN)"
        return "H (value path reads x/rms(x))"
    return (
        f"H / alpha, alpha = {alpha:g} ({'post-LN' if residual == 'post_ln' else 'DeepNorm'}: the LN gain "
        "multiplies skip and branch alike, not folded)"
    )


def spectral_audit(
    w_v_LxDxD: np.ndarray,
    w_o_LxDxD: np.ndarray,
    gain_LxD: np.ndarray,
    att_LxHxTxT: np.ndarray,
    *,
    residual: str,
    value_norm: str,
    alpha: float = 1.0,
    heads: bool = True,
    tol: float = 1e-6,
) -> list[dict]:
    """Per-layer (and per-head) spectra and predictions; one dict per layer, "layer" 1-based.

    Each layer's prediction is `theory.predict(A_l, M_l)` with M_l = `theory.effective_update(H_l, g_l,
    residual, alpha, value_norm=value_norm)`, the map the block's attention update really applies (see
    `fold_description`); the spectrum of H_l = W_V W_O itself is reported next to it.

    Args:
      w_v_LxDxD, w_o_LxDxD: value and output weights in the x @ W convention (H = W_V W_O).
      gain_LxD: the gain of the LayerNorm whose output the value path reads (pre-LN: the block's LN1);
        used only for residual="pre_ln" with value_norm="ln".
      att_LxHxTxT: the input-averaged attention of each layer and head.
      residual: "pre_ln" | "post_ln" | "deepnorm".
      value_norm: "ln" | "rms", what a pre-LN value path reads (ignored for the other residual types).
      alpha: DeepNorm's skip scale (1 otherwise).
      heads: include per-head entries.
      tol: tie tolerance of `theory.predict`.
    Returns:
      One dict per layer (keys: the `jaxsmooth.tools.audit` docstring).
    """
    w_v = np.asarray(w_v_LxDxD, np.float64)
    w_o = np.asarray(w_o_LxDxD, np.float64)
    gain = np.asarray(gain_LxD, np.float64)
    att = np.asarray(att_LxHxTxT, np.float64)
    n_layers, d, _ = w_v.shape
    n_heads = att.shape[1]
    k = d // n_heads
    fold = dict(residual=residual, value_norm=value_norm, alpha=alpha)
    with one_blas_thread():
        return [_layer_audit(l, w_v, w_o, gain, att, k, fold, heads, tol) for l in range(n_layers)]


def _effect(pred: theory.Prediction) -> str:
    return "smooth" if pred.dc_dominant else "sharpen"


def _head_map(w_v_DxD, w_o_DxD, gain_D, cols, residual, value_norm, alpha) -> np.ndarray:
    """k x k matrix whose eigenvalues are the nonzero ones of the head's effective D x D map.

    The head alone applies X -> X + A_h X M_h with M_h = W_V[:, h] W_O[h, :] folded like the layer
    (`theory.effective_update`): C diag(g) W_V[:, h] W_O[h, :] for pre-LN "ln", W_V[:, h] W_O[h, :] / alpha
    otherwise. M_h = P Q with P = (the folded) W_V[:, h] (D x k) and Q = W_O[h, :] (k x D) has rank <= k;
    its nonzero eigenvalues are those of Q P, and the value coordinates Z = X P follow Z -> Z + A_h Z Q P
    exactly, while the other D - k directions are left unchanged (mu = 1).
    """
    p_DxK = w_v_DxD[:, cols]
    if residual == "pre_ln" and value_norm == "ln":
        p_DxK = gain_D[:, None] * p_DxK
        p_DxK = p_DxK - p_DxK.mean(axis=0, keepdims=True)  # C diag(g) W_V[:, h]
    elif residual != "pre_ln":
        p_DxK = p_DxK / alpha
    return w_o_DxD[cols, :] @ p_DxK


def _layer_audit(l, w_v, w_o, gain, att, k, fold, heads, tol) -> dict:
    """One layer of `spectral_audit` (arrays already float64)."""
    residual, value_norm, alpha = fold["residual"], fold["value_norm"], fold["alpha"]
    n_heads = att.shape[1]
    h_DxD = w_v[l] @ w_o[l]
    m_DxD = theory.effective_update(h_DxD, gain[l], residual, alpha, value_norm=value_norm)
    a_TxT = row_stochastic(att[l].mean(axis=0))  # average over heads (inputs already averaged)
    pred = theory.predict(a_TxT, m_DxD, tol)
    folds_gain = residual == "pre_ln" and value_norm == "ln"
    if folds_gain:
        pred_h = theory.predict(a_TxT, h_DxD, tol)
        ev_h = pred_h.spectrum.eigvals_h
        ev_m = theory.effective_eigenvalues(m_DxD, residual, value_norm=value_norm)  # without C's zero
    else:  # M = H / alpha: one eigen-decomposition serves both (eigenvalues of H / alpha, scaled back)
        pred_h = pred
        ev_m = pred.spectrum.eigvals_h
        ev_h = ev_m * (alpha if residual != "pre_ln" else 1.0)
    entry = {"layer": l + 1, **eig_summary(ev_h)}
    entry["predicted_regime"] = pred.regime
    entry["predicted_effect"] = _effect(pred)
    entry["prediction"] = prediction_summary(pred, tol)
    entry["effective"] = {
        "fold": fold_description(residual, value_norm, alpha),
        **eig_summary(ev_m),
        "predicted_regime": pred.regime,
        "predicted_effect": _effect(pred),
    }
    # What H alone (/ alpha) would predict: differs from the above only where the gain is folded in.
    entry["h_alone"] = {
        "predicted_regime": pred_h.regime,
        "predicted_effect": _effect(pred_h),
        "hc_dc_rate": prediction_summary(pred_h, tol)["hc_dc_rate"],
    }
    if heads:
        entry["heads"] = []
        for h in range(n_heads):
            cols = slice(h * k, (h + 1) * k)
            a_h = row_stochastic(att[l, h])
            if n_heads == 1:  # k = D: the k x k map has C's structural zero; use the layer's maps
                p_h, ev_hh, ev_mh = pred, ev_h, ev_m
            else:
                m_KxK = _head_map(w_v[l], w_o[l], gain[l], cols, residual, value_norm, alpha)
                p_h = theory.predict(a_h, m_KxK, tol)
                ev_mh = p_h.spectrum.eigvals_h
                if folds_gain:
                    ev_hh = np.linalg.eigvals(w_o[l][cols, :] @ w_v[l][:, cols])
                else:
                    ev_hh = ev_mh * (alpha if residual != "pre_ln" else 1.0)
            head = {"head": h, **eig_summary(ev_hh, with_values=False)}
            head["predicted_regime"] = p_h.regime
            head["predicted_effect"] = _effect(p_h)
            head["prediction"] = prediction_summary(p_h, tol)
            head["effective"] = eig_summary(ev_mh, with_values=False)
            entry["heads"].append(head)
    return entry
