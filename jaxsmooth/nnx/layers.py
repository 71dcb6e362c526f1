"""Flax NNX layers over the pure functions of `jaxsmooth.attention` and `jaxsmooth.spectral` (shape letters:
`jaxsmooth.nnx`).

`SpectralAttention` and the unconstrained `Attention` take `flax.nnx.MultiHeadAttention`'s constructor and
call arguments with the same names, order and meaning where they make sense for a square H = W_V W_O:

    nnx.MultiHeadAttention(num_heads, in_features, ..., dropout_rate=0.1, decode=False, rngs=rngs)
    jaxsmooth.nnx.SpectralAttention(num_heads, in_features, ..., dropout_rate=0.1, decode=False,
                                    spectrum=jaxsmooth.Spectrum("sharpen"), rngs=rngs)
    layer(inputs_q, inputs_k=None, inputs_v=None, *, mask=None, deterministic=None, rngs=None,
          sow_weights=False, decode=None)

so a block written against the Flax class works with only the class swapped (plus `spectrum=`). Masks are
Flax's boolean [batch..., N | 1, T, S] masks (`nnx.make_attention_mask`, `nnx.make_causal_mask`), any
leading batch dimensions work, `inputs_k` / `inputs_v` give cross-attention, dropout follows `.train()` /
`.eval()` and `deterministic` exactly as in Flax, `sow_weights` sows the attention weights into
`nnx.Intermediate`, and `decode=True` after `init_cache` runs a KV cache (one or more new tokens per call).

What differs, and why (docs/design.md):
- H must be square, so in_features = qkv_features = out_features (and the key/value inputs have that width
  too); no grouped-query attention. Other values raise a ValueError that says so.
- `SpectralAttention` has no value / output biases by default (`value_bias=False`): a bias adds the same
  vector to every token, a DC term outside the constraint. `use_bias` covers the Q and K projections.
  `Attention(value_bias=None)` follows `use_bias` as Flax does.
- The spectral parameters (theta, psi) are float32 whatever `param_dtype` is: QR in bf16 is not a
  rotation. `kernel_init` / `bias_init` apply to the Q and K projections (and the baseline's V and O).
- Parameters are W[in, out] matrices (w_q, w_k, w_v, w_o), not Flax's [in, heads, head_dim] kernels; every
  parameter carries logical sharding names (`out_sharding` metadata: "embed", "heads", "mlp", ...) that
  `nnx.get_partition_spec` returns under `jaxsmooth.train.parallel` sharding rules.

Initialisation (ViT-style): xavier-uniform matrices, zero biases; DeepNorm's beta multiplies W_V, W_O and
both MLP matrices (not W_Q, W_K); for spectral attention beta^2 multiplies the initial eigenvalues.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxsmooth import attention as attn_fn
from jaxsmooth import spectral
from jaxsmooth.config import Spectrum
from jaxsmooth.nnx.variables import BranchScale, EigBasis, EigVals, LNGain

default_kernel_init = jax.nn.initializers.xavier_uniform()
default_bias_init = jax.nn.initializers.zeros
BRANCH_SCALES = ("none", "attnscale", "featscale")


def param(kind: type[nnx.Variable], value: Any, names: Sequence[str | None], **metadata: Any) -> nnx.Variable:
    """A Variable of type `kind` carrying logical sharding names (`out_sharding` metadata).

    `value` may be a plain array, or the `VariableMetadata` an initializer wrapped by
    `nnx.with_partitioning` returns: the user's partitioning then wins over `names`, as in Flax. Our own
    names are attached without eager sharding, so a model builds without a mesh; `jaxsmooth.train.parallel`
    maps them onto a mesh when one is used.

    Args:
      kind: the Variable type (`nnx.Param`, `EigVals`, ...).
      value: the initial value (an array or an initializer's `VariableMetadata`).
      names: one logical axis name (or None) per dimension.
      **metadata: more Variable metadata (e.g. `lr_scale`, `weight_decay`).

    Returns:
      The Variable.
    """
    if isinstance(value, nnx.variablelib.VariableMetadata):
        return kind(value, out_sharding=tuple(names), **metadata)
    return kind(value, out_sharding=tuple(names), eager_sharding=False, **metadata)


def as_key(rngs: nnx.Rngs | nnx.RngStream | jax.Array | None) -> jax.Array | None:
    """A dropout key from Flax's `rngs` call argument, as `nnx.Dropout` reads it.

    Args:
      rngs: an `nnx.Rngs` (a key is drawn from its "dropout" stream), an `nnx.RngStream` (a key is drawn
        from it), a PRNG key (used as it is), or None.

    Returns:
      A PRNG key, or None when rngs is None.
    """
    if rngs is None:
        return None
    if isinstance(rngs, nnx.Rngs):
        return rngs.dropout()
    if isinstance(rngs, nnx.RngStream):
        return rngs()
    return rngs  # a jax PRNG key (used by jaxsmooth's scanned blocks, which carry no Rng state)


class LayerNorm(nnx.Module):
    """LayerNorm with float32 statistics; gain="positive" makes the gain softplus(g) > 0.

    Args:
      d: width D.
      gain: "free" (a plain gain) or "positive" (softplus of a free parameter, starting at 1).
      eps: added to the variance.
      lr_scale: stored as `lr_scale` metadata on the gain and bias when != 1; `jaxsmooth.train.optim`
        multiplies their updates by it (DeepNorm's main-path LayerNorms, `ModelConfig.ln_lr`).
    """

    def __init__(self, d: int, *, gain: str = "free", eps: float = 1e-6, lr_scale: float = 1.0):
        if gain not in ("free", "positive"):
            raise ValueError(f"gain={gain!r}; choose free or positive")
        self.positive = gain == "positive"
        self.eps = eps
        meta = {} if lr_scale == 1.0 else {"lr_scale": float(lr_scale)}
        # softplus(log(e - 1)) = 1: both gain types start at the identity gain.
        start = np.log(np.e - 1.0) if self.positive else 1.0
        self.gain = param(LNGain, jnp.full((d,), start, jnp.float32), ("embed",), **meta)
        self.bias = param(nnx.Param, jnp.zeros((d,), jnp.float32), ("embed",), **meta)

    def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
        """Normalise each token over D (float32 statistics) and apply the gain and bias.

        Args:
          x_BxTxD: tokens (any leading dimensions; D last).

        Returns:
          The normalised tokens, in x's dtype.
        """
        return attn_fn.layer_norm(
            x_BxTxD, self.gain[...], self.bias[...], eps=self.eps, positive=self.positive
        )

    def effective_gain(self) -> jnp.ndarray:
        """The gain LayerNorm multiplies by (softplus(g) for gain="positive").

        Returns:
          gain_D, float32.
        """
        return attn_fn.effective_gain(self.gain[...], self.positive)


class MLP(nnx.Module):
    """Position-wise GELU MLP, D -> M -> D; DeepNorm's beta scales both matrices at init.

    Args:
      d: width D.
      m: hidden width M.
      beta: DeepNorm's init scale on both matrices.
      dtype: compute dtype (parameters stay float32).
      fast_backward: see `jaxsmooth.attention.dense` (reverse mode only; False for jax.jvp).
      rngs: parameter randomness.
    """

    def __init__(
        self, d: int, m: int, *, beta: float = 1.0, dtype=jnp.float32, fast_backward: bool = True,
        rngs: nnx.Rngs,
    ):  # fmt: skip
        self.w1 = param(nnx.Param, beta * default_kernel_init(rngs.params(), (d, m)), ("embed", "mlp"))
        self.b1 = param(nnx.Param, jnp.zeros((m,), jnp.float32), ("mlp",))
        self.w2 = param(nnx.Param, beta * default_kernel_init(rngs.params(), (m, d)), ("mlp", "embed"))
        self.b2 = param(nnx.Param, jnp.zeros((d,), jnp.float32), ("embed",))
        self.dtype, self.fast_backward = dtype, fast_backward

    def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
        """GELU(x W1 + b1) W2 + b2.

        Args:
          x_BxTxD: tokens.

        Returns:
          y_BxTxD, in the compute dtype.
        """
        return attn_fn.mlp(
            x_BxTxD, self.w1[...], self.b1[...], self.w2[...], self.b2[...], dtype=self.dtype,
            fast_backward=self.fast_backward,
        )  # fmt: skip


def _check_int(name: str, value: Any) -> int:
    if not (isinstance(value, int | np.integer) and not isinstance(value, bool) and value >= 1):
        raise ValueError(
            f"{name}={value!r} must be a positive int. The signature follows flax.nnx.MultiHeadAttention: "
            "(num_heads, in_features, qkv_features=None, out_features=None, *, ..., rngs); "
            "pass spectrum= by keyword"
        )
    return int(value)


class AttentionBase(nnx.Module):
    """Q/K projections, the optional Wang et al. branch scales, dropout, the KV cache and the forward.

    Subclasses supply `value_output() -> (w_v_DxD, w_o_DxD, b_v_D | None, b_o_D | None)`.

    Args:
      num_heads, in_features, ..., fast_backward: see `Attention`.
    """

    def __init__(
        self,
        num_heads: int,
        in_features: int,
        qkv_features: int | None,
        out_features: int | None,
        num_kv_heads: int | None,
        in_kv_features: int | None,
        *,
        dtype,
        param_dtype,
        broadcast_dropout: bool,
        dropout_rate: float,
        deterministic: bool | None,
        kernel_init: Callable,
        bias_init: Callable,
        use_bias: bool,
        decode: bool | None,
        rngs: nnx.Rngs,
        keep_rngs: bool,
        branch_scale: str,
        fast_backward: bool,
    ):
        self.num_heads = _check_int("num_heads", num_heads)
        self.in_features = _check_int("in_features", in_features)
        d = self.in_features
        for name, v in (("qkv_features", qkv_features), ("out_features", out_features),
                        ("in_kv_features", in_kv_features)):  # fmt: skip
            if v is not None and _check_int(name, v) != d:
                raise ValueError(
                    f"{name}={v} differs from in_features={d}: H = W_V W_O must be square (D x D) for its "
                    "eigenvalues to be constrained, so jaxsmooth attention keeps one width D"
                )
        if num_kv_heads is not None and num_kv_heads != num_heads:
            raise ValueError(
                f"num_kv_heads={num_kv_heads} != num_heads={num_heads}: grouped-query attention shares "
                "value heads, so H = W_V W_O would not be a sum of per-head maps; not supported"
            )
        if d % self.num_heads:
            raise ValueError(f"num_heads={num_heads} must divide in_features={d}")
        if branch_scale not in BRANCH_SCALES:
            raise ValueError(f"branch_scale={branch_scale!r}; choose one of {', '.join(BRANCH_SCALES)}")
        if not 0.0 <= dropout_rate < 1.0:
            raise ValueError(f"dropout_rate={dropout_rate} must be in [0, 1)")
        self.qkv_features = self.out_features = self.in_kv_features = d
        self.num_kv_heads = self.num_heads
        self.head_dim = d // self.num_heads
        self.dtype = None if dtype is None else jnp.dtype(dtype)
        self.param_dtype = jnp.dtype(param_dtype)
        self.broadcast_dropout, self.dropout_rate = broadcast_dropout, float(dropout_rate)
        self.deterministic, self.decode = deterministic, decode
        self.use_bias, self.branch_scale, self.fast_backward = use_bias, branch_scale, fast_backward
        self.w_q = self._kernel(rngs, kernel_init, ("embed", "heads"))
        self.w_k = self._kernel(rngs, kernel_init, ("embed", "heads"))
        self.b_q = self._bias(rngs, bias_init) if use_bias else nnx.data(None)
        self.b_k = self._bias(rngs, bias_init) if use_bias else nnx.data(None)
        if branch_scale == "attnscale":
            self.attn_scale = param(BranchScale, jnp.zeros((self.num_heads,), jnp.float32), (None,))
        if branch_scale == "featscale":
            self.s_dc = param(BranchScale, jnp.zeros((d,), jnp.float32), ("embed",))
            self.s_hc = param(BranchScale, jnp.zeros((d,), jnp.float32), ("embed",))
        # As in Flax: the module keeps its own dropout stream (a fork of rngs.dropout) unless told not to.
        self.rngs = rngs.dropout.fork() if keep_rngs and dropout_rate > 0 else nnx.data(None)
        self.cached_key = nnx.data(None)
        self.cached_value = nnx.data(None)
        self.cache_index = nnx.data(None)

    def _kernel(self, rngs, init, names, scale: float = 1.0) -> nnx.Param:
        d = self.in_features
        value = init(rngs.params(), (d, d), self.param_dtype)
        if scale != 1.0:  # DeepNorm's beta: scale the array, keep any metadata of the user's initializer
            if isinstance(value, nnx.variablelib.VariableMetadata):
                value = value.replace(raw_value=scale * value.raw_value)
            else:
                value = scale * value
        return param(nnx.Param, value, names)

    def _bias(self, rngs, init, names=("heads",)) -> nnx.Param:
        return param(nnx.Param, init(rngs.params(), (self.in_features,), self.param_dtype), names)

    # ---- the maps the layer applies ---------------------------------------------------------------
    def set_view(self, deterministic: bool | None = None, decode: bool | None = None) -> None:
        """Used by `nnx.view` (as Flax's attention and dropout layers).

        Args:
          deterministic: the new default of the `deterministic` call argument (None: unchanged).
          decode: the new default of the `decode` call argument (None: unchanged).
        """
        if deterministic is not None:
            self.deterministic = deterministic
        if decode is not None:
            self.decode = decode

    def value_output(self):
        """The value and output projections as the forward pass uses them.

        Returns:
          (w_v_DxD, w_o_DxD, b_v_D | None, b_o_D | None).
        """
        raise NotImplementedError

    def effective_h(self) -> jnp.ndarray:
        """H = W_V W_O: the map the residual update A X H applies to each token.

        Returns:
          h_DxD, float32.
        """
        w_v, w_o, _, _ = self.value_output()
        return w_v.astype(jnp.float32) @ w_o.astype(jnp.float32)

    def head_maps(self) -> jnp.ndarray:
        """Every head's own map W_V[:, n] W_O[n, :] (its K columns of W_V, K rows of W_O).

        Returns:
          [N, D, D]; the maps sum to effective_h().
        """
        w_v, w_o, _, _ = self.value_output()
        d, k = self.in_features, self.head_dim
        w_v_DxNxK = w_v.reshape(d, self.num_heads, k)
        w_o_NxKxD = w_o.reshape(self.num_heads, k, d)
        return jnp.einsum("DNK,NKE->NDE", w_v_DxNxK, w_o_NxKxD)

    # ---- KV cache ---------------------------------------------------------------------------------
    def init_cache(self, input_shape: Sequence[int], dtype=jnp.float32) -> None:
        """Allocate the autoregressive cache (as `nnx.MultiHeadAttention.init_cache`); then call with
        `decode=True`, one or more tokens at a time.

        Args:
          input_shape: [batch..., max_length, features] of the longest input the cache will hold.
          dtype: the cached keys' and values' dtype.

        Returns:
          None (the cache lives in the layer's `nnx.Cache` variables).
        """
        *batch, max_len, feat = tuple(input_shape)
        if feat != self.in_features:
            raise ValueError(
                f"init_cache input_shape {tuple(input_shape)}: features must be {self.in_features}"
            )
        shape = (*batch, max_len, self.num_heads, self.head_dim)
        self.cached_key = nnx.Cache(jnp.zeros(shape, dtype))
        self.cached_value = nnx.Cache(jnp.zeros(shape, dtype))
        self.cache_index = nnx.Cache(jnp.array(0, dtype=jnp.int32))

    # ---- forward ----------------------------------------------------------------------------------
    def __call__(
        self,
        inputs_q: jax.Array,
        inputs_k: jax.Array | None = None,
        inputs_v: jax.Array | None = None,
        *,
        mask: jax.Array | None = None,
        deterministic: bool | None = None,
        rngs: nnx.Rngs | nnx.RngStream | jax.Array | None = None,
        sow_weights: bool = False,
        decode: bool | None = None,
        is_causal: bool = False,
    ) -> jax.Array:
        """Multi-head attention of `inputs_q` over `inputs_k` (default inputs_q) with values read from
        `inputs_v` (default inputs_k), exactly as `nnx.MultiHeadAttention.__call__`.

        Args:
          inputs_q: [batch..., T, D] queries' input.
          inputs_k, inputs_v: [batch..., S, D] keys' and values' inputs (cross-attention), or None.
          mask: boolean [batch..., N | 1, T, S] (True = attend), e.g. `nnx.make_causal_mask`.
          deterministic: no dropout if True; overrides the attribute (set by `.train()` / `.eval()`).
          rngs: dropout randomness (`nnx.Rngs`, an `RngStream` or a PRNG key); default: the layer's own.
          sow_weights: sow the attention weights [batch..., N, T, S] into `nnx.Intermediate`
            ("attention_weights").
          decode: use the KV cache (`init_cache` first); overrides the attribute.
          is_causal: also apply a causal mask (key s <= query t, offset by the cache index in decode).

        Returns:
          [batch..., T, D].
        """
        y, att = self.attend(
            inputs_q, inputs_k, inputs_v, mask=mask, deterministic=deterministic, rngs=rngs,
            decode=decode, is_causal=is_causal,
        )  # fmt: skip
        if sow_weights:
            self.sow(nnx.Intermediate, "attention_weights", att)
        return y

    def attend(
        self,
        inputs_q: jax.Array,
        inputs_k: jax.Array | None = None,
        inputs_v: jax.Array | None = None,
        *,
        mask: jax.Array | None = None,
        deterministic: bool | None = None,
        rngs: nnx.Rngs | nnx.RngStream | jax.Array | None = None,
        decode: bool | None = None,
        is_causal: bool = False,
        value_output: tuple | None = None,
    ) -> tuple[jax.Array, jax.Array]:
        """`__call__` that also returns the attention weights.

        Args:
          inputs_q, inputs_k, inputs_v, mask, deterministic, rngs, decode, is_causal: as `__call__`.
          value_output: this layer's (w_v_DxD, w_o_DxD, b_v_D | None, b_o_D | None) if already composed
            (the block stack composes every layer's spectral W_V, W_O once, before its scan), or None.

        Returns:
          (y [batch..., T, D], att [batch..., N, T, S]): the attention weights are float32, before
          dropout.
        """
        inputs_q, inputs_k, inputs_v = self._check_inputs(inputs_q, inputs_k, inputs_v)
        batch, t, d = inputs_q.shape[:-2], inputs_q.shape[-2], self.in_features
        nb = math.prod(batch)  # the batch dimensions, flattened: "B" below
        flat = lambda x: x.reshape(nb, x.shape[-2], d)
        w_v, w_o, b_v, b_o = self.value_output() if value_output is None else value_output
        dtype = self.dtype or jnp.result_type(inputs_q.dtype, self.w_q.get_value().dtype)
        proj = dict(num_heads=self.num_heads, dtype=dtype, fast_backward=self.fast_backward)
        q_BxNxTxK = attn_fn.project_heads(flat(inputs_q), self.w_q[...], _get(self.b_q), **proj)
        k_BxNxSxK = attn_fn.project_heads(flat(inputs_k), self.w_k[...], _get(self.b_k), **proj)
        v_BxNxSxK = attn_fn.project_heads(flat(inputs_v), w_v, b_v, **proj)

        m = self._flat_mask(mask, batch)
        offset = 0
        decode = bool(self.decode) if decode is None else decode
        if decode:
            k_BxNxSxK, v_BxNxSxK, offset = self._update_cache(k_BxNxSxK, v_BxNxSxK, batch)
            pos_S = jnp.arange(k_BxNxSxK.shape[2])
            # Cached self-attention is causal: query t (absolute position offset + t) sees keys <= it;
            # this also hides the cache slots not written yet.
            cached = (pos_S[None, :] <= offset + jnp.arange(t)[:, None])[None, None]
            m = cached if m is None else jnp.logical_and(m, cached)
        s = k_BxNxSxK.shape[2]
        allowed = attn_fn.allowed_keys(nb, t, s, mask=m, causal=is_causal, offset=offset)
        z_BxTxD, att_BxNxTxS = attn_fn.attend(
            q_BxNxTxK, k_BxNxSxK, v_BxNxSxK, allowed=allowed,
            attn_scale_H=self.attn_scale[...] if self.branch_scale == "attnscale" else None,
            dropout_rate=self.dropout_rate, dropout_key=self._dropout_key(deterministic, rngs),
            broadcast_dropout=self.broadcast_dropout, dtype=dtype,
        )  # fmt: skip
        matmul = attn_fn.dense if self.fast_backward else jnp.matmul
        y_BxTxD = matmul(z_BxTxD, w_o.astype(dtype))
        if b_o is not None:
            y_BxTxD = y_BxTxD + b_o.astype(dtype)[None, None, :]
        if self.branch_scale == "featscale":
            if decode:
                raise NotImplementedError(
                    "branch_scale='featscale' with decode=True: its running token mean needs the branch "
                    "outputs of every earlier token, which the KV cache does not keep"
                )
            y_BxTxD = attn_fn.feat_scale(y_BxTxD, self.s_dc[...], self.s_hc[...], causal=is_causal)
        return y_BxTxD.reshape(*batch, t, d), att_BxNxTxS.reshape(*batch, *att_BxNxTxS.shape[1:])

    def _check_inputs(self, inputs_q, inputs_k, inputs_v):
        """Flax's defaults (keys from the queries' input, values from the keys'), and the shape checks."""
        if inputs_k is None:
            if inputs_v is not None:
                raise ValueError(
                    "`inputs_k` cannot be None if `inputs_v` is not None (as in Flax): pass the keys' "
                    "input as inputs_k"
                )
            inputs_k = inputs_q
        if inputs_v is None:
            inputs_v = inputs_k
        d = self.in_features
        for name, x in (("inputs_q", inputs_q), ("inputs_k", inputs_k), ("inputs_v", inputs_v)):
            if x.ndim < 2 or x.shape[-1] != d:
                raise ValueError(f"{name} has shape {x.shape}; expected [batch..., length, {d}]")
        if inputs_k.shape[:-2] != inputs_q.shape[:-2] or inputs_v.shape[:-1] != inputs_k.shape[:-1]:
            raise ValueError(
                f"inputs_q {inputs_q.shape}, inputs_k {inputs_k.shape} and inputs_v {inputs_v.shape} must "
                "share their batch dimensions, and inputs_k / inputs_v their length"
            )
        return inputs_q, inputs_k, inputs_v

    @staticmethod
    def _flat_mask(mask, batch):
        """A Flax mask [batch..., N | 1, T, S] with the batch dimensions flattened, or None."""
        if mask is None:
            return None
        mask = jnp.asarray(mask)
        if mask.ndim != len(batch) + 3:
            raise ValueError(
                f"mask has shape {mask.shape}; expected [batch..., heads | 1, T, S] with batch dims "
                f"{batch} (nnx.make_attention_mask / nnx.make_causal_mask build such masks)"
            )
        return jnp.broadcast_to(mask, (*batch, *mask.shape[-3:])).reshape(math.prod(batch), *mask.shape[-3:])

    def _update_cache(self, k_BxNxTxK, v_BxNxTxK, batch):
        if self.cached_key is None or self.cached_value is None or self.cache_index is None:
            raise ValueError("Autoregressive cache not initialized, call ``init_cache`` first.")
        cache_k = self.cached_key[...]
        *cb, max_len, n, kd = cache_k.shape
        if tuple(cb) != tuple(batch):
            raise ValueError(f"the cache was made for batch dims {tuple(cb)}, the input has {tuple(batch)}")
        nb = k_BxNxTxK.shape[0]
        t = k_BxNxTxK.shape[2]
        idx = self.cache_index[...]
        to_cache = lambda a: a.transpose(0, 2, 1, 3).reshape(*batch, t, n, kd).astype(cache_k.dtype)
        zero = jnp.zeros((), jnp.int32)
        start = (zero,) * len(batch) + (idx, zero, zero)
        new_k = jax.lax.dynamic_update_slice(cache_k, to_cache(k_BxNxTxK), start)
        new_v = jax.lax.dynamic_update_slice(self.cached_value[...], to_cache(v_BxNxTxK), start)
        self.cached_key[...] = new_k
        self.cached_value[...] = new_v
        self.cache_index[...] = idx + t
        heads_major = lambda a: a.reshape(nb, max_len, n, kd).transpose(0, 2, 1, 3)
        return heads_major(new_k), heads_major(new_v), idx

    def _dropout_key(self, deterministic, rngs) -> jax.Array | None:
        """Flax's rule: with dropout_rate > 0, `deterministic` must come from the call or the attribute
        (`.train()` / `.eval()` set it); when not deterministic, randomness comes from the call's `rngs`
        or the layer's own stream."""
        if self.dropout_rate == 0.0:
            return None
        det = deterministic if deterministic is not None else self.deterministic
        if det is None:
            raise ValueError(
                f"{type(self).__name__} has dropout_rate={self.dropout_rate} but no `deterministic`: pass "
                "deterministic= to the call or the constructor, or use .train() / .eval()"
            )
        if det:
            return None
        key = as_key(rngs if rngs is not None else self.rngs)
        if key is None:
            raise ValueError(
                "dropout needs randomness: pass rngs= to the call, or construct the layer with rngs and "
                "keep_rngs=True"
            )
        return key


def _get(v):
    return None if v is None else v[...]


class Attention(AttentionBase):
    """Unconstrained multi-head attention (the baseline): `nnx.MultiHeadAttention`'s signature, with
    W_V, W_O free and H = W_V W_O available as `effective_h()` / `eigenvalues()`.

    Args (as `nnx.MultiHeadAttention`'s; the module docstring says what differs):
      num_heads: number of heads N; must divide in_features.
      in_features: width D of the inputs (queries, keys and values) and of the output.
      qkv_features, out_features, in_kv_features: None or D (H = W_V W_O must be square).
      num_kv_heads: None or num_heads (no grouped-query attention).
      dtype: compute dtype (None: inferred from the inputs and parameters).
      param_dtype: dtype of the Q/K (and baseline V/O) parameters.
      broadcast_dropout: one attention-dropout pattern for the whole batch and all heads.
      dropout_rate: attention-dropout probability.
      deterministic: the default of the call argument (`.train()` / `.eval()` / `nnx.view` set it).
      kernel_init, out_kernel_init: initializers of W_Q, W_K, W_V and of W_O (default: kernel_init).
      bias_init, out_bias_init: initializers of the biases and of the output bias (default: bias_init).
      use_bias: Q and K biases (and V, O unless value_bias says otherwise).
      decode: the default of the call argument (use the KV cache).
      rngs: parameter randomness, and the layer's own dropout stream (keep_rngs).
      keep_rngs: keep a fork of rngs.dropout for calls without rngs (as Flax).
      value_bias: biases on the V and O projections (None: follow use_bias, as Flax does).
      beta: DeepNorm's init scale on W_V and W_O.
      branch_scale: "none" | "attnscale" | "featscale" (Wang et al. 2022).
      fast_backward: see `jaxsmooth.attention.dense` (reverse mode only; False for jax.jvp).

    Example::

      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from jaxsmooth.nnx import Attention
      >>> layer = Attention(num_heads=4, in_features=16, rngs=nnx.Rngs(0))
      >>> layer(jnp.ones((2, 5, 16))).shape
      (2, 5, 16)
      >>> layer.eigenvalues().shape  # complex, sorted by modulus
      (16,)
    """

    def __init__(
        self,
        num_heads: int,
        in_features: int,
        qkv_features: int | None = None,
        out_features: int | None = None,
        num_kv_heads: int | None = None,
        in_kv_features: int | None = None,
        *,
        dtype=None,
        param_dtype=jnp.float32,
        broadcast_dropout: bool = True,
        dropout_rate: float = 0.0,
        deterministic: bool | None = None,
        kernel_init: Callable = default_kernel_init,
        out_kernel_init: Callable | None = None,
        bias_init: Callable = default_bias_init,
        out_bias_init: Callable | None = None,
        use_bias: bool = True,
        decode: bool | None = None,
        rngs: nnx.Rngs,
        keep_rngs: bool = True,
        value_bias: bool | None = None,
        beta: float = 1.0,
        branch_scale: str = "none",
        fast_backward: bool = True,
    ):
        super().__init__(
            num_heads, in_features, qkv_features, out_features, num_kv_heads, in_kv_features,
            dtype=dtype, param_dtype=param_dtype, broadcast_dropout=broadcast_dropout,
            dropout_rate=dropout_rate, deterministic=deterministic, kernel_init=kernel_init,
            bias_init=bias_init, use_bias=use_bias, decode=decode, rngs=rngs, keep_rngs=keep_rngs,
            branch_scale=branch_scale, fast_backward=fast_backward,
        )  # fmt: skip
        self.value_bias = use_bias if value_bias is None else value_bias
        self.w_v = self._kernel(rngs, kernel_init, ("embed", "heads"), beta)
        self.w_o = self._kernel(rngs, out_kernel_init or kernel_init, ("heads", "embed"), beta)
        self.b_v = self._bias(rngs, bias_init) if self.value_bias else nnx.data(None)
        self.b_o = (
            self._bias(rngs, out_bias_init or bias_init, ("embed",)) if self.value_bias else nnx.data(None)
        )

    def value_output(self):
        """The free value and output projections.

        Returns:
          (w_v_DxD, w_o_DxD, b_v_D | None, b_o_D | None).
        """
        return self.w_v[...], self.w_o[...], _get(self.b_v), _get(self.b_o)

    def eigenvalues(self) -> np.ndarray:
        """The eigenvalues of H = W_V W_O. H is not symmetric, and XLA has no general eigensolver off CPU,
        so this runs on the host in float64 (not jit-able).

        Returns:
          lam_D, complex, sorted by decreasing modulus (numpy).
        """
        return eigvals_by_modulus(np.asarray(self.effective_h(), np.float64))


class SpectralAttention(AttentionBase):
    """Attention with W_V = V diag(lambda), W_O = V^-1 (docs/theory.md): the eigenvalues of H = W_V W_O
    are lambda, held in `spectrum`'s interval for any parameter values.

    Args (as `nnx.MultiHeadAttention`'s; the module docstring says what differs):
      num_heads: number of heads N; must divide in_features.
      in_features: width D of the inputs (queries, keys and values) and of the output.
      qkv_features, out_features, in_kv_features: None or D (H = W_V W_O must be square).
      num_kv_heads: None or num_heads (no grouped-query attention).
      dtype: compute dtype (None: inferred from the inputs and parameters).
      param_dtype: dtype of the Q/K (and baseline V/O) parameters.
      broadcast_dropout: one attention-dropout pattern for the whole batch and all heads.
      dropout_rate: attention-dropout probability.
      deterministic: the default of the call argument (`.train()` / `.eval()` / `nnx.view` set it).
      kernel_init, bias_init: initializers of W_Q, W_K and of the biases.
      use_bias: Q and K biases.
      decode: the default of the call argument (use the KV cache).
      rngs: parameter randomness, and the layer's own dropout stream (keep_rngs).
      keep_rngs: keep a fork of rngs.dropout for calls without rngs (as Flax).
      spectrum: the constraint (`jaxsmooth.Spectrum`), required.
      value_bias: V and O biases (default False: they add a DC term outside the constraint).
      alpha: the enclosing block's residual scale (DeepNorm); the range is stated for H / alpha, so
        lambda lies in alpha * [lo, hi].
      beta: DeepNorm's init scale; the initial lambda are multiplied by beta^2 (as beta multiplies H when
        it scales W_V and W_O), see `spectral.init`.
      branch_scale, fast_backward: as for `Attention`.

    Example (a Flax attention layer with only the class swapped, plus `spectrum=`)::

      >>> import jax.numpy as jnp, jaxsmooth
      >>> from flax import nnx
      >>> layer = jaxsmooth.nnx.SpectralAttention(4, 16, spectrum=jaxsmooth.Spectrum("sharpen"),
      ...                                         dropout_rate=0.1, rngs=nnx.Rngs(0))
      >>> layer.eval()  # no dropout (layer.train() turns it on)
      >>> x = jnp.ones((2, 5, 16))
      >>> layer(x, mask=nnx.make_causal_mask(jnp.ones((2, 5)))).shape
      (2, 5, 16)
      >>> bool(layer.eigenvalues().max() < 0)  # sharpen: every eigenvalue of W_V W_O in [-1, 0)
      True
    """

    def __init__(
        self,
        num_heads: int,
        in_features: int,
        qkv_features: int | None = None,
        out_features: int | None = None,
        num_kv_heads: int | None = None,
        in_kv_features: int | None = None,
        *,
        spectrum: Spectrum | None = None,
        dtype=None,
        param_dtype=jnp.float32,
        broadcast_dropout: bool = True,
        dropout_rate: float = 0.0,
        deterministic: bool | None = None,
        kernel_init: Callable = default_kernel_init,
        bias_init: Callable = default_bias_init,
        use_bias: bool = True,
        decode: bool | None = None,
        rngs: nnx.Rngs,
        keep_rngs: bool = True,
        value_bias: bool = False,
        alpha: float = 1.0,
        beta: float = 1.0,
        branch_scale: str = "none",
        fast_backward: bool = True,
    ):
        if not isinstance(spectrum, Spectrum):
            positional = [a for a in (qkv_features, out_features) if isinstance(a, Spectrum)]
            raise ValueError(
                "SpectralAttention needs spectrum=jaxsmooth.Spectrum(...) by keyword"
                + (" (a Spectrum was passed positionally: the signature follows nnx.MultiHeadAttention, "
                   "SpectralAttention(num_heads, in_features, *, spectrum=..., rngs=...))"
                   if positional else "")
                + f"; got spectrum={spectrum!r}"
            )  # fmt: skip
        super().__init__(
            num_heads, in_features, qkv_features, out_features, num_kv_heads, in_kv_features,
            dtype=dtype, param_dtype=param_dtype, broadcast_dropout=broadcast_dropout,
            dropout_rate=dropout_rate, deterministic=deterministic, kernel_init=kernel_init,
            bias_init=bias_init, use_bias=use_bias, decode=decode, rngs=rngs, keep_rngs=keep_rngs,
            branch_scale=branch_scale, fast_backward=fast_backward,
        )  # fmt: skip
        d = self.in_features
        self.spectrum, self.alpha, self.value_bias = spectrum, float(alpha), bool(value_bias)
        theta, psi_D = spectral.init(rngs.params(), d, spectrum, alpha=alpha, scale=beta**2)
        # V's columns are W_V's columns, grouped by head like W_Q's: the same logical names.
        if spectrum.basis == "orthogonal":
            self.theta = param(EigBasis, theta, ("embed", "heads"))
        else:
            self.theta = param(EigBasis, theta["u"], ("embed", "heads"))
            self.theta_w = param(EigBasis, theta["w"], ("embed", "heads"))
            self.theta_s = param(EigBasis, theta["s"], ("heads",))
        # psi decays (like the baseline's W_V, W_O, pulling lambda towards 0) unless psi = 0 is not
        # lambda = 0, as with the sigmoid bound (docs/design.md, "Weight decay").
        self.psi = EigVals(psi_D, out_sharding=("heads",), eager_sharding=False,
                           weight_decay=spectrum.bound == "clip")  # fmt: skip
        self.b_v = self._bias(rngs, bias_init) if self.value_bias else nnx.data(None)
        self.b_o = self._bias(rngs, bias_init, ("embed",)) if self.value_bias else nnx.data(None)

    def _theta(self):
        if self.spectrum.basis == "orthogonal":
            return self.theta[...]
        return {"u": self.theta[...], "w": self.theta_w[...], "s": self.theta_s[...]}

    def value_output(self):
        """W_V = V diag(lambda), W_O = V^-1 composed from (theta, psi) in float32 (`spectral`).

        Returns:
          (w_v_DxD, w_o_DxD, b_v_D | None, b_o_D | None).
        """
        w_v, w_o = spectral.value_projection(self._theta(), self.psi[...], self.spectrum, self.alpha)
        return w_v, w_o, _get(self.b_v), _get(self.b_o)

    def eigenvalues(self) -> jnp.ndarray:
        """The (real) eigenvalues of H = W_V W_O, exact by construction; jit-able on any device.

        Returns:
          lam_D, float32.
        """
        return spectral.eigenvalues(self.psi[...], self.spectrum, self.alpha)


def eigvals_by_modulus(h_xDxD: np.ndarray) -> np.ndarray:
    """Eigenvalues of (a stack of) square matrices, each sorted by decreasing modulus (host, numpy).

    Args:
      h_xDxD: [..., D, D].

    Returns:
      [..., D] complex eigenvalues.
    """
    ev = np.linalg.eigvals(h_xDxD)
    order = np.argsort(-np.abs(ev), axis=-1, kind="stable")
    return np.take_along_axis(ev, order, axis=-1)
