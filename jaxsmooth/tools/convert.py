"""Unconstrained attention weights -> spectral ones: the nearest H = W_V W_O inside a `Spectrum`.

    theta, psi, info = convert.nearest_spectral(h_DxD, jaxsmooth.Spectrum("sharpen"))
    layer = convert.from_attention(attn, Spectrum("smooth"), rngs=nnx.Rngs(0))   # Attention / nnx MHA
    model, report = convert.convert_model(vit, Spectrum("sharpen"))              # ViT, CausalLM, Transformer
    params, report = convert.convert_bert(bert_params, bert_cfg, Spectrum("sharpen"))  # jaxsmooth.tools.bert

Q and K (and their biases) are copied unchanged, so the converted layer attends exactly as the source
did; only the value / output map H = W_V W_O is replaced, by its nearest point in the Frobenius norm.

Orthogonal basis (H symmetric, the paper). For any symmetric X, <H, X>_F splits as <S, X>_F with
S = (H + H^T) / 2, because symmetric and skew-symmetric matrices are orthogonal in the Frobenius inner
product: ||H - X||^2 = ||S - X||^2 + ||K||^2 with K = (H - H^T) / 2. The target set
C = {X = X^T : spec(X) in [a, b]} = {X : a I <= X <= b I} is convex (an intersection of two shifted
cones of semidefinite matrices), and the Frobenius projection of S = Q diag(mu) Q^T onto it is
Q diag(clip(mu, a, b)) Q^T: for any X in C with sorted eigenvalues nu, ||S - X|| >= ||mu - nu||_2
(Hoffman-Wielandt for symmetric matrices) >= ||mu - clip(mu, a, b)||_2 (each nu_i lies in [a, b]), and
the bound is attained. So the nearest spectral H is that matrix, its relative error is
sqrt(||K||^2 + ||mu - clip(mu)||^2) / ||H||, and ||K|| / ||H|| is the error floor of any symmetric H.

General basis (V with cond(V) <= max_cond, real eigenvalues): the set is not convex and has no closed-form
projection. We start from the symmetric projection above (V orthogonal: cond 1, inside the set) and, if
`refine_steps` > 0, run that many Adam steps on ||H - W_V W_O||_F^2 over all the spectral parameters,
keeping the best iterate; the result is never worse than the symmetric start (`info` reports both).

Heads. H only fixes the sum of the per-head maps; which eigenvectors go to which head is free, and it
matters because every head has its own attention. With `head_maps` (default for layers and models) the
eigenpairs are assigned to heads (K = D / heads each) to minimise sum_h ||H_h - P_h||_F^2, where H_h is
the source head's map and P_h = sum_{j in h} lambda_j q_j q_j^T: sum_h ||P_h||^2 = sum_j lambda_j^2 does
not depend on the assignment, so this is the linear assignment problem max sum_j lambda_j q_j^T H_h(j) q_j
(solved exactly by scipy's Hungarian method).

Value / output biases add b_V W_O + b_O to every token (attention rows sum to 1): a DC term outside the
constraint. `value_bias=True` keeps it exactly (b_V := 0, b_O := b_V W_O + b_O); False drops it, and
`info["dc_norm"]` reports the norm of what was dropped.

`main(argv)` is the command line (`jaxsmooth convert SRC OUT --mode sharpen`, see `USAGE`).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxsmooth import spectral
from jaxsmooth.config import Spectrum

# Variables of an attention layer that hold the value / output map; every other variable is copied.
SOURCE_VALUE_VARS = ("w_v", "w_o", "b_v", "b_o", "theta", "theta_w", "theta_s", "psi")


def _check_h(h_DxD: Any) -> np.ndarray:
    h = np.asarray(h_DxD, np.float64)
    if h.ndim != 2 or h.shape[0] != h.shape[1] or h.shape[0] < 1:
        raise ValueError(f"H must be a square [D, D] matrix, got shape {h.shape}")
    if not np.all(np.isfinite(h)):
        raise ValueError("H has NaN or Inf entries; convert a model with finite weights")
    return h


def _check_spectrum(spectrum: Any) -> Spectrum:
    if not isinstance(spectrum, Spectrum):
        raise ValueError(f"spectrum must be a jaxsmooth.Spectrum, got {type(spectrum).__name__}")
    return spectrum


def _rel(num: float, den: float) -> float:
    return float(num / den) if den > 0 else 0.0


def assign_heads(q_DxD: np.ndarray, lam_D: np.ndarray, head_maps_HxDxD: np.ndarray) -> np.ndarray:
    """Column order of the eigenvectors that gives head h the eigenpairs best matching its source map.

    Minimises sum_h ||H_h - sum_{j in h} lambda_j q_j q_j^T||_F^2 with D / heads eigenpairs per head, an
    exact linear assignment (module docstring). Within a head, eigenpairs are ordered by lambda.

    Args:
      q_DxD: orthonormal eigenvectors (columns).
      lam_D: their eigenvalues.
      head_maps_HxDxD: the source's per-head maps H_h (they sum to H).
    Returns:
      perm_D: int indices; q[:, perm] puts head h's eigenvectors in columns h*K:(h+1)*K.
    """
    from scipy.optimize import linear_sum_assignment

    q, lam = np.asarray(q_DxD, np.float64), np.asarray(lam_D, np.float64)
    maps = np.asarray(head_maps_HxDxD, np.float64)
    n_heads, d = maps.shape[0], q.shape[0]
    if maps.shape[1:] != (d, d) or d % n_heads:
        raise ValueError(f"head maps {maps.shape} do not fit D={d} split into {n_heads} heads")
    k = d // n_heads
    gain_DxH = lam[:, None] * np.einsum("dj,hde,ej->jh", q, maps, q)  # lambda_j q_j^T H_h q_j
    rows, cols = linear_sum_assignment(-np.repeat(gain_DxH, k, axis=1))  # each head K times
    head_D = np.empty(d, np.int64)
    head_D[rows] = cols // k
    return np.lexsort((-lam, head_D))


def _head_error(w_v_DxD: np.ndarray, w_o_DxD: np.ndarray, maps_HxDxD: np.ndarray) -> float:
    """sqrt(sum_h ||H_h - W_V[:, h] W_O[h, :]||^2 / sum_h ||H_h||^2)."""
    ours = per_head_maps(w_v_DxD, w_o_DxD, maps_HxDxD.shape[0])
    return _rel(np.linalg.norm(maps_HxDxD - ours), np.linalg.norm(maps_HxDxD))


def nearest_spectral(
    h_DxD: Any,
    spectrum: Spectrum,
    alpha: float = 1.0,
    *,
    head_maps: Any = None,
    assign: bool = True,
    refine_steps: int = 0,
    refine_lr: float = 1e-2,
) -> tuple[spectral.Theta, jnp.ndarray, dict]:
    """Spectral parameters whose H = W_V W_O is the Frobenius-nearest point to `h_DxD` in the constraint.

    Orthogonal basis: exact (module docstring): eigen-decompose S = (H + H^T) / 2 in float64, clip its
    eigenvalues into `spectrum.closed_interval(alpha)`; theta = Q (times sqrt(D) for param_scale="unit",
    the scale that parameterisation initialises at; QR is scale-free), for which `spectral.orthogonal`
    returns Q itself (QR of an orthogonal matrix has R = I). General basis: that symmetric point, then
    `refine_steps` Adam steps (learning rate `refine_lr`) on the relative squared error, best iterate kept.

    Args:
      h_DxD: the source map H (any real square matrix).
      spectrum: the constraint (mode, interval, basis, bound, param_scale).
      alpha: DeepNorm's residual scale (the interval is alpha * [lo, hi]), as for `SpectralAttention`.
      head_maps: optional [heads, D, D] source per-head maps: eigenpairs are assigned to heads to match
        them (`assign_heads`) and info reports the per-head error.
      assign: False keeps eigh's order (ascending eigenvalues) even with head_maps.
      refine_steps: general basis only: Adam steps after the symmetric start (0: none).
      refine_lr: their learning rate. Measured on MiniLM (free mode, max_cond 10): layer 1, 200 steps:
        relative error 0.41 at 1e-3, 0.29 at 3e-3; layer 4, 500 steps: 0.245 at 3e-3, 0.215 at 1e-2,
        the error 1000 steps at 3e-3 also stop at.
    Returns:
      (theta, psi_D, info): theta a [D, D] array (orthogonal) or {"u", "w", "s"} (general), float32;
      info (floats): rel_error ||H - H_spec||_F / ||H||_F of the float64 projection; rel_error_composed,
      the same for the H that `spectral.compose` builds from the returned float32 parameters (what a
      layer applies); rel_error_symmetric (the symmetric start, = rel_error for the orthogonal basis);
      skew_floor = ||K|| / ||H||; sym_fraction / skew_fraction = ||S||^2 / ||H||^2, ||K||^2 / ||H||^2;
      frac_clipped (eigenvalues of S outside the interval); sym_eig_min / sym_eig_max (of S, before
      clipping); lam_min / lam_max (of H_spec); head_rel_error when head_maps is given; refine_steps.
    """
    spectrum = _check_spectrum(spectrum)
    h = _check_h(h_DxD)
    if not (isinstance(refine_steps, int) and refine_steps >= 0):
        raise ValueError(f"refine_steps={refine_steps!r} must be an int >= 0")
    if refine_steps and spectrum.basis != "general":
        raise ValueError("refine_steps applies to basis='general' only (the orthogonal projection is exact)")
    interval = spectrum.closed_interval(alpha)
    mu, q, lam = symmetric_projection(h, interval)
    maps = None if head_maps is None else np.asarray(head_maps, np.float64)
    if maps is not None and assign:
        perm = assign_heads(q, lam, maps)
        q, lam, mu = q[:, perm], lam[perm], mu[perm]
    h_sym = (q * lam[None, :]) @ q.T
    theta, psi = _spectral_parameters(q, lam, spectrum, alpha)
    info = {**projection_info(h, h_sym, mu, interval), "refine_steps": refine_steps}
    if refine_steps:
        theta, psi = _refine(h, theta, psi, spectrum, alpha, refine_steps, refine_lr)
    w_v, w_o = spectral.value_projection(theta, psi, spectrum, alpha)
    w_v, w_o = np.asarray(w_v, np.float64), np.asarray(w_o, np.float64)
    h_comp = w_v @ w_o
    h_spec = h_comp if refine_steps else h_sym  # the refined point exists only as float32 parameters
    lam_spec = np.asarray(spectral.eigenvalues(psi, spectrum, alpha), np.float64)
    norm_h = np.linalg.norm(h)
    info.update(
        rel_error=_rel(np.linalg.norm(h - h_spec), norm_h),
        rel_error_composed=_rel(np.linalg.norm(h - h_comp), norm_h),
        lam_min=float(lam_spec.min()),
        lam_max=float(lam_spec.max()),
    )
    if maps is not None:
        info["head_rel_error"] = _head_error(w_v, w_o, maps)
    return theta, psi, info


def symmetric_projection(h_DxD: np.ndarray, interval: tuple[float, float]) -> tuple[np.ndarray, ...]:
    """The Frobenius-nearest symmetric matrix to H with every eigenvalue in [a, b] (module docstring).

    Args:
      h_DxD: H, float64.
      interval: (a, b).
    Returns:
      (mu_D, q_DxD, lam_D): the eigenvalues (ascending) and orthonormal eigenvectors (columns) of
      S = (H + H^T) / 2, and lam = clip(mu, a, b); the projection is q diag(lam) q^T.
    """
    mu, q = np.linalg.eigh((h_DxD + h_DxD.T) / 2)
    return mu, q, np.clip(mu, *interval)


def projection_info(h_DxD: np.ndarray, h_sym_DxD: np.ndarray, mu_D: np.ndarray, interval) -> dict:
    """What the symmetric projection h_sym of H kept and lost (`nearest_spectral`'s info, first part).

    Args:
      h_DxD: H, float64.
      h_sym_DxD: its symmetric projection (`symmetric_projection`).
      mu_D: the eigenvalues of S = (H + H^T) / 2 before clipping.
      interval: the (a, b) they were clipped to.
    Returns:
      {rel_error_symmetric, skew_floor, sym_fraction, skew_fraction, frac_clipped, sym_eig_min,
      sym_eig_max} (floats).
    """
    sym, skew = (h_DxD + h_DxD.T) / 2, (h_DxD - h_DxD.T) / 2
    norm_h = np.linalg.norm(h_DxD)
    a, b = interval
    return {
        "rel_error_symmetric": _rel(np.linalg.norm(h_DxD - h_sym_DxD), norm_h),
        "skew_floor": _rel(np.linalg.norm(skew), norm_h),
        "sym_fraction": _rel(np.linalg.norm(sym) ** 2, norm_h**2),
        "skew_fraction": _rel(np.linalg.norm(skew) ** 2, norm_h**2),
        "frac_clipped": float(np.mean((mu_D < a) | (mu_D > b))),
        "sym_eig_min": float(mu_D.min()),
        "sym_eig_max": float(mu_D.max()),
    }


def _spectral_parameters(q_DxD: np.ndarray, lam_D: np.ndarray, spectrum: Spectrum, alpha: float):
    """(theta, psi_D), float32, that compose to q diag(lam) q^T: theta = Q (times sqrt(D) for
    param_scale="unit"; QR is scale-free), psi the inverse of the eigenvalue map at lam."""
    d = q_DxD.shape[0]
    scale = 1.0 if spectrum.param_scale == "width" else math.sqrt(d)
    psi = spectral.eigenvalues_inverse(jnp.asarray(lam_D, jnp.float32), spectrum, alpha)
    q32 = jnp.asarray(q_DxD * scale, jnp.float32)
    if spectrum.basis == "orthogonal":
        theta: spectral.Theta = q32
    else:  # V = Q(u) diag(sigma) Q(w)^T = Q with u = Q, w = I, s = 0 (sigma = 1)
        theta = {"u": q32, "w": jnp.eye(d, dtype=jnp.float32) * scale, "s": jnp.zeros((d,), jnp.float32)}
    return theta, psi


def _refine(h, theta, psi, spectrum, alpha, steps, lr):
    """Adam on ||H - compose(theta, psi)||^2 / ||H||^2 from the given start; the best iterate is kept."""
    return _refine_jit(jnp.asarray(h, jnp.float32), (theta, psi), spectrum, float(alpha), steps, float(lr))


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5))
def _refine_jit(h32, params, spectrum, alpha, steps, lr):
    import optax

    den = jnp.maximum(jnp.sum(jnp.square(h32)), 1e-30)
    loss = lambda p: jnp.sum(jnp.square(h32 - spectral.compose(p[0], p[1], spectrum, alpha))) / den
    tx = optax.adam(lr)

    def step(carry, _):
        p, opt, best, best_loss = carry
        value, grad = jax.value_and_grad(loss)(p)
        better = value < best_loss
        best = jax.tree.map(lambda x, y: jnp.where(better, x, y), p, best)
        best_loss = jnp.where(better, value, best_loss)
        upd, opt = tx.update(grad, opt, p)
        return (optax.apply_updates(p, upd), opt, best, best_loss), None

    carry = (params, tx.init(params), params, jnp.asarray(jnp.inf, jnp.float32))
    (p, _, best, best_loss), _ = jax.lax.scan(step, carry, None, length=steps)
    last_better = loss(p) < best_loss  # the final iterate was never evaluated inside the scan
    return jax.tree.map(lambda x, y: jnp.where(last_better, x, y), p, best)


# ------------------------------------------------------------------------------------------- layers


def _mha_weights(layer: nnx.MultiHeadAttention) -> dict:
    """Q/K/V/O weights of a Flax MultiHeadAttention as [D, D] matrices and [D] biases (or None)."""
    d = layer.in_features
    problems = []
    if not (layer.qkv_features == layer.out_features == layer.in_kv_features == d):
        problems.append(
            f"in/qkv/out/in_kv features {d}/{layer.qkv_features}/{layer.out_features}/"
            f"{layer.in_kv_features} differ (H = W_V W_O must be square)"
        )
    if layer.num_kv_heads != layer.num_heads:
        problems.append(f"grouped-query attention (num_kv_heads={layer.num_kv_heads})")
    if layer.normalize_qk:
        problems.append("normalize_qk=True (jaxsmooth attention has no Q/K LayerNorm)")
    if layer.attention_fn is not nnx.dot_product_attention:
        problems.append(f"a custom attention_fn ({getattr(layer.attention_fn, '__name__', '?')})")
    if problems:
        raise ValueError("cannot convert this nnx.MultiHeadAttention: " + "; ".join(problems))
    mat = lambda m: np.asarray(m.kernel[...]).reshape(d, d)
    bias = lambda m: None if m.bias is None else np.asarray(m.bias[...]).reshape(d)
    return {
        "w_q": mat(layer.query), "w_k": mat(layer.key), "w_v": mat(layer.value), "w_o": mat(layer.out),
        "b_q": bias(layer.query), "b_k": bias(layer.key), "b_v": bias(layer.value), "b_o": bias(layer.out),
        "dtype": layer.dtype, "param_dtype": layer.param_dtype, "branch_scale": "none",
        "fast_backward": True,
    }  # fmt: skip


def _own_weights(layer) -> dict:
    """The same dict for jaxsmooth's Attention / SpectralAttention (w_v, w_o: the composed maps)."""
    get = lambda v: None if v is None else np.asarray(v[...])
    w_v, w_o, b_v, b_o = layer.value_output()
    return {
        "w_q": get(layer.w_q), "w_k": get(layer.w_k), "w_v": np.asarray(w_v), "w_o": np.asarray(w_o),
        "b_q": get(layer.b_q), "b_k": get(layer.b_k), "b_v": get(b_v), "b_o": get(b_o),
        "dtype": layer.dtype, "param_dtype": layer.param_dtype, "branch_scale": layer.branch_scale,
        "fast_backward": layer.fast_backward,
    }  # fmt: skip


def _dc_term(b_v, w_o, b_o) -> np.ndarray | None:
    """b_V W_O + b_O: what the value / output biases add to every token (None if there are none)."""
    if b_v is None and b_o is None:
        return None
    d = np.asarray(w_o).shape[1]
    dc = np.zeros(d) if b_o is None else np.asarray(b_o, np.float64)
    return dc if b_v is None else dc + np.asarray(b_v, np.float64) @ np.asarray(w_o, np.float64)


def per_head_maps(w_v_DxD: np.ndarray, w_o_DxD: np.ndarray, n_heads: int) -> np.ndarray:
    """The per-head value / output maps H_h = W_V[:, h] W_O[h, :] ([heads, D, D]; they sum to W_V W_O)."""
    d = w_v_DxD.shape[0]
    k = d // n_heads
    return np.einsum("dhk,hke->hde", w_v_DxD.reshape(d, n_heads, k), w_o_DxD.reshape(n_heads, k, d))


def spectral_params(theta: spectral.Theta, psi: Any, basis: str, dc: np.ndarray | None) -> dict:
    """The value / output variables of a spectral attention layer (by name: theta[, theta_w, theta_s],
    psi, and with a kept DC term b_v := 0, b_o := dc; else b_v, b_o are None)."""
    new = {"psi": psi, "b_v": None if dc is None else np.zeros_like(dc), "b_o": dc}
    if basis == "orthogonal":
        new["theta"] = theta
    else:
        new.update(theta=theta["u"], theta_w=theta["w"], theta_s=theta["s"])
    return new


def _source_weights(layer: Any) -> dict:
    """`_mha_weights` or `_own_weights` of a layer from_attention converts; anything else is refused."""
    from jaxsmooth.nnx.layers import AttentionBase

    if isinstance(layer, nnx.MultiHeadAttention):
        return _mha_weights(layer)
    if isinstance(layer, AttentionBase):
        return _own_weights(layer)
    raise ValueError(
        "from_attention converts jaxsmooth.nnx.Attention / SpectralAttention or "
        f"flax.nnx.MultiHeadAttention, got {type(layer).__name__}"
    )


def _set_weights(new: Any, layer: Any, src: dict, values: dict) -> None:
    """Fill the new SpectralAttention: Q/K (and their biases) from the source's weights `src`, the value /
    output variables `values` (`spectral_params`; None: left as built), the source's branch scales."""
    put = lambda var, x: var.set_value(jnp.asarray(x, var.get_value().dtype))
    put(new.w_q, src["w_q"])
    put(new.w_k, src["w_k"])
    if src["b_q"] is not None:
        put(new.b_q, src["b_q"])
        put(new.b_k, src["b_k"])
    for name, value in values.items():
        if value is not None:
            put(getattr(new, name), value)
    for name in ("attn_scale", "s_dc", "s_hc"):  # branch scales of a jaxsmooth source
        if hasattr(layer, name) and hasattr(new, name):
            put(getattr(new, name), np.asarray(getattr(layer, name)[...]))


def from_attention(
    layer: Any,
    spectrum: Spectrum,
    *,
    rngs: nnx.Rngs,
    value_bias: bool = False,
    alpha: float = 1.0,
    assign: bool = True,
    refine_steps: int = 0,
    refine_lr: float = 1e-2,
    return_info: bool = False,
):
    """A `SpectralAttention` with the source's Q/K (and biases) and the nearest spectral H.

    Args:
      layer: `jaxsmooth.nnx.Attention` (or `SpectralAttention`, to change its constraint) or
        `flax.nnx.MultiHeadAttention` (square, no grouped-query attention, no normalize_qk, the default
        attention_fn; anything else is refused with the reason).
      spectrum: the target constraint.
      rngs: randomness for the new layer's construction (its parameters are then overwritten) and its
        dropout stream.
      value_bias: keep the DC term of the source's value / output biases exactly (b_V := 0,
        b_O := b_V W_O + b_O); False drops it (info["dc_norm"] says how large it was). True needs a
        source with such biases.
      alpha: DeepNorm's residual scale of the block the layer goes into (interval alpha * [lo, hi]).
      assign: assign eigenpairs to heads to match the source's per-head maps (`assign_heads`).
      refine_steps, refine_lr: general basis: Adam steps after the symmetric start (`nearest_spectral`).
      return_info: also return the projection info (`nearest_spectral`) plus "dc_norm" and "value_bias".
    Returns:
      the new layer, or (layer, info) with return_info.
    """
    from jaxsmooth.nnx.layers import SpectralAttention

    spectrum = _check_spectrum(spectrum)
    src = _source_weights(layer)
    d, n_heads = layer.in_features, layer.num_heads
    dc = _dc_term(src["b_v"], src["w_o"], src["b_o"])
    if value_bias and dc is None:
        raise ValueError("value_bias=True keeps the source's value / output biases, but it has none")
    if (src["b_q"] is None) != (src["b_k"] is None):
        raise ValueError("the source has a bias on only one of the Q and K projections; not supported")
    w_v, w_o = np.asarray(src["w_v"], np.float64), np.asarray(src["w_o"], np.float64)
    theta, psi, info = nearest_spectral(
        w_v @ w_o, spectrum, alpha, head_maps=per_head_maps(w_v, w_o, n_heads), assign=assign,
        refine_steps=refine_steps, refine_lr=refine_lr,
    )  # fmt: skip
    new = SpectralAttention(
        n_heads, d, spectrum=spectrum, dtype=src["dtype"], param_dtype=src["param_dtype"],
        broadcast_dropout=layer.broadcast_dropout, dropout_rate=layer.dropout_rate,
        deterministic=layer.deterministic, use_bias=src["b_q"] is not None, decode=layer.decode,
        rngs=rngs, value_bias=value_bias, alpha=alpha, branch_scale=src["branch_scale"],
        fast_backward=src["fast_backward"],
    )  # fmt: skip
    _set_weights(new, layer, src, spectral_params(theta, psi, spectrum.basis, dc if value_bias else None))
    if not return_info:
        return new
    info["dc_norm"] = 0.0 if dc is None else float(np.linalg.norm(dc))
    info["value_bias"] = "none" if dc is None else ("folded into b_o" if value_bias else "dropped")
    return new, info


# ------------------------------------------------------------------------------------------- models


def _rebuild(model, config):
    """An abstract (eval_shape) copy of `model` built from `config`; same class and task arguments."""
    from jaxsmooth.nnx import CausalLM, Transformer, ViT

    if isinstance(model, ViT):
        classes = model.head_w.get_value().shape[1]
        make = lambda: ViT(config, classes, model.image_shape, model.patch_size, rngs=nnx.Rngs(0))
    elif isinstance(model, CausalLM):
        make = lambda: CausalLM(config, model.vocab_size, model.max_len, rngs=nnx.Rngs(0))
    elif isinstance(model, Transformer):
        make = lambda: Transformer(config, causal=model.causal, rngs=nnx.Rngs(0))
    else:
        raise ValueError(
            f"convert_model converts jaxsmooth.nnx ViT, CausalLM or Transformer, got {type(model).__name__}"
        )
    return nnx.eval_shape(make)


def convert_model(
    model: Any,
    spectrum: Spectrum,
    *,
    value_bias: bool = False,
    assign: bool = True,
    refine_steps: int = 0,
    refine_lr: float = 1e-2,
) -> tuple[nnx.Module, dict]:
    """Every attention layer of a jaxsmooth model -> spectral attention (the nearest H per layer).

    Works on baseline models (W_V, W_O) and on spectral ones (re-projects their H into a new constraint).
    Every other variable (embeddings, Q/K, LayerNorms, MLPs, branch scales, head) is copied unchanged; a
    variable of the new model with no source, or a source variable left unused other than the value /
    output map, raises (so nothing is silently re-initialised or lost).

    Args:
      model: `jaxsmooth.nnx.ViT`, `CausalLM` or `Transformer`.
      spectrum: the target constraint; the model's config gets `spectrum` (and vo_bias=value_bias).
      value_bias: keep the value / output biases' DC term (b_V := 0, b_O := b_V W_O + b_O; the source
        must have vo_bias=True); False drops it.
      assign: assign eigenpairs to heads (`assign_heads`).
      refine_steps, refine_lr: general basis: Adam steps per layer after the symmetric start.
    Returns:
      (new_model, info): info["layers"] is a list with one `nearest_spectral` info dict per layer (plus
      "dc_norm"); info["copied"] / info["replaced"] list the variable paths copied / replaced.
    """
    from jaxsmooth.nnx import Transformer

    spectrum = _check_spectrum(spectrum)
    stack = model if isinstance(model, Transformer) else getattr(model, "transformer", None)
    if not isinstance(stack, Transformer):
        raise ValueError(
            f"convert_model converts jaxsmooth.nnx ViT, CausalLM or Transformer, got {type(model).__name__}"
        )
    cfg = stack.config
    if value_bias and not cfg.vo_bias:
        raise ValueError("value_bias=True keeps the source's value / output biases, but its vo_bias=False")
    alpha = cfg.alpha_beta[0]
    h_LxDxD = np.asarray(stack.effective_h(), np.float64)
    graphdef_l, state_l = nnx.split(stack.blocks)  # the [L]-stacked blocks, one layer per slice
    per_layer = lambda fn: jax.vmap(lambda s: fn(nnx.merge(graphdef_l, s).attn))(state_l)
    maps_LxHxDxD = np.asarray(per_layer(lambda a: a.head_maps()), np.float64)
    src_vo = per_layer(lambda a: a.value_output())
    new_model = _rebuild(model, dataclasses.replace(cfg, spectrum=spectrum, vo_bias=value_bias))
    new_layers, layers_info = [], []
    for i in range(cfg.depth):
        theta, psi, info = nearest_spectral(
            h_LxDxD[i], spectrum, alpha, head_maps=maps_LxHxDxD[i], assign=assign,
            refine_steps=refine_steps, refine_lr=refine_lr,
        )  # fmt: skip
        b_v, b_o = (None if a is None else np.asarray(a[i]) for a in src_vo[2:])
        dc = _dc_term(b_v, np.asarray(src_vo[1][i]), b_o)
        info["dc_norm"] = 0.0 if dc is None else float(np.linalg.norm(dc))
        new_layers.append(spectral_params(theta, psi, spectrum.basis, dc))
        layers_info.append(info)
    converted, copied, replaced = _transplant(model, new_model, new_layers)
    return converted, {"layers": layers_info, "copied": copied, "replaced": replaced}


def _is_value_var(path: tuple) -> bool:
    return len(path) >= 2 and path[-2] == "attn" and path[-1] in SOURCE_VALUE_VARS


def _transplant(model: Any, new_model: Any, new_layers: list[dict]) -> tuple[nnx.Module, list, list]:
    """`new_model` (abstract) filled: its attention value / output variables stacked from `new_layers`
    (one `spectral_params` dict per layer), every other variable copied from `model`. A variable with no
    source, a shape mismatch, or a source variable left unused raises ValueError.

    Returns:
      (the converted model, paths copied, paths replaced); paths as "a/b/c".
    """
    src_flat = {tuple(p): v for p, v in nnx.to_flat_state(nnx.state(model))}
    graphdef, state = nnx.split(new_model)
    copied, replaced = [], []
    for path, var in nnx.to_flat_state(state):
        path = tuple(path)
        want = var.get_value()
        if _is_value_var(path):
            value = np.stack([np.asarray(layer[path[-1]]) for layer in new_layers])
            replaced.append("/".join(map(str, path)))
        elif path in src_flat:
            value = src_flat[path].get_value()
            copied.append("/".join(map(str, path)))
        else:
            raise ValueError(f"the converted model has a variable {path} that the source lacks")
        if tuple(value.shape) != tuple(want.shape):
            raise ValueError(f"variable {path}: source shape {value.shape}, converted model {want.shape}")
        var.set_value(jnp.asarray(value, want.dtype))
    unused = [p for p in src_flat if not _is_value_var(p) and "/".join(map(str, p)) not in copied]
    if unused:
        raise ValueError(f"source variables {unused} have no place in the converted model")
    return nnx.merge(graphdef, state), copied, replaced


def convert_bert(
    params: dict,
    cfg: Any,
    spectrum: Spectrum | Sequence[Spectrum],
    *,
    value_bias: bool = True,
    assign: bool = True,
    refine_steps: int = 0,
    refine_lr: float = 1e-2,
) -> tuple[dict, list[dict]]:
    """`jaxsmooth.tools.bert` params with every layer's W_V, W_O replaced by the spectral projection of H.

    W_V := V diag(lambda), W_O := V^-1 (= V^T for the orthogonal basis), which compose to the projected
    H; the pure-JAX BERT forward runs unchanged. Q/K, LayerNorms and FFN are untouched. Heads take the
    eigenpairs `assign_heads` gives them (with assign=True).

    Args:
      params: the `jaxsmooth.tools.bert.load_bert` pytree.
      cfg: its `BertConfig`.
      spectrum: one constraint for all layers, or a sequence with one per layer (e.g. intervals scaled to
        each layer's own eigenvalues).
      value_bias: keep the biases' DC term b_V W_O + b_O exactly (b_V := 0, b_O := b_V W_O + b_O);
        default True, since the BERT forward always has its biases and dropping them would change two
        things at once. False zeroes b_V and b_O.
      assign, refine_steps, refine_lr: as for `nearest_spectral`.
    Returns:
      (new_params, infos): a new pytree (the input is not modified) and one info dict per layer.
    """
    from jaxsmooth.tools import bert

    n = cfg.num_hidden_layers
    specs = [spectrum] * n if isinstance(spectrum, Spectrum) else list(spectrum)
    if len(specs) != n:
        raise ValueError(f"got {len(specs)} spectra for {n} layers; pass one Spectrum or one per layer")
    specs = [_check_spectrum(s) for s in specs]
    w_v_all, w_o_all = (np.asarray(a, np.float64) for a in bert.value_output_matrices(params, cfg))
    maps_all = np.asarray(bert.per_head_value_output(params, cfg), np.float64)
    lay = params["layers"]
    b_v_all, b_o_all = np.asarray(lay["value"]["bias"]), np.asarray(lay["attn_out"]["bias"])
    new_v, new_o, new_bv, new_bo, infos = [], [], [], [], []
    for i, spec in enumerate(specs):
        theta, psi, info = nearest_spectral(
            w_v_all[i] @ w_o_all[i], spec, head_maps=maps_all[i], assign=assign,
            refine_steps=refine_steps, refine_lr=refine_lr,
        )  # fmt: skip
        w_v, w_o = spectral.value_projection(theta, psi, spec)
        dc = _dc_term(b_v_all[i], w_o_all[i], b_o_all[i])
        info["dc_norm"] = float(np.linalg.norm(dc))
        new_v.append(np.asarray(w_v))
        new_o.append(np.asarray(w_o))
        new_bv.append(np.zeros_like(b_v_all[i]))
        new_bo.append(dc if value_bias else np.zeros_like(dc))
        infos.append(info)
    stack = lambda xs: jnp.asarray(np.stack(xs), jnp.float32)
    layers = dict(lay)
    layers["value"] = {"kernel": stack(new_v), "bias": stack(new_bv)}
    layers["attn_out"] = {"kernel": stack(new_o), "bias": stack(new_bo)}
    return {**params, "layers": layers}, infos


# ------------------------------------------------------------------------------------------- command line

USAGE = """usage: jaxsmooth convert SRC OUT --mode MODE [options]

Convert every attention layer of SRC to spectral attention (the nearest H = W_V W_O in the constraint) and
write the converted model to OUT, which `jaxsmooth audit OUT` reads.

  SRC   a jaxsmooth run directory (config.json + checkpoints/), "minilm" (the installed
        all-MiniLM-L6-v2), or a Hugging Face BERT directory (config.json, model.safetensors)
  OUT   new directory: a run directory (config.json with model.spectrum set, one checkpoint with the
        converted parameters and a fresh optimiser state at SRC's step) or a BERT directory (config.json,
        model.safetensors with the new value / output weights, the tokenizer files)
  --mode sharpen|smooth|neutral|free   --lo X --hi Y (interval; default: the mode's)
  --basis orthogonal|general   --bound clip|smooth   --max-cond K   --refine-steps N (general basis)
  --value-bias keep|drop       keep (default for BERT) folds the value/output biases' DC term into b_O;
                               drop removes it (default for runs; keep needs a run with vo_bias)
  --no-assign                  keep eigh's eigenvector order instead of assigning eigenpairs to heads
  --step S                     run directories: the checkpoint step to convert (default: the newest)
  --json FILE                  write the per-layer projection report as JSON
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jaxsmooth convert", add_help=False)
    p.add_argument("src")
    p.add_argument("out")
    p.add_argument("--mode", required=True, choices=("sharpen", "smooth", "neutral", "free"))
    p.add_argument("--lo", type=float)
    p.add_argument("--hi", type=float)
    p.add_argument("--basis", default="orthogonal", choices=("orthogonal", "general"))
    p.add_argument("--bound", default="clip", choices=("clip", "smooth"))
    p.add_argument("--max-cond", type=float, default=10.0)
    p.add_argument("--refine-steps", type=int, default=0)
    p.add_argument("--value-bias", choices=("keep", "drop"))
    p.add_argument("--no-assign", action="store_true")
    p.add_argument("--step", type=int)
    p.add_argument("--json")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """The command line (see `USAGE`); returns the exit status (2 for usage errors, 1 for bad input)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or any(a in ("-h", "--help") for a in argv):
        print(USAGE)
        return 0
    parser = _parser()
    parser.error = lambda msg: (_ for _ in ()).throw(ValueError(msg))  # usage errors as ValueError
    try:
        args = parser.parse_args(argv)
        spectrum = Spectrum(mode=args.mode, lo=args.lo, hi=args.hi, basis=args.basis, bound=args.bound,
                            max_cond=args.max_cond)  # fmt: skip
    except ValueError as e:
        print(f"jaxsmooth convert: error: {e}\n\n{USAGE}", file=sys.stderr)
        return 2
    src, out = Path(args.src), Path(args.out)
    if out.exists() and any(out.iterdir()):
        print(f"jaxsmooth convert: error: {out} exists and is not empty; choose a new OUT", file=sys.stderr)
        return 1
    kw = dict(assign=not args.no_assign, refine_steps=args.refine_steps)
    try:
        if args.src == "minilm" or (src / "model.safetensors").is_file():
            infos = _convert_bert_dir(None if args.src == "minilm" else src, out, spectrum,
                                      value_bias=args.value_bias != "drop", **kw)  # fmt: skip
        elif (src / "config.json").is_file():
            infos = _convert_run_dir(
                src, out, spectrum, args.step, value_bias=args.value_bias == "keep", **kw
            )
        else:
            raise ValueError(
                f"{src} is neither a jaxsmooth run directory (config.json + checkpoints/) nor a BERT "
                "directory (config.json + model.safetensors), nor 'minilm'"
            )
    except (ValueError, FileNotFoundError) as e:
        print(f"jaxsmooth convert: error: {e}", file=sys.stderr)
        return 1
    print(f"converted {len(infos)} layers of {args.src} to {spectrum.mode} attention in {out}")
    print("layer  rel_error  skew_floor  frac_clipped  lambda range")
    for i, info in enumerate(infos):
        errs = f"{info['rel_error']:9.4f}  {info['skew_floor']:10.4f}  {info['frac_clipped']:12.3f}"
        print(f"{i + 1:5d}  {errs}  [{info['lam_min']:+.3g}, {info['lam_max']:+.3g}]")
    if args.json:
        Path(args.json).write_text(json.dumps({"spectrum": dataclasses.asdict(spectrum), "layers": infos},
                                              indent=2) + "\n")  # fmt: skip
    return 0


def _convert_bert_dir(src: Path | None, out: Path, spectrum: Spectrum, **kw) -> list[dict]:
    """A converted copy of a Hugging Face BERT directory (new value / output tensors, same tokenizer)."""
    from safetensors.numpy import load_file, save_file

    from jaxsmooth.tools import bert

    directory = bert.find_minilm() if src is None else src
    cfg, params = bert.load_bert(directory)
    new, infos = convert_bert(params, cfg, spectrum, **kw)
    tensors = load_file(str(directory / bert.WEIGHTS_FILE))
    prefix = bert.detect_prefix(list(tensors))
    lay = new["layers"]
    for i in range(cfg.num_hidden_layers):  # torch Linear layout: weight [out, in]
        for name, key in (("value", "attention.self.value"), ("attn_out", "attention.output.dense")):
            tensors[f"{prefix}encoder.layer.{i}.{key}.weight"] = np.asarray(lay[name]["kernel"][i]).T.copy()
            tensors[f"{prefix}encoder.layer.{i}.{key}.bias"] = np.asarray(lay[name]["bias"][i])
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / bert.WEIGHTS_FILE))
    for name in (bert.CONFIG_FILE, bert.TOKENIZER_FILE, "tokenizer_config.json", "vocab.txt",
                 "special_tokens_map.json"):  # fmt: skip
        if (directory / name).is_file():
            shutil.copy(directory / name, out / name)
    return infos


def _convert_run_dir(src: Path, out: Path, spectrum: Spectrum, step: int | None, **kw) -> list[dict]:
    """A converted copy of a jaxsmooth run: config.json with the new spectrum, one checkpoint."""
    from jaxsmooth.train import checkpoint, optim
    from jaxsmooth.train.state import load_run, new_state

    run = load_run(src, step)
    model, report = convert_model(run.model, spectrum, **kw)
    config = run.config
    config.model.spectrum = dataclasses.asdict(spectrum)
    config.model.vo_bias = bool(kw.get("value_bias", False))
    params = nnx.state(model, nnx.Param)
    tx = optim.make_optimizer(config.opt, params)
    # The trainer's state: a fresh optimiser state at the source's step.
    state = new_state(nnx.to_pure_dict(params), tx, seed=config.train.seed, step=run.step)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(config.to_json_best_effort(indent=2) + "\n")
    ckpt = checkpoint.Checkpoints(out, max_to_keep=None)
    try:
        ckpt.save(run.step, state)
    finally:
        ckpt.close()
    return report["layers"]


if __name__ == "__main__":
    raise SystemExit(main())
