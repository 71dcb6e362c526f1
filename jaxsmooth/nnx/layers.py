"""Thin NNX modules over the pure functions of `jaxsmooth.attention` and `jaxsmooth.spectral`.

Parameters are float32; `dtype` is the compute dtype. Initialisation (ViT-style): xavier-uniform
matrices, zero biases; DeepNorm's beta multiplies W_V, W_O and both MLP matrices (not W_Q, W_K).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxsmooth import attention as attn_fn
from jaxsmooth import spectral
from jaxsmooth.config import Spectrum
from jaxsmooth.nnx.variables import BranchScale, EigBasis, EigVals, LNGain

_xavier = jax.nn.initializers.xavier_uniform()


def _dense(rngs: nnx.Rngs, d_in: int, d_out: int, scale: float = 1.0) -> nnx.Param:
    return nnx.Param(scale * _xavier(rngs.params(), (d_in, d_out), jnp.float32))


def _zeros(n: int) -> nnx.Param:
    return nnx.Param(jnp.zeros((n,), jnp.float32))


class LayerNorm(nnx.Module):
    """LayerNorm with float32 statistics; gain="positive" makes the gain softplus(g) > 0."""

    def __init__(self, d: int, *, gain: str = "free", eps: float = 1e-6):
        self.positive = gain == "positive"
        self.eps = eps
        # softplus(log(e - 1)) = 1: both gain types start at the identity gain.
        self.gain = LNGain(jnp.full((d,), np.log(np.e - 1.0) if self.positive else 1.0, jnp.float32))
        self.bias = _zeros(d)

    def __call__(self, x_BxTxD):
        return attn_fn.layer_norm(
            x_BxTxD, self.gain[...], self.bias[...], eps=self.eps, positive=self.positive
        )

    def effective_gain(self) -> jnp.ndarray:
        return attn_fn.effective_gain(self.gain[...], self.positive)


class MLP(nnx.Module):
    def __init__(
        self, d: int, m: int, *, beta: float = 1.0, dtype=jnp.float32, fast_backward: bool = True,
        rngs: nnx.Rngs,
    ):  # fmt: skip
        self.w1, self.b1 = _dense(rngs, d, m, beta), _zeros(m)
        self.w2, self.b2 = _dense(rngs, m, d, beta), _zeros(d)
        self.dtype, self.fast_backward = dtype, fast_backward

    def __call__(self, x_BxTxD):
        return attn_fn.mlp(
            x_BxTxD, self.w1[...], self.b1[...], self.w2[...], self.b2[...], dtype=self.dtype,
            fast_backward=self.fast_backward,
        )  # fmt: skip


class _AttentionBase(nnx.Module):
    """Q/K projections, the optional Wang et al. branch scales, and the forward; subclasses supply
    `value_output() -> (w_v_DxD, w_o_DxD, b_v_D | None, b_o_D | None)`."""

    def __init__(
        self, d_model, num_heads, *, causal, qkv_bias, dropout, dtype, branch_scale, fast_backward, rngs
    ):
        if d_model % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide d_model={d_model}")
        if branch_scale not in ("none", "attnscale", "featscale"):
            raise ValueError(f"branch_scale={branch_scale!r}; choose one of none, attnscale, featscale")
        self.d_model, self.num_heads, self.causal = d_model, num_heads, causal
        self.dropout, self.dtype, self.branch_scale = dropout, jnp.dtype(dtype), branch_scale
        self.fast_backward = fast_backward
        self.w_q, self.w_k = _dense(rngs, d_model, d_model), _dense(rngs, d_model, d_model)
        self.b_q = _zeros(d_model) if qkv_bias else None
        self.b_k = _zeros(d_model) if qkv_bias else None
        if branch_scale == "attnscale":
            self.attn_scale = BranchScale(jnp.zeros((num_heads,), jnp.float32))
        if branch_scale == "featscale":
            self.s_dc = BranchScale(jnp.zeros((d_model,), jnp.float32))
            self.s_hc = BranchScale(jnp.zeros((d_model,), jnp.float32))

    def value_output(self):
        raise NotImplementedError

    def effective_h(self) -> jnp.ndarray:
        """H_DxD = W_V W_O (float32): the map the residual update A X H applies to each token."""
        w_v, w_o, _, _ = self.value_output()
        return w_v.astype(jnp.float32) @ w_o.astype(jnp.float32)

    def head_maps(self) -> jnp.ndarray:
        """[H, D, D]: head h's map W_V[:, h] W_O[h, :]; they sum to effective_h()."""
        w_v, w_o, _, _ = self.value_output()
        k = self.d_model // self.num_heads
        w_v_DxHxK = w_v.reshape(self.d_model, self.num_heads, k)
        w_o_HxKxD = w_o.reshape(self.num_heads, k, self.d_model)
        return jnp.einsum("DHK,HKE->HDE", w_v_DxHxK, w_o_HxKxD)

    def __call__(
        self, x_BxTxD, *, mask_BxT=None, dropout_key=None, return_weights=False, value_output=None, v_in=None
    ):
        """value_output: (w_v, w_o, b_v, b_o) already computed by `self.value_output()`. The block stack
        passes it to compose the spectral W_V, W_O of all layers in one batched call before its scan.
        v_in: what the value projection reads (default x_BxTxD)."""
        w_v, w_o, b_v, b_o = self.value_output() if value_output is None else value_output
        y, att = attn_fn.multihead_attention(
            x_BxTxD,
            self.w_q[...],
            self.w_k[...],
            w_v,
            w_o,
            num_heads=self.num_heads,
            b_q_D=None if self.b_q is None else self.b_q[...],
            b_k_D=None if self.b_k is None else self.b_k[...],
            b_v_D=b_v,
            b_o_D=b_o,
            mask_BxS=mask_BxT,
            causal=self.causal,
            attn_scale_H=self.attn_scale[...] if self.branch_scale == "attnscale" else None,
            dropout_rate=self.dropout,
            dropout_key=dropout_key,
            dtype=self.dtype,
            fast_backward=self.fast_backward,
            v_in_BxTxD=v_in,
        )
        if self.branch_scale == "featscale":
            y = attn_fn.feat_scale(y, self.s_dc[...], self.s_hc[...], causal=self.causal)
        return (y, att) if return_weights else y


class Attention(_AttentionBase):
    """Unconstrained multi-head self-attention (the baseline), same interface as SpectralAttention."""

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        *,
        causal: bool = False,
        beta: float = 1.0,
        qkv_bias: bool = True,
        dropout: float = 0.0,
        dtype="float32",
        branch_scale: str = "none",
        fast_backward: bool = True,
        rngs: nnx.Rngs,
    ):
        super().__init__(
            d_model, num_heads, causal=causal, qkv_bias=qkv_bias, dropout=dropout, dtype=dtype,
            branch_scale=branch_scale, fast_backward=fast_backward, rngs=rngs,
        )  # fmt: skip
        self.w_v, self.b_v = _dense(rngs, d_model, d_model, beta), _zeros(d_model)
        self.w_o, self.b_o = _dense(rngs, d_model, d_model, beta), _zeros(d_model)

    def value_output(self):
        return self.w_v[...], self.w_o[...], self.b_v[...], self.b_o[...]

    def eigenvalues(self) -> np.ndarray:
        """Complex eigenvalues of H = W_V W_O, sorted by modulus (descending). H is not symmetric, and
        XLA has no general eigensolver off CPU, so this runs on the host in float64 (not jit-able)."""
        return eigvals_by_modulus(np.asarray(self.effective_h(), np.float64))


class SpectralAttention(_AttentionBase):
    """Self-attention with W_V = V diag(lambda), W_O = V^-1 (PAPER.md section 2): the eigenvalues of
    H = W_V W_O are lambda, constrained by `spectrum` for any parameter values.

    alpha: the residual scale of the enclosing block (DeepNorm); the spectrum's range is stated for the
    effective update H / alpha, so lambda lies in alpha * [lo, hi]. beta: DeepNorm's init scale; it
    multiplies the initial lambda by beta^2 (as it multiplies H when scaling W_V and W_O), see
    `spectral.init`. No V/O biases: a bias would add a constant (DC) vector to every token and escape the
    constraint.
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        spectrum: Spectrum,
        *,
        causal: bool = False,
        alpha: float = 1.0,
        beta: float = 1.0,
        qkv_bias: bool = True,
        dropout: float = 0.0,
        dtype="float32",
        branch_scale: str = "none",
        fast_backward: bool = True,
        rngs: nnx.Rngs,
    ):
        if not isinstance(spectrum, Spectrum):
            raise ValueError(f"spectrum must be a jaxsmooth.Spectrum, got {type(spectrum).__name__}")
        super().__init__(
            d_model, num_heads, causal=causal, qkv_bias=qkv_bias, dropout=dropout, dtype=dtype,
            branch_scale=branch_scale, fast_backward=fast_backward, rngs=rngs,
        )  # fmt: skip
        self.spectrum, self.alpha = spectrum, float(alpha)
        theta, psi_D = spectral.init(rngs.params(), d_model, spectrum, alpha=alpha, scale=beta**2)
        if spectrum.basis == "orthogonal":
            self.theta = EigBasis(theta)
        else:
            self.theta = EigBasis(theta["u"])
            self.theta_w = EigBasis(theta["w"])
            self.theta_s = EigBasis(theta["s"])
        self.psi = EigVals(psi_D)

    def _theta(self):
        if self.spectrum.basis == "orthogonal":
            return self.theta[...]
        return {"u": self.theta[...], "w": self.theta_w[...], "s": self.theta_s[...]}

    def value_output(self):
        w_v, w_o = spectral.value_projection(self._theta(), self.psi[...], self.spectrum, self.alpha)
        return w_v, w_o, None, None

    def eigenvalues(self) -> jnp.ndarray:
        """lambda_D: the (real) eigenvalues of H, exact by construction; jit-able on any device."""
        return spectral.eigenvalues(self.psi[...], self.spectrum, self.alpha)


def eigvals_by_modulus(h_xDxD: np.ndarray) -> np.ndarray:
    """Eigenvalues of (a stack of) square matrices, each sorted by decreasing modulus."""
    ev = np.linalg.eigvals(h_xDxD)
    order = np.argsort(-np.abs(ev), axis=-1, kind="stable")
    return np.take_along_axis(ev, order, axis=-1)
