"""Pure functions for one attention layer, shared by the Flax NNX and Linen modules.

Letters (used in names and einsum strings throughout jaxsmooth):
    B batch, T query tokens, S key tokens, D width, H heads, K head width (D = H K), M MLP width, L layers.

One residual attention layer is X + A X H with H = W_V W_O (PAPER.md section 1); here A is
softmax(Q K^T / sqrt(K)) per head and head h applies columns h*K:(h+1)*K of W_V and the same rows of W_O.
Logits, softmax and LayerNorm statistics are computed in float32 whatever the compute dtype.

Saved activations. The block stack (`jaxsmooth.nnx.transformer`) runs each layer under `jax.checkpoint`
with the `dots_saveable` policy: the backward pass keeps the matmul outputs (Q/K/V, logits, A V, both
branch outputs, the MLP pre-activation) and recomputes the elementwise work (LayerNorm, softmax, GELU).
On XLA:CPU every saved [L, ...] stack is a freshly mapped buffer each step (page faults) plus a copy into
and out of the scan, so saving less is faster, not only smaller (experiments/benchmarks/README.md).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

_NEG = -1e30  # additive mask value; finite so fully-masked rows give a uniform row, not NaN


def layer_norm(
    x_BxTxD: jnp.ndarray, gain_D: jnp.ndarray, bias_D: jnp.ndarray, *, eps: float, positive: bool = False
) -> jnp.ndarray:
    """LN over features with float32 statistics. positive=True uses softplus(gain) > 0 as the gain, so the
    effective attention map diag(gain) H keeps the eigenvalue signs of a symmetric H (Sylvester's law of
    inertia; a negative gain would flip them, PAPER.md section 1)."""
    x32 = x_BxTxD.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    gain = effective_gain(gain_D, positive)
    y = (x32 - mean) * jax.lax.rsqrt(var + eps) * gain[None, None, :] + bias_D[None, None, :]
    return y.astype(x_BxTxD.dtype)


def rms_normalize(x_BxTxD: jnp.ndarray, *, eps: float) -> jnp.ndarray:
    """x / rms(x) per token (float32 statistics), with no centring and no parameters: a positive per-token
    scale, so a value path that reads it applies exactly W_V W_O (docs/theory.md)."""
    x32 = x_BxTxD.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
    return y.astype(x_BxTxD.dtype)


def effective_gain(gain_D: jnp.ndarray, positive: bool) -> jnp.ndarray:
    g = gain_D.astype(jnp.float32)
    return jax.nn.softplus(g) if positive else g


def dropout(x: jnp.ndarray, rate: float, key: jax.Array | None) -> jnp.ndarray:
    """Inverted dropout; the identity when key is None (deterministic) or rate == 0."""
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def allowed_keys(
    batch: int, t: int, s: int, *, mask_BxS: jnp.ndarray | None, causal: bool
) -> jnp.ndarray | None:
    """Boolean [B, 1, T, S] of which keys each query may attend to (None: all)."""
    allowed = None
    if causal:
        allowed = jnp.tril(jnp.ones((t, s), jnp.bool_))[None, None, :, :]
    if mask_BxS is not None:
        keys = mask_BxS.astype(jnp.bool_)[:, None, None, :]
        allowed = keys if allowed is None else jnp.logical_and(allowed, keys)
    if allowed is not None:
        allowed = jnp.broadcast_to(allowed, (batch, 1, t, s))
    return allowed


def attention_weights(
    q_BxTxHxK: jnp.ndarray, k_BxSxHxK: jnp.ndarray, allowed_Bx1xTxS: jnp.ndarray | None
) -> jnp.ndarray:
    """A = softmax(Q K^T / sqrt(K)) per head, float32 [B, H, T, S]; rows sum to one over allowed keys."""
    return _attention_weights_bh(
        q_BxTxHxK.transpose(0, 2, 1, 3), k_BxSxHxK.transpose(0, 2, 1, 3), allowed_Bx1xTxS
    )


def _attention_weights_bh(
    q_BxHxTxK: jnp.ndarray, k_BxHxSxK: jnp.ndarray, allowed_Bx1xTxS: jnp.ndarray | None
) -> jnp.ndarray:
    """`attention_weights` for heads-major inputs [B, H, T, K]."""
    scale = 1.0 / jnp.sqrt(jnp.float32(q_BxHxTxK.shape[-1]))
    logits = jnp.einsum("BHTK,BHSK->BHTS", q_BxHxTxK, k_BxHxSxK, preferred_element_type=jnp.float32)
    logits = logits * scale
    if allowed_Bx1xTxS is not None:
        logits = jnp.where(allowed_Bx1xTxS, logits, _NEG)
    return jax.nn.softmax(logits, axis=-1)


def attn_scale(
    att_BxHxTxS: jnp.ndarray, w_H: jnp.ndarray, allowed_Bx1xTxS: jnp.ndarray | None
) -> jnp.ndarray:
    """AttnScale (Wang et al. 2022): A' = A_DC + (1 + w_h)(A - A_DC), A_DC the uniform attention.

    A_DC = 1 1^T / n for bidirectional attention; with a causal or padding mask we use the uniform
    distribution over each query's allowed keys (our generalisation; it keeps A' causal)."""
    if allowed_Bx1xTxS is None:
        a_dc = jnp.full_like(att_BxHxTxS, 1.0 / att_BxHxTxS.shape[-1])
    else:
        allowed = allowed_Bx1xTxS.astype(jnp.float32)
        a_dc = allowed / jnp.maximum(jnp.sum(allowed, axis=-1, keepdims=True), 1.0)
    return a_dc + (1.0 + w_H.astype(jnp.float32))[None, :, None, None] * (att_BxHxTxS - a_dc)


def feat_scale(
    y_BxTxD: jnp.ndarray, s_dc_D: jnp.ndarray, s_hc_D: jnp.ndarray, *, causal: bool
) -> jnp.ndarray:
    """FeatScale (Wang et al. 2022): Y' = Y + s_dc * DC[Y] + s_hc * (Y - DC[Y]), per-channel s.

    DC[Y] is the token mean; for causal models the running (prefix) mean, so no token sees the future."""
    y32 = y_BxTxD.astype(jnp.float32)
    if causal:
        count_T = jnp.arange(1, y32.shape[1] + 1, dtype=jnp.float32)
        dc = jnp.cumsum(y32, axis=1) / count_T[None, :, None]
    else:
        dc = jnp.mean(y32, axis=1, keepdims=True)
    out = y32 + s_dc_D[None, None, :] * dc + s_hc_D[None, None, :] * (y32 - dc)
    return out.astype(y_BxTxD.dtype)


def multihead_attention(
    x_BxTxD: jnp.ndarray,
    w_q_DxD: jnp.ndarray,
    w_k_DxD: jnp.ndarray,
    w_v_DxD: jnp.ndarray,
    w_o_DxD: jnp.ndarray,
    *,
    num_heads: int,
    b_q_D: jnp.ndarray | None = None,
    b_k_D: jnp.ndarray | None = None,
    b_v_D: jnp.ndarray | None = None,
    b_o_D: jnp.ndarray | None = None,
    mask_BxS: jnp.ndarray | None = None,
    causal: bool = False,
    attn_scale_H: jnp.ndarray | None = None,
    dropout_rate: float = 0.0,
    dropout_key: jax.Array | None = None,
    dtype: jnp.dtype | None = None,
    fast_backward: bool = True,
    v_in_BxTxD: jnp.ndarray | None = None,
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Self-attention y = concat_h(A_h X W_V[:, h]) W_O (+ biases). Returns (y_BxTxD, att_BxHxTxT).

    v_in_BxTxD: what the value projection reads (default x_BxTxD): a pre-LN block with
    value_norm="rms" passes x / rms(x) here while Q and K read LN(x).

    Matmuls run in `dtype` (default: x's dtype); attention logits and softmax in float32.
    fast_backward: the four projections use `dense` (a backward pass laid out for XLA:CPU; reverse mode
    only); False uses plain matmuls, which forward-mode autodiff (jax.jvp, jax.jacfwd) can go through.
    """
    b, t, d = x_BxTxD.shape
    if d % num_heads:
        raise ValueError(f"num_heads={num_heads} must divide the width D={d}")
    for name, w in (("w_q", w_q_DxD), ("w_k", w_k_DxD), ("w_v", w_v_DxD), ("w_o", w_o_DxD)):
        if w.shape != (d, d):
            raise ValueError(f"{name} has shape {w.shape}; expected ({d}, {d}) for input width {d}")
    if mask_BxS is not None and mask_BxS.shape != (b, t):
        raise ValueError(f"mask has shape {mask_BxS.shape}; expected (B, T) = {(b, t)}")
    dtype = dtype or x_BxTxD.dtype
    k_dim = d // num_heads
    x = x_BxTxD.astype(dtype)
    x_v = x if v_in_BxTxD is None else v_in_BxTxD.astype(dtype)
    if x_v.shape != x.shape:
        raise ValueError(f"v_in has shape {x_v.shape}; expected the query input's {x.shape}")
    matmul = dense if fast_backward else jnp.matmul

    def project(w_DxD, b_D, x=x):  # -> heads-major [B, H, T, K]
        y_BxTxD = matmul(x, w_DxD.astype(dtype))
        if b_D is not None:
            y_BxTxD = y_BxTxD + b_D.astype(dtype)[None, None, :]
        return y_BxTxD.reshape(b, t, num_heads, k_dim).transpose(0, 2, 1, 3)

    # Heads-major layout, so both attention matmuls are plain batched matmuls over (B, H): contracting the
    # [B, T, H, K] layout directly made XLA:CPU run them ~5x below its matmul rate. (One fused [D, 3D]
    # Q/K/V matmul was tried too: its forward is a little faster, its backward ~2x slower on XLA:CPU.)
    q_BxHxTxK, k_BxHxSxK, v_BxHxSxK = (
        project(w_q_DxD, b_q_D),
        project(w_k_DxD, b_k_D),
        project(w_v_DxD, b_v_D, x_v),
    )
    allowed = allowed_keys(b, t, t, mask_BxS=mask_BxS, causal=causal)
    att_BxHxTxS = _attention_weights_bh(q_BxHxTxK, k_BxHxSxK, allowed)
    if attn_scale_H is not None:
        att_BxHxTxS = attn_scale(att_BxHxTxS, attn_scale_H, allowed)
    att_used = dropout(att_BxHxTxS, dropout_rate, dropout_key).astype(dtype)
    z_BxHxTxK = jnp.einsum("BHTS,BHSK->BHTK", att_used, v_BxHxSxK)
    z_BxTxD = z_BxHxTxK.transpose(0, 2, 1, 3).reshape(b, t, d)
    y_BxTxD = matmul(z_BxTxD, w_o_DxD.astype(dtype))
    if b_o_D is not None:
        y_BxTxD = y_BxTxD + b_o_D.astype(dtype)[None, None, :]
    return y_BxTxD, att_BxHxTxS


def mlp(
    x_BxTxD: jnp.ndarray,
    w1_DxM: jnp.ndarray,
    b1_M: jnp.ndarray,
    w2_MxD: jnp.ndarray,
    b2_D: jnp.ndarray,
    *,
    dtype: jnp.dtype | None = None,
    fast_backward: bool = True,
) -> jnp.ndarray:
    """The position-wise MLP: GELU (exact, erf) between two dense layers (`fast_backward`: as in
    `multihead_attention`)."""
    dtype = dtype or x_BxTxD.dtype
    matmul = dense if fast_backward else jnp.matmul
    h_BxTxM = matmul(x_BxTxD.astype(dtype), w1_DxM.astype(dtype)) + b1_M.astype(dtype)[None, None, :]
    h_BxTxM = gelu(h_BxTxM)
    return matmul(h_BxTxM, w2_MxD.astype(dtype)) + b2_D.astype(dtype)[None, None, :]


@jax.custom_vjp
def dense(x_NxI: jnp.ndarray, w_IxO: jnp.ndarray) -> jnp.ndarray:
    """x @ w over the last axis of x, with a backward pass laid out for XLA:CPU (same values as autodiff).

    Autodiff writes the weight gradient as x^T g, contracting the token axis, which is the major axis of
    both operands; XLA:CPU then transposes one of them with a slow strided copy, and for the MLP it picks
    the large [N, M] one (~10 ms per ViT-Tiny layer, longer than the matmul itself). Here the backward
    transposes the narrower of x and g, and W itself for the input gradient, each behind an
    `optimization_barrier` so the simplifier cannot fold the transpose back into the dot: every backward
    matmul is then a plain row-major [N, K] x [K, J] product. On other backends this costs a small copy.
    """
    return x_NxI @ w_IxO


def _dense_fwd(x_NxI, w_IxO):
    return x_NxI @ w_IxO, (x_NxI, w_IxO)


def _dense_bwd(res, g_NxO):
    x_NxI, w_IxO = res
    i, o = w_IxO.shape
    x2, g2 = x_NxI.reshape(-1, i), g_NxO.reshape(-1, o)
    dx = (g2 @ jax.lax.optimization_barrier(w_IxO.T)).reshape(x_NxI.shape)
    if i <= o:
        dw = jax.lax.optimization_barrier(x2.T) @ g2
    else:
        dw = (jax.lax.optimization_barrier(g2.T) @ x2).T
    return dx.astype(x_NxI.dtype), dw.astype(w_IxO.dtype)


dense.defvjp(_dense_fwd, _dense_bwd)


_INV_SQRT2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


@jax.custom_jvp
def gelu(x: jnp.ndarray) -> jnp.ndarray:
    """Exact GELU, x Phi(x) = x (1 + erf(x / sqrt 2)) / 2 (the formula torch uses).

    Written with erf rather than `jax.nn.gelu(approximate=False)`, which uses erfc: XLA:CPU expands erfc
    into an exp plus a rational approximation, about 3x the cost of its erf polynomial (~4 ms vs ~1.3 ms
    per ViT-Tiny layer, run once forward and once more when the backward recomputes it); the two differ
    by < 1e-6 absolute. The derivative Phi(x) + x phi(x) is written out so it costs one fused pass.
    """
    return x * (0.5 + 0.5 * jax.lax.erf(x * _INV_SQRT2))


@gelu.defjvp
def _gelu_jvp(primals, tangents):
    (x,), (dx,) = primals, tangents
    cdf = 0.5 + 0.5 * jax.lax.erf(x * _INV_SQRT2)
    pdf = jnp.exp(-0.5 * x * x) * _INV_SQRT_2PI
    return x * cdf, dx * (cdf + x * pdf)
