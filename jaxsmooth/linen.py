"""Flax Linen interop: the constrained attention layer for Linen models (e.g. big_vision-style code).

The math is the same pure functions the NNX modules call (`jaxsmooth.spectral`, `jaxsmooth.attention`),
so for equal parameters the two give equal outputs. Parameter names match the NNX module's attributes:
    w_q, w_k [D, D], b_q, b_k [D] (if qkv_bias), theta [D, D] (orthogonal basis) or theta, theta_w [D, D]
    and theta_s [D] (general basis), psi [D]; attn_scale [H] or s_dc, s_hc [D] for the Wang et al. options.
Use `nnx_to_linen_params(nnx_module)` to copy an NNX SpectralAttention's parameters into this layout.

    class Block(nn.Module):
        @nn.compact
        def __call__(self, x):
            return x + jaxsmooth.linen.SpectralAttention(
                num_heads=3, spectrum=jaxsmooth.Spectrum("sharpen"))(nn.LayerNorm()(x))
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxsmooth import attention as attn_fn
from jaxsmooth import spectral
from jaxsmooth.config import Spectrum


class SpectralAttention(nn.Module):
    """Multi-head self-attention with W_V W_O = V diag(lambda) V^-1 constrained by `spectrum`.

    Attributes mirror `jaxsmooth.nnx.SpectralAttention`; the width D is taken from the input. Call with
    `deterministic=False` and a "dropout" rng to apply attention dropout.
    """

    num_heads: int
    spectrum: Spectrum
    causal: bool = False
    alpha: float = 1.0
    beta: float = 1.0
    qkv_bias: bool = True
    dropout: float = 0.0
    dtype: str = "float32"
    branch_scale: str = "none"
    fast_backward: bool = True  # see jaxsmooth.attention.dense

    def _theta(self, d: int):
        # Linen initialisers receive one key each; all spectral parameters come from one spectral.init
        # call (seeded by the "params" stream) so NNX and Linen follow the same init recipe.
        init = lambda key: spectral.init(key, d, self.spectrum, alpha=self.alpha, scale=self.beta**2)
        if self.spectrum.basis == "orthogonal":
            theta = self.param("theta", lambda k: init(k)[0])
        else:
            theta = {
                "u": self.param("theta", lambda k: init(k)[0]["u"]),
                "w": self.param("theta_w", lambda k: init(k)[0]["w"]),
                "s": self.param("theta_s", lambda k: init(k)[0]["s"]),
            }
        return theta

    @nn.compact
    def __call__(self, x_BxTxD, *, mask_BxT=None, deterministic: bool = True, return_weights: bool = False):
        if not isinstance(self.spectrum, Spectrum):
            raise ValueError(f"spectrum must be a jaxsmooth.Spectrum, got {type(self.spectrum).__name__}")
        d = x_BxTxD.shape[-1]
        if d % self.num_heads:
            raise ValueError(f"num_heads={self.num_heads} must divide the input width {d}")
        xavier, zeros = nn.initializers.xavier_uniform(), nn.initializers.zeros_init()
        w_q = self.param("w_q", xavier, (d, d), jnp.float32)
        w_k = self.param("w_k", xavier, (d, d), jnp.float32)
        b_q = self.param("b_q", zeros, (d,), jnp.float32) if self.qkv_bias else None
        b_k = self.param("b_k", zeros, (d,), jnp.float32) if self.qkv_bias else None
        theta = self._theta(d)
        psi_D = self.param(
            "psi", lambda k: spectral.init(k, d, self.spectrum, alpha=self.alpha, scale=self.beta**2)[1]
        )
        w_v, w_o = spectral.value_projection(theta, psi_D, self.spectrum, self.alpha)
        scale_H = None
        if self.branch_scale == "attnscale":
            scale_H = self.param("attn_scale", zeros, (self.num_heads,), jnp.float32)
        use_dropout = not deterministic and self.dropout > 0
        y, att = attn_fn.multihead_attention(
            x_BxTxD,
            w_q,
            w_k,
            w_v,
            w_o,
            num_heads=self.num_heads,
            b_q_D=b_q,
            b_k_D=b_k,
            mask_BxS=mask_BxT,
            causal=self.causal,
            attn_scale_H=scale_H,
            dropout_rate=self.dropout,
            dropout_key=self.make_rng("dropout") if use_dropout else None,
            dtype=jnp.dtype(self.dtype),
            fast_backward=self.fast_backward,
        )
        if self.branch_scale == "featscale":
            s_dc = self.param("s_dc", zeros, (d,), jnp.float32)
            s_hc = self.param("s_hc", zeros, (d,), jnp.float32)
            y = attn_fn.feat_scale(y, s_dc, s_hc, causal=self.causal)
        return (y, att) if return_weights else y


def effective_h(params: dict, spectrum: Spectrum, alpha: float = 1.0) -> jax.Array:
    """H = W_V W_O from a Linen SpectralAttention's params dict."""
    theta = params["theta"]
    if spectrum.basis == "general":
        theta = {"u": params["theta"], "w": params["theta_w"], "s": params["theta_s"]}
    return spectral.compose(theta, params["psi"], spectrum, alpha)


def nnx_to_linen_params(module) -> dict:
    """The parameters of a `jaxsmooth.nnx.SpectralAttention` as this layer's Linen params dict."""
    from flax import nnx

    state = nnx.state(module, nnx.Param)
    return {k: v[...] for k, v in state.items() if v is not None}
