"""Pure functions for one attention layer, shared by the Flax NNX and Linen modules.

Letters (used in names and einsum strings throughout jaxsmooth):
    B batch, T query tokens, S key tokens, D width, H heads, K head width (D = H K), M MLP width, L layers.

One residual attention layer is X + A X H with H = W_V W_O (docs/theory.md section 1); here A is
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
    """LN over features with float32 statistics.

    A pre-LN value path that reads this output applies C diag(gain) H, whose signs a negative gain flips
    and which even positive unequal gains do not keep (docs/theory.md section 2); value_norm="rms" avoids
    it.

    Args:
      x_BxTxD: the input, any float dtype.
      gain_D: the gain (raw parameter; see positive).
      bias_D: the bias.
      eps: added to the variance.
      positive: use softplus(gain) > 0 as the gain (`effective_gain`).

    Returns:
      (x - mean) / sqrt(var + eps) * gain + bias, [B, T, D] in x's dtype.
    """
    x32 = x_BxTxD.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    gain = effective_gain(gain_D, positive)
    y = (x32 - mean) * jax.lax.rsqrt(var + eps) * gain[None, None, :] + bias_D[None, None, :]
    return y.astype(x_BxTxD.dtype)


def rms_normalize(x_BxTxD: jnp.ndarray, *, eps: float) -> jnp.ndarray:
    """x / rms(x) per token (float32 statistics), with no centring and no parameters.

    A positive per-token scale, so a value path that reads it applies exactly W_V W_O (docs/theory.md).

    Args:
      x_BxTxD: the input, any float dtype.
      eps: added to the mean square.

    Returns:
      x / sqrt(mean(x^2) + eps) over features, [B, T, D] in x's dtype.
    """
    x32 = x_BxTxD.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
    return y.astype(x_BxTxD.dtype)


def effective_gain(gain_D: jnp.ndarray, positive: bool) -> jnp.ndarray:
    """The gain a LayerNorm applies, from its parameter.

    Args:
      gain_D: the gain parameter.
      positive: ln_gain="positive": the gain is softplus(gain_D) > 0; else gain_D itself.

    Returns:
      The gain [D], float32.
    """
    g = gain_D.astype(jnp.float32)
    return jax.nn.softplus(g) if positive else g


def dropout(x: jnp.ndarray, rate: float, key: jax.Array | None) -> jnp.ndarray:
    """Inverted dropout; the identity when key is None (deterministic) or rate == 0.

    Args:
      x: any array.
      rate: probability of dropping an entry.
      key: PRNG key of the drop pattern (one draw per entry); None: no dropout.

    Returns:
      x with each entry zeroed with probability rate and the kept ones divided by 1 - rate.
    """
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def allowed_keys(
    batch: int,
    t: int,
    s: int,
    *,
    mask: jnp.ndarray | None = None,
    causal: bool = False,
    offset: jnp.ndarray | int = 0,
) -> jnp.ndarray | None:
    """Boolean [B, 1 | H, T, S] of which keys each query may attend to (None: all).

    Args:
      batch, t, s: batch size, query and key lengths.
      mask: Flax-style boolean attention mask broadcastable to [B, H, T, S] (True = attend), e.g. from
        `nnx.make_attention_mask` / `nnx.make_causal_mask`; None for no mask.
      causal: query t may attend to keys s <= t + offset.
      offset: absolute position of the first query (a KV cache's index); a traced scalar is fine.
    Returns:
      The combined boolean mask, broadcast to at least [B, 1, T, S], or None when nothing is masked.
    """
    allowed = None
    if causal:
        t_pos = jnp.arange(t)[:, None] + offset
        allowed = (jnp.arange(s)[None, :] <= t_pos)[None, None, :, :]
    if mask is not None:
        m = jnp.asarray(mask).astype(jnp.bool_)
        if m.ndim != 4:
            raise ValueError(f"mask has shape {m.shape}; expected [batch, heads | 1, T={t}, S={s}]")
        allowed = m if allowed is None else jnp.logical_and(allowed, m)
    if allowed is not None:
        allowed = jnp.broadcast_to(allowed, (batch, max(allowed.shape[1], 1), t, s))
    return allowed


def padding_mask(mask_BxS: jnp.ndarray) -> jnp.ndarray:
    """[B, S] key-padding mask (nonzero = real token) -> Flax-style boolean [B, 1, 1, S].

    Args:
      mask_BxS: nonzero for real tokens, 0 for padding.

    Returns:
      Boolean [B, 1, 1, S] (True = attend), for the `mask` argument of `allowed_keys` and
      `multihead_attention`.
    """
    return (jnp.asarray(mask_BxS) != 0)[:, None, None, :]


def attention_weights(
    q_BxTxHxK: jnp.ndarray, k_BxSxHxK: jnp.ndarray, allowed_BxHxTxS: jnp.ndarray | None
) -> jnp.ndarray:
    """A = softmax(Q K^T / sqrt(K)) per head, float32 [B, H, T, S]; rows sum to one over allowed keys.

    Args:
      q_BxTxHxK: queries, token-major.
      k_BxSxHxK: keys, token-major.
      allowed_BxHxTxS: boolean mask (`allowed_keys`), None for none. A fully masked row comes out
        uniform, not NaN (masked logits are a large finite negative number).

    Returns:
      A, float32 [B, H, T, S].
    """
    return _attention_weights_bh(
        q_BxTxHxK.transpose(0, 2, 1, 3), k_BxSxHxK.transpose(0, 2, 1, 3), allowed_BxHxTxS
    )


def _attention_weights_bh(
    q_BxHxTxK: jnp.ndarray, k_BxHxSxK: jnp.ndarray, allowed_BxHxTxS: jnp.ndarray | None
) -> jnp.ndarray:
    """`attention_weights` for heads-major inputs [B, H, T, K]."""
    scale = 1.0 / jnp.sqrt(jnp.float32(q_BxHxTxK.shape[-1]))
    logits = jnp.einsum("BHTK,BHSK->BHTS", q_BxHxTxK, k_BxHxSxK, preferred_element_type=jnp.float32)
    logits = logits * scale
    if allowed_BxHxTxS is not None:
        logits = jnp.where(allowed_BxHxTxS, logits, _NEG)
    return jax.nn.softmax(logits, axis=-1)


def attn_scale(
    att_BxHxTxS: jnp.ndarray, w_H: jnp.ndarray, allowed_BxHxTxS: jnp.ndarray | None
) -> jnp.ndarray:
    """AttnScale (Wang et al. 2022): A' = A_DC + (1 + w_h)(A - A_DC), A_DC the uniform attention.

    A_DC = 1 1^T / n for unmasked attention; with a causal or padding mask we use the uniform
    distribution over each query's allowed keys (our generalisation; it keeps A' causal).

    Args:
      att_BxHxTxS: the attention weights A.
      w_H: one coefficient w_h per head.
      allowed_BxHxTxS: the boolean mask A was computed with (`allowed_keys`), None for none.

    Returns:
      A', float32 [B, H, T, S].
    """
    if allowed_BxHxTxS is None:
        a_dc = jnp.full_like(att_BxHxTxS, 1.0 / att_BxHxTxS.shape[-1])
    else:
        allowed = allowed_BxHxTxS.astype(jnp.float32)
        a_dc = allowed / jnp.maximum(jnp.sum(allowed, axis=-1, keepdims=True), 1.0)
    return a_dc + (1.0 + w_H.astype(jnp.float32))[None, :, None, None] * (att_BxHxTxS - a_dc)


def feat_scale(
    y_BxTxD: jnp.ndarray, s_dc_D: jnp.ndarray, s_hc_D: jnp.ndarray, *, causal: bool
) -> jnp.ndarray:
    """FeatScale (Wang et al. 2022): Y' = Y + s_dc * DC[Y] + s_hc * (Y - DC[Y]), per-channel s.

    DC[Y] is the token mean; for causal models the running (prefix) mean, so no token sees the future.

    Args:
      y_BxTxD: the branch output Y.
      s_dc_D: per-channel scale of the DC part.
      s_hc_D: per-channel scale of the high-frequency part Y - DC[Y].
      causal: use the running (prefix) mean as DC[Y].

    Returns:
      Y', [B, T, D] in y's dtype (computed in float32).
    """
    y32 = y_BxTxD.astype(jnp.float32)
    if causal:
        count_T = jnp.arange(1, y32.shape[1] + 1, dtype=jnp.float32)
        dc = jnp.cumsum(y32, axis=1) / count_T[None, :, None]
    else:
        dc = jnp.mean(y32, axis=1, keepdims=True)
    out = y32 + s_dc_D[None, None, :] * dc + s_hc_D[None, None, :] * (y32 - dc)
    return out.astype(y_BxTxD.dtype)


def project_heads(
    x_BxTxD: jnp.ndarray,
    w_DxE: jnp.ndarray,
    b_E: jnp.ndarray | None,
    *,
    num_heads: int,
    dtype: jnp.dtype,
    fast_backward: bool = True,
) -> jnp.ndarray:
    """x W (+ b) split into heads: heads-major [B, H, T, K] (E = H K), computed in `dtype`.

    Heads-major so both attention matmuls are plain batched matmuls over (B, H): contracting the
    [B, T, H, K] layout directly made XLA:CPU run them ~5x below its matmul rate. (One fused [D, 3D]
    Q/K/V matmul was tried too: its forward is a little faster, its backward ~2x slower on XLA:CPU.)

    Args:
      x_BxTxD: the input.
      w_DxE: the projection.
      b_E: its bias, or None.
      num_heads: H; the projection's output width E is split into H heads of width K = E / H.
      dtype: compute dtype (x, w and b are cast to it).
      fast_backward: use `dense` (reverse mode only); False: a plain matmul.

    Returns:
      The projected heads, [B, H, T, K] in `dtype`.
    """
    b, t, _ = x_BxTxD.shape
    matmul = dense if fast_backward else jnp.matmul
    y_BxTxE = matmul(x_BxTxD.astype(dtype), w_DxE.astype(dtype))
    if b_E is not None:
        y_BxTxE = y_BxTxE + b_E.astype(dtype)[None, None, :]
    return y_BxTxE.reshape(b, t, num_heads, -1).transpose(0, 2, 1, 3)


def attend(
    q_BxHxTxK: jnp.ndarray,
    k_BxHxSxK: jnp.ndarray,
    v_BxHxSxK: jnp.ndarray,
    *,
    allowed: jnp.ndarray | None = None,
    attn_scale_H: jnp.ndarray | None = None,
    dropout_rate: float = 0.0,
    dropout_key: jax.Array | None = None,
    broadcast_dropout: bool = True,
    dtype: jnp.dtype | None = None,
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """concat_h(A_h V_h): the attention core. Returns (z_BxTxD, att_BxHxTxS), att before dropout.

    Args:
      q_BxHxTxK, k_BxHxSxK, v_BxHxSxK: heads-major queries, keys and values.
      allowed: boolean mask broadcastable to [B, H, T, S] (`allowed_keys`), None for none.
      attn_scale_H: AttnScale coefficients, or None.
      dropout_rate, dropout_key: attention dropout (as in Flax: the weights are multiplied by
        keep / (1 - rate)); no dropout when the key is None or the rate 0.
      broadcast_dropout: one dropout pattern for the whole batch and all heads (Flax's default).
      dtype: compute dtype of A V (default: the values' dtype); logits and softmax are float32.

    Returns:
      (z_BxTxD, att_BxHxTxS): the heads' outputs concatenated (D = H K), in `dtype`, and the float32
      attention weights before dropout (after AttnScale).
    """
    b, h, t, _ = q_BxHxTxK.shape
    dtype = dtype or v_BxHxSxK.dtype
    att_BxHxTxS = _attention_weights_bh(q_BxHxTxK, k_BxHxSxK, allowed)
    if attn_scale_H is not None:
        att_BxHxTxS = attn_scale(att_BxHxTxS, attn_scale_H, allowed)
    att_used = att_BxHxTxS
    if dropout_key is not None and dropout_rate > 0.0:
        shape = (1, 1) + att_BxHxTxS.shape[2:] if broadcast_dropout else att_BxHxTxS.shape
        keep = jax.random.bernoulli(dropout_key, 1.0 - dropout_rate, shape)
        att_used = att_BxHxTxS * (keep.astype(jnp.float32) / (1.0 - dropout_rate))
    z_BxHxTxK = jnp.einsum("BHTS,BHSK->BHTK", att_used.astype(dtype), v_BxHxSxK.astype(dtype))
    return z_BxHxTxK.transpose(0, 2, 1, 3).reshape(b, t, -1), att_BxHxTxS


def multihead_attention(
    x_BxTxD: jnp.ndarray,
    w_q_DxD: jnp.ndarray,
    w_k_DxD: jnp.ndarray,
    w_v_DxD: jnp.ndarray,
    w_o_DxD: jnp.ndarray,
    *,
    num_heads: int,
    inputs_k: jnp.ndarray | None = None,
    inputs_v: jnp.ndarray | None = None,
    b_q_D: jnp.ndarray | None = None,
    b_k_D: jnp.ndarray | None = None,
    b_v_D: jnp.ndarray | None = None,
    b_o_D: jnp.ndarray | None = None,
    mask: jnp.ndarray | None = None,
    causal: bool = False,
    attn_scale_H: jnp.ndarray | None = None,
    dropout_rate: float = 0.0,
    dropout_key: jax.Array | None = None,
    broadcast_dropout: bool = True,
    dtype: jnp.dtype | None = None,
    fast_backward: bool = True,
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """y = concat_h(A_h X_v W_V[:, h]) W_O (+ biases), A_h from X W_Q and X_k W_K. Returns (y_BxTxD,
    att_BxHxTxS).

    Args:
      x_BxTxD: the queries' input (and the keys' and values' unless given).
      w_q_DxD, w_k_DxD, w_v_DxD, w_o_DxD: projections (H = W_V W_O for self-attention).
      num_heads: heads; must divide D.
      inputs_k: [B, S, D] input of the keys (default x); inputs_v: input of the values (default inputs_k).
        A pre-LN block with value_norm="rms" passes x / rms(x) here while Q and K read LN(x).
      b_*: optional biases.
      mask: Flax-style boolean mask broadcastable to [B, H, T, S]; causal: only keys s <= t.
      attn_scale_H, dropout_rate, dropout_key, broadcast_dropout: see `attend`.
      dtype: compute dtype of the matmuls (default x's); logits and softmax run in float32.
      fast_backward: projections use `dense` (a backward pass laid out for XLA:CPU; reverse mode only);
        False uses plain matmuls, which forward-mode autodiff (jax.jvp, jax.jacfwd) can go through.

    Returns:
      (y_BxTxD, att_BxHxTxS): the layer's output in `dtype`, and the float32 attention weights before
      dropout (`attend`).

    Example::

      >>> import jax, jax.numpy as jnp
      >>> from jaxsmooth import attention
      >>> k_x, k_w = jax.random.split(jax.random.key(0))
      >>> x_BxTxD = jax.random.normal(k_x, (2, 5, 16))
      >>> w_q, w_k, w_v, w_o = 0.25 * jax.random.normal(k_w, (4, 16, 16))
      >>> y_BxTxD, att_BxHxTxS = attention.multihead_attention(
      ...     x_BxTxD, w_q, w_k, w_v, w_o, num_heads=4, causal=True)
      >>> y_BxTxD.shape, att_BxHxTxS.shape
      ((2, 5, 16), (2, 4, 5, 5))
      >>> bool(jnp.allclose(att_BxHxTxS.sum(-1), 1.0))  # each query's weights sum to one
      True
      >>> float(att_BxHxTxS[0, 0, 0, 1])  # causal: the first token sees only itself
      0.0
    """
    inputs_k = x_BxTxD if inputs_k is None else inputs_k
    inputs_v = inputs_k if inputs_v is None else inputs_v
    b, t, d = x_BxTxD.shape
    s = inputs_k.shape[1]
    if d % num_heads:
        raise ValueError(f"num_heads={num_heads} must divide the width D={d}")
    if inputs_k.shape != (b, s, d) or inputs_v.shape != (b, s, d):
        raise ValueError(
            f"keys' and values' inputs have shapes {inputs_k.shape} and {inputs_v.shape}; expected "
            f"[B={b}, S, D={d}] with the same S"
        )
    for name, w in (("w_q", w_q_DxD), ("w_k", w_k_DxD), ("w_v", w_v_DxD), ("w_o", w_o_DxD)):
        if w.shape != (d, d):
            raise ValueError(f"{name} has shape {w.shape}; expected ({d}, {d}) for input width {d}")
    dtype = dtype or x_BxTxD.dtype
    proj = dict(num_heads=num_heads, dtype=dtype, fast_backward=fast_backward)
    q = project_heads(x_BxTxD, w_q_DxD, b_q_D, **proj)
    k = project_heads(inputs_k, w_k_DxD, b_k_D, **proj)
    v = project_heads(inputs_v, w_v_DxD, b_v_D, **proj)
    allowed = allowed_keys(b, t, s, mask=mask, causal=causal)
    z_BxTxD, att = attend(
        q, k, v, allowed=allowed, attn_scale_H=attn_scale_H, dropout_rate=dropout_rate,
        dropout_key=dropout_key, broadcast_dropout=broadcast_dropout, dtype=dtype,
    )  # fmt: skip
    matmul = dense if fast_backward else jnp.matmul
    y_BxTxD = matmul(z_BxTxD, w_o_DxD.astype(dtype))
    if b_o_D is not None:
        y_BxTxD = y_BxTxD + b_o_D.astype(dtype)[None, None, :]
    return y_BxTxD, att


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
    """The position-wise MLP: GELU (exact, erf) between two dense layers.

    Args:
      x_BxTxD: the input.
      w1_DxM, b1_M: the first dense layer.
      w2_MxD, b2_D: the second dense layer.
      dtype: compute dtype (default: x's).
      fast_backward: as in `multihead_attention`.

    Returns:
      gelu(x W1 + b1) W2 + b2, [B, T, D] in `dtype`.
    """
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

    A `jax.custom_vjp`: reverse mode only (forward-mode autodiff, jax.jvp / jax.jacfwd, raises).

    Args:
      x_NxI: the input, any number of leading axes ([..., I]).
      w_IxO: the weight.

    Returns:
      x @ w, [..., O].
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

    Args:
      x: any float array.

    Returns:
      GELU(x), elementwise.
    """
    return x * (0.5 + 0.5 * jax.lax.erf(x * _INV_SQRT2))


@gelu.defjvp
def _gelu_jvp(primals, tangents):
    (x,), (dx,) = primals, tangents
    cdf = 0.5 + 0.5 * jax.lax.erf(x * _INV_SQRT2)
    pdf = jnp.exp(-0.5 * x * x) * _INV_SQRT_2PI
    return x * cdf, dx * (cdf + x * pdf)
