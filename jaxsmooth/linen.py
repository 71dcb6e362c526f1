"""Flax Linen interop: the constrained attention for Linen models (e.g. big_vision-style code).

`SpectralAttention` and the unconstrained `Attention` take `flax.linen.MultiHeadDotProductAttention`'s
attributes and call arguments with the same names and meaning where they make sense for a square
H = W_V W_O (see `jaxsmooth.nnx.layers` for what differs and why), so a Linen block works with only the
class swapped (plus `spectrum=`):

    class Block(nn.Module):
        @nn.compact
        def __call__(self, x, deterministic=True):
            y = jaxsmooth.linen.SpectralAttention(num_heads=3, spectrum=jaxsmooth.Spectrum("sharpen"),
                                                  dropout_rate=0.1)(nn.LayerNorm()(x),
                                                                    deterministic=deterministic)
            return x + y

The math is the same pure functions the NNX layers call (`jaxsmooth.spectral`, `jaxsmooth.attention`), so
for equal parameters the two give equal outputs. Parameter names match the NNX layers' attributes:
    w_q, w_k [D, D], b_q, b_k [D] (use_bias); theta [D, D] (orthogonal basis) or theta, theta_w [D, D] and
    theta_s [D] (general basis), psi [D]; b_v, b_o [D] (value_bias); w_v, w_o for `Attention`; attn_scale
    [N] or s_dc, s_hc [D] for the Wang et al. options (shape letters: `jaxsmooth.nnx`).
`nnx_to_linen_params(nnx_layer)` copies an NNX layer's parameters into this layout. With `decode=True`
the layer keeps a KV cache in the "cache" collection, created by `init` from the full-length input, as
Linen's own attention does; later calls may feed one or more new tokens.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxsmooth import attention as attn_fn
from jaxsmooth import spectral
from jaxsmooth.config import Spectrum

default_kernel_init = jax.nn.initializers.xavier_uniform()


class _LinenAttention(nn.Module):
    """Shared attributes and forward; subclasses define `_value_output(d)`."""

    num_heads: int
    dtype: Any = None
    param_dtype: Any = jnp.float32
    qkv_features: int | None = None
    out_features: int | None = None
    broadcast_dropout: bool = True
    dropout_rate: float = 0.0
    deterministic: bool | None = None
    kernel_init: Callable = default_kernel_init
    bias_init: Callable = nn.initializers.zeros_init()
    use_bias: bool = True
    decode: bool = False
    # jaxsmooth's own
    value_bias: bool | None = None
    beta: float = 1.0  # DeepNorm's init scale on W_V, W_O (spectral: on the eigenvalues, squared)
    branch_scale: str = "none"
    fast_backward: bool = True  # see jaxsmooth.attention.dense

    def _value_output(self, d: int):
        raise NotImplementedError

    @nn.compact
    def __call__(
        self,
        inputs_q: jax.Array,
        inputs_k: jax.Array | None = None,
        inputs_v: jax.Array | None = None,
        *,
        mask: jax.Array | None = None,
        deterministic: bool | None = None,
        dropout_rng: jax.Array | None = None,
        sow_weights: bool = False,
        is_causal: bool = False,
    ) -> jax.Array:
        """Multi-head attention, as `nn.MultiHeadDotProductAttention.__call__`.

        Args:
          inputs_q: [batch..., T, D] queries' input.
          inputs_k, inputs_v: [batch..., S, D] keys' and values' inputs (cross-attention), or None
            (keys from inputs_q, values from inputs_k).
          mask: boolean [batch..., N | 1, T, S] (True = attend), or None.
          deterministic: no dropout if True; merged with the attribute as Linen does (exactly one of the
            two must be set when dropout_rate > 0).
          dropout_rng: the dropout key (default `make_rng("dropout")`).
          sow_weights: sow the attention weights [batch..., N, T, S] into "intermediates".
          is_causal: add a causal mask (offset by the cache index when decoding).

        Returns:
          [batch..., T, D].
        """
        inputs_k, inputs_v = self._check_inputs(inputs_q, inputs_k, inputs_v)
        batch, d = inputs_q.shape[:-2], inputs_q.shape[-1]
        nb, t, s = math.prod(batch), inputs_q.shape[-2], inputs_k.shape[-2]
        flat = lambda x: x.reshape(nb, x.shape[-2], d)
        zeros = nn.initializers.zeros_init()
        w_q = self.param("w_q", self.kernel_init, (d, d), self.param_dtype)
        w_k = self.param("w_k", self.kernel_init, (d, d), self.param_dtype)
        b_q = self.param("b_q", self.bias_init, (d,), self.param_dtype) if self.use_bias else None
        b_k = self.param("b_k", self.bias_init, (d,), self.param_dtype) if self.use_bias else None
        w_v, w_o, b_v, b_o = self._value_output(d)
        dtype = jnp.dtype(self.dtype) if self.dtype is not None else jnp.result_type(inputs_q, w_q)
        proj = dict(num_heads=self.num_heads, dtype=dtype, fast_backward=self.fast_backward)
        q_BxNxTxK = attn_fn.project_heads(flat(inputs_q), w_q, b_q, **proj)
        k_BxNxSxK = attn_fn.project_heads(flat(inputs_k), w_k, b_k, **proj)
        v_BxNxSxK = attn_fn.project_heads(flat(inputs_v), w_v, b_v, **proj)

        m = None
        if mask is not None:
            mask = jnp.asarray(mask)
            m = jnp.broadcast_to(mask, (*batch, *mask.shape[-3:])).reshape(nb, *mask.shape[-3:])
        offset = 0
        if self.decode:
            k_BxNxSxK, v_BxNxSxK, offset, m = self._cache(k_BxNxSxK, v_BxNxSxK, m, batch, t)
            s = k_BxNxSxK.shape[2]
        allowed = attn_fn.allowed_keys(nb, t, s, mask=m, causal=is_causal, offset=offset)
        scale_N = None
        if self.branch_scale == "attnscale":
            scale_N = self.param("attn_scale", zeros, (self.num_heads,), jnp.float32)
        z_BxTxD, att_BxNxTxS = attn_fn.attend(
            q_BxNxTxK, k_BxNxSxK, v_BxNxSxK, allowed=allowed, attn_scale_H=scale_N,
            dropout_rate=self.dropout_rate, dropout_key=self._dropout_key(deterministic, dropout_rng),
            broadcast_dropout=self.broadcast_dropout, dtype=dtype,
        )  # fmt: skip
        if sow_weights:
            att = att_BxNxTxS.reshape(*batch, *att_BxNxTxS.shape[1:])
            self.sow("intermediates", "attention_weights", att)
        matmul = attn_fn.dense if self.fast_backward else jnp.matmul
        y_BxTxD = matmul(z_BxTxD, w_o.astype(dtype))
        if b_o is not None:
            y_BxTxD = y_BxTxD + b_o.astype(dtype)[None, None, :]
        if self.branch_scale == "featscale":
            if self.decode:
                raise NotImplementedError("branch_scale='featscale' with decode=True is not supported")
            s_dc = self.param("s_dc", zeros, (d,), jnp.float32)
            s_hc = self.param("s_hc", zeros, (d,), jnp.float32)
            y_BxTxD = attn_fn.feat_scale(y_BxTxD, s_dc, s_hc, causal=is_causal)
        return y_BxTxD.reshape(*batch, t, d)

    def _check_inputs(self, inputs_q, inputs_k, inputs_v):
        """Flax's defaults (keys from the queries' input, values from the keys') and the width checks."""
        if inputs_k is None:
            if inputs_v is not None:
                raise ValueError("`inputs_k` cannot be None if `inputs_v` is not None (as in Flax)")
            inputs_k = inputs_q
        if inputs_v is None:
            inputs_v = inputs_k
        d = inputs_q.shape[-1]
        for name, v in (("qkv_features", self.qkv_features), ("out_features", self.out_features)):
            if v is not None and v != d:
                raise ValueError(
                    f"{name}={v} differs from the input width {d}: H = W_V W_O must be square (D x D) for "
                    "its eigenvalues to be constrained, so jaxsmooth attention keeps one width D"
                )
        if inputs_k.shape[-1] != d or inputs_v.shape[-1] != d:
            raise ValueError(
                f"inputs_k / inputs_v must have width {d}, got {inputs_k.shape}, {inputs_v.shape}"
            )
        if d % self.num_heads:
            raise ValueError(f"num_heads={self.num_heads} must divide the input width {d}")
        if self.branch_scale not in ("none", "attnscale", "featscale"):
            raise ValueError(f"branch_scale={self.branch_scale!r}; choose none, attnscale or featscale")
        return inputs_k, inputs_v

    def _dropout_key(self, deterministic, dropout_rng):
        """Linen's rule: with dropout_rate > 0, `deterministic` comes from the call or the attribute."""
        if self.dropout_rate > 0.0 and not nn.merge_param("deterministic", self.deterministic, deterministic):
            return dropout_rng if dropout_rng is not None else self.make_rng("dropout")
        return None

    def _cache(self, k_BxNxTxK, v_BxNxTxK, m, batch, t):
        """Linen's cache protocol: `init` creates the cache from the full-length input; afterwards each
        call writes its tokens at cache_index and attends causally to everything written so far."""
        nb, n, _, kd = k_BxNxTxK.shape
        to_cache = lambda a: a.transpose(0, 2, 1, 3).reshape(*batch, t, n, kd)
        initialized = self.has_variable("cache", "cached_key")
        ck = self.variable("cache", "cached_key", jnp.zeros, (*batch, t, n, kd), k_BxNxTxK.dtype)
        cv = self.variable("cache", "cached_value", jnp.zeros, (*batch, t, n, kd), v_BxNxTxK.dtype)
        ci = self.variable("cache", "cache_index", lambda: jnp.array(0, dtype=jnp.int32))
        if not initialized:  # init: just shape the cache; attend over the given tokens
            return k_BxNxTxK, v_BxNxTxK, 0, m
        max_len = ck.value.shape[-3]
        idx = ci.value
        zero = jnp.zeros((), jnp.int32)
        start = (zero,) * len(batch) + (idx, zero, zero)
        ck.value = jax.lax.dynamic_update_slice(ck.value, to_cache(k_BxNxTxK).astype(ck.value.dtype), start)
        cv.value = jax.lax.dynamic_update_slice(cv.value, to_cache(v_BxNxTxK).astype(cv.value.dtype), start)
        ci.value = idx + t
        heads_major = lambda a: a.reshape(nb, max_len, n, kd).transpose(0, 2, 1, 3)
        cached = (jnp.arange(max_len)[None, :] <= idx + jnp.arange(t)[:, None])[None, None]
        m = cached if m is None else jnp.logical_and(m, cached)
        return heads_major(ck.value), heads_major(cv.value), idx, m


class Attention(_LinenAttention):
    """Unconstrained attention (the baseline) with `nn.MultiHeadDotProductAttention`'s attributes.

    Args (attributes):
      num_heads: number of heads N; must divide the input width D.
      dtype: compute dtype (None: inferred from the inputs and parameters).
      param_dtype: dtype of the Q/K (and baseline V/O) parameters.
      qkv_features, out_features: None or D (H = W_V W_O must be square).
      broadcast_dropout: one attention-dropout pattern for the whole batch and all heads.
      dropout_rate: attention-dropout probability.
      deterministic: merged with the call argument (`nn.merge_param`).
      kernel_init, bias_init: initializers of the projection matrices and the biases.
      use_bias: Q and K biases (and, for `Attention`, V and O unless value_bias says otherwise).
      decode: keep a KV cache in the "cache" collection (created by `init` from the full-length input).
      beta: DeepNorm's init scale on W_V, W_O (spectral: on the eigenvalues, squared).
      branch_scale: "none" | "attnscale" | "featscale" (Wang et al. 2022).
      fast_backward: see `jaxsmooth.attention.dense` (reverse mode only; False for jax.jvp).
      value_bias: V and O biases (None: follow use_bias, as Flax does).
      out_kernel_init, out_bias_init: initializers of W_O and its bias (default: kernel_init, bias_init).

    Example::

      >>> import jax, jax.numpy as jnp
      >>> from jaxsmooth.linen import Attention
      >>> layer = Attention(num_heads=4)
      >>> params = layer.init(jax.random.key(0), jnp.ones((2, 5, 16)))
      >>> layer.apply(params, jnp.ones((2, 5, 16))).shape
      (2, 5, 16)
    """

    out_kernel_init: Callable | None = None
    out_bias_init: Callable | None = None

    def _value_output(self, d: int):
        scaled = lambda init: lambda k, s, t: self.beta * init(k, s, t)
        w_v = self.param("w_v", scaled(self.kernel_init), (d, d), self.param_dtype)
        w_o = self.param("w_o", scaled(self.out_kernel_init or self.kernel_init), (d, d), self.param_dtype)
        vb = self.use_bias if self.value_bias is None else self.value_bias
        b_v = self.param("b_v", self.bias_init, (d,), self.param_dtype) if vb else None
        b_o = self.param("b_o", self.out_bias_init or self.bias_init, (d,), self.param_dtype) if vb else None
        return w_v, w_o, b_v, b_o


class SpectralAttention(_LinenAttention):
    """Attention with W_V = V diag(lambda), W_O = V^-1: the eigenvalues lambda of H = W_V W_O lie in
    `spectrum`'s interval for any parameter values.

    Args (attributes):
      num_heads: number of heads N; must divide the input width D.
      dtype: compute dtype (None: inferred from the inputs and parameters).
      param_dtype: dtype of the Q/K (and baseline V/O) parameters.
      qkv_features, out_features: None or D (H = W_V W_O must be square).
      broadcast_dropout: one attention-dropout pattern for the whole batch and all heads.
      dropout_rate: attention-dropout probability.
      deterministic: merged with the call argument (`nn.merge_param`).
      kernel_init, bias_init: initializers of the projection matrices and the biases.
      use_bias: Q and K biases (and, for `Attention`, V and O unless value_bias says otherwise).
      decode: keep a KV cache in the "cache" collection (created by `init` from the full-length input).
      beta: DeepNorm's init scale on W_V, W_O (spectral: on the eigenvalues, squared).
      branch_scale: "none" | "attnscale" | "featscale" (Wang et al. 2022).
      fast_backward: see `jaxsmooth.attention.dense` (reverse mode only; False for jax.jvp).
      spectrum: the constraint (`jaxsmooth.Spectrum`), required (by keyword).
      alpha: the enclosing block's residual scale (DeepNorm); lambda lies in alpha * [lo, hi].
      value_bias: V and O biases (default: off, a DC term outside the constraint).

    Example::

      >>> import jax, jax.numpy as jnp, jaxsmooth
      >>> from jaxsmooth.linen import SpectralAttention, effective_h
      >>> sharpen = jaxsmooth.Spectrum("sharpen")
      >>> layer = SpectralAttention(num_heads=4, spectrum=sharpen, dropout_rate=0.1)
      >>> x = jnp.ones((2, 5, 16))
      >>> params = layer.init(jax.random.key(0), x, deterministic=True)
      >>> layer.apply(params, x, deterministic=True).shape
      (2, 5, 16)
      >>> bool(jnp.linalg.eigvalsh(effective_h(params["params"], sharpen)).max() < 0)
      True
    """

    spectrum: Spectrum | None = None
    alpha: float = 1.0

    def _value_output(self, d: int):
        sp = self.spectrum
        if not isinstance(sp, Spectrum):
            raise ValueError(
                f"SpectralAttention needs spectrum=jaxsmooth.Spectrum(...), got {type(sp).__name__}"
            )
        # Linen initialisers receive one key each; all spectral parameters come from one spectral.init
        # call (seeded by the "params" stream) so NNX and Linen follow the same init recipe.
        init = lambda key: spectral.init(key, d, sp, alpha=self.alpha, scale=self.beta**2)
        if sp.basis == "orthogonal":
            theta = self.param("theta", lambda k: init(k)[0])
        else:
            theta = {
                "u": self.param("theta", lambda k: init(k)[0]["u"]),
                "w": self.param("theta_w", lambda k: init(k)[0]["w"]),
                "s": self.param("theta_s", lambda k: init(k)[0]["s"]),
            }
        psi_D = self.param("psi", lambda k: init(k)[1])
        w_v, w_o = spectral.value_projection(theta, psi_D, sp, self.alpha)
        vb = bool(self.value_bias)
        b_v = self.param("b_v", self.bias_init, (d,), self.param_dtype) if vb else None
        b_o = self.param("b_o", self.bias_init, (d,), self.param_dtype) if vb else None
        return w_v, w_o, b_v, b_o


def effective_h(params: dict, spectrum: Spectrum, alpha: float = 1.0) -> jax.Array:
    """H = W_V W_O of a Linen `SpectralAttention`, from its parameters.

    Args:
      params: the layer's params dict (theta, psi; theta_w, theta_s for the general basis).
      spectrum: the layer's `Spectrum`.
      alpha: the layer's `alpha`.

    Returns:
      h_DxD, float32.
    """
    theta = params["theta"]
    if spectrum.basis == "general":
        theta = {"u": params["theta"], "w": params["theta_w"], "s": params["theta_s"]}
    return spectral.compose(theta, params["psi"], spectrum, alpha)


def nnx_to_linen_params(module) -> dict:
    """The parameters of a `jaxsmooth.nnx` attention layer as the Linen layer's params dict.

    Args:
      module: a `jaxsmooth.nnx.SpectralAttention` or `jaxsmooth.nnx.Attention`.

    Returns:
      {name: array} with the Linen layer's parameter names (use as {"params": ...}).
    """
    from flax import nnx

    state = nnx.state(module, nnx.Param)
    return {k: v[...] for k, v in state.items() if v is not None}
