"""The block stack: `depth` blocks built by nnx.vmap and run by a scan, so init and compile time do not
grow with depth (docs/theory.md section 5 for DeepNorm). Shape letters: `jaxsmooth.nnx`.

    pre_ln:   x = x + Attn(LN1(x));            x = x + MLP(LN2(x));            final LN after the stack
    post_ln:  x = LN1(x + Attn(x));            x = LN2(x + MLP(x))
    deepnorm: x = LN1(alpha x + Attn(x));      x = LN2(alpha x + MLP(x))        (DeepNet)

Running the stack: the stacked block state is split off once (nnx.split), a pure body merges one layer's
slice and applies it, and jax.lax.scan runs the body over the leading [L] axis. The body returns only
the new activations (and per-layer statistics), never parameters, so XLA does not copy the stack.
Per-layer inputs (`LayerInputs`: dropout keys, stochastic-depth rates, composed spectral weights) ride
the scan as xs; depth constants (alpha) are closed over.

Spectral layers: with remat="none", W_V = V diag(lambda), W_O = V^-1 of every layer are composed before
the scan, in one batched call over the [L] axis, and ride the scan as xs: composing inside the body runs
L separate QR / triangular-solve LAPACK calls per step (forward and backward), each a small serial call
between the layer's matmuls (and LAPACK brings its own BLAS thread pool, `spectral.limit_lapack_threads`).
The memory-saving modes ("full", "nested") keep their promise instead and compose each layer inside its
own checkpointed body, as a plain layer would (see `_run_stack`).

remat: "none"   the scan saves each layer's matmul outputs (jax.checkpoint_policies.dots_saveable) and
                recomputes the elementwise work (LayerNorm, softmax, GELU) in the backward pass: O(L)
                memory, no matmul recomputed, ~2.4x less saved than keeping everything (ViT-Tiny).
       "full"   each layer is checkpointed: only the [B, T, D] carry of each layer is saved.
       "nested" groups of G layers (G = remat_group or about sqrt(L), see `nested_group`) are
                checkpointed and, inside a group, each layer again: about (L / G + G) carries, i.e.
                O(sqrt(L)) memory, for the price of one more forward pass.

Calling convention (as every jaxsmooth model): `stack(x_BxTxD)` returns the output array only;
`stack.forward(x_BxTxD, stats=..., attention=...)` returns a `StackOutput` that also carries the
per-layer statistics and attention weights. Dropout follows `nnx.Dropout`: `deterministic` and `rngs`
(see `Transformer.forward`).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Literal

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxsmooth import attention as attn_fn
from jaxsmooth import metrics
from jaxsmooth.attention import dropout as _dropout
from jaxsmooth.attention import rms_normalize as _rms
from jaxsmooth.config import ModelConfig
from jaxsmooth.nnx.layers import MLP, Attention, LayerNorm, SpectralAttention, as_key, eigvals_by_modulus

StatsMode = Literal["none", "logged", "full"]
# "logged": `metrics.LAYER_STAT_KEYS` (O(T D) each: cheap enough for the train step's statistics
# variant); "full": `metrics.FULL_LAYER_STAT_KEYS` (adds an SVD per example and layer).
STATS_MODES: tuple[str, ...] = ("none", "logged", "full")


def check_stats_mode(stats: str) -> str:
    """Validate a `stats=` argument.

    Args:
      stats: "none", "logged" (`metrics.LAYER_STAT_KEYS`) or "full" (`metrics.FULL_LAYER_STAT_KEYS`).

    Returns:
      `stats`, unchanged.
    """
    if stats not in STATS_MODES:
        raise ValueError(f"stats={stats!r}; choose one of {', '.join(STATS_MODES)}")
    return stats


@flax.struct.dataclass
class LayerInputs:
    """What one block receives from the scan besides its parameters and the carry (all optional, each
    with a leading [L] axis while it rides the scan, and without it inside the body).

    Args:
      value_output: this layer's precomputed (w_v_DxD, w_o_DxD, b_v_D | None, b_o_D | None) (the stack
        composes every spectral layer's W_V, W_O once, before its scan), or None: the block reads them.
      rngs: this layer's dropout key (a PRNG key array; the layers' `rngs=`), or None: deterministic.
      drop_path: this layer's stochastic-depth rate (a scalar; applied only with `rngs`), or None.
    """

    # Field order = the leaf order of the scan's xs before this struct existed (weights, keys, rates).
    value_output: tuple | None = None
    rngs: jax.Array | None = None
    drop_path: jax.Array | None = None


@flax.struct.dataclass
class StackOutput:
    """What `Transformer.forward` returns (a pytree: it passes through jit, grad's has_aux and scans).

    Args:
      hidden: the stack's output [B, T, D] (after the final LayerNorm of a pre-LN stack).
      stats: None unless asked for; else {"<stat>": [L] per-layer smoothing metrics of the residual
        stream after each block, ..., "input": {"<stat>": scalar, the same of the stack's input}} (so
        input then layers gives L + 1 points); the keys are `metrics.LAYER_STAT_KEYS` or, with
        stats="full", `metrics.FULL_LAYER_STAT_KEYS`.
      attention: None unless asked for; else the batch-averaged attention weights [L, N, T, T].
    """

    hidden: jax.Array
    stats: dict[str, Any] | None = None
    attention: jax.Array | None = None


class Block(nnx.Module):
    """One attention + MLP block (the `residual` arrangement of the module docstring).

    Args:
      config: the model's shape and options (`ModelConfig`).
      causal: causal self-attention.
      rngs: parameter randomness (dropout keys come with each call, in `LayerInputs`).
    """

    def __init__(self, config: ModelConfig, *, causal: bool = False, rngs: nnx.Rngs):
        c = config
        alpha, beta = c.alpha_beta
        self.residual, self.alpha, self.dropout, self.causal = c.residual, alpha, c.dropout, causal
        self.value_norm, self.ln_eps = c.value_norm, c.ln_eps
        dtype = jnp.dtype(c.dtype)
        # Dropout keys ride the scan explicitly (keep_rngs=False: no Rng state in the layer stack);
        # one dropout pattern per example and head, as before (broadcast_dropout=False).
        common = dict(
            dtype=dtype, beta=beta, use_bias=c.qkv_bias, value_bias=c.vo_bias, dropout_rate=c.dropout,
            broadcast_dropout=False, branch_scale=c.branch_scale, fast_backward=c.fast_backward,
            keep_rngs=False, rngs=rngs,
        )  # fmt: skip
        if c.spectrum is None:
            self.attn = Attention(c.num_heads, c.d_model, **common)
        else:
            # The branch is compared with alpha * x on the skip path, so the spectral range is scaled by
            # alpha (only DeepNorm has alpha != 1).
            self.attn = SpectralAttention(c.num_heads, c.d_model, spectrum=c.spectrum, alpha=alpha, **common)
        # lr_scale: DeepNorm's main-path LayerNorms learn at lr / (2L) (ModelConfig.ln_lr).
        ln = dict(gain=c.ln_gain, eps=c.ln_eps, lr_scale=c.ln_lr_scale)
        self.ln1 = LayerNorm(c.d_model, **ln)
        self.ln2 = LayerNorm(c.d_model, **ln)
        self.mlp = MLP(c.d_model, c.mlp_dim, beta=beta, dtype=dtype, fast_backward=c.fast_backward, rngs=rngs)

    def __call__(
        self,
        x_BxTxD: jax.Array,
        inputs: LayerInputs | None = None,
        *,
        mask_BxT: jax.Array | None = None,
        stats: StatsMode = "none",
        attention: bool = False,
        decode: bool = False,
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Apply the block.

        Args:
          x_BxTxD: the residual stream.
          inputs: this layer's `LayerInputs` (None: no dropout, W_V and W_O read from the parameters).
          mask_BxT: padding mask (nonzero = real token): padded keys are never attended to and the
            statistics leave padded tokens out.
          stats: per-layer statistics of the block's output ("none", "logged" or "full", see
            `StackOutput`).
          attention: also return the batch-averaged attention weights.
          decode: attend through the attention's KV cache (see `Transformer.decode`).

        Returns:
          (y_BxTxD, outputs): outputs is a dict (empty by default) with the `metrics.layer_stats` keys
          when stats != "none" and "attention" [N, T, S] when attention=True: the scan stacks it to [L].
        """
        inputs = LayerInputs() if inputs is None else inputs
        key = inputs.rngs
        keys = [None] * 3 if key is None else list(jax.random.split(key, 3))
        drop = self._dropper(key, inputs.drop_path)
        mask = None if mask_BxT is None else attn_fn.padding_mask(mask_BxT)

        def attend(x, v_in=None):
            return self.attn.attend(
                x, x, v_in, mask=mask, deterministic=keys[0] is None, rngs=keys[0], decode=decode,
                is_causal=self.causal, value_output=inputs.value_output,
            )  # fmt: skip

        if self.residual == "pre_ln":
            # value_norm="rms": V reads x / rms(x), so the branch applies H itself whatever LN1's gain is.
            ln_BxTxD = self.ln1(x_BxTxD)  # (LN1 before the rms: the traced op order sets XLA's rounding)
            v_in_BxTxD = _rms(x_BxTxD, eps=self.ln_eps) if self.value_norm == "rms" else None
            a, att_BxNxTxS = attend(ln_BxTxD, v_in_BxTxD)
            x = x_BxTxD + drop(a, keys[1]).astype(x_BxTxD.dtype)
            x = x + drop(self.mlp(self.ln2(x)), keys[2]).astype(x.dtype)
        else:
            skip = 1.0 if self.residual == "post_ln" else self.alpha
            a, att_BxNxTxS = attend(x_BxTxD)
            x = self.ln1(skip * x_BxTxD + drop(a, keys[1]).astype(x_BxTxD.dtype))
            x = self.ln2(skip * x + drop(self.mlp(x), keys[2]).astype(x.dtype))
        out: dict[str, Any] = {}
        if check_stats_mode(stats) != "none":
            out.update(metrics.layer_stats(x, mask_BxT, full=stats == "full"))
        if attention:
            out["attention"] = jnp.mean(att_BxNxTxS, axis=0)  # batch-averaged [N, T, S]
        return x, out

    def _dropper(self, key: jax.Array | None, drop_path: jax.Array | None):
        """drop(y, k): dropout of a branch output with key k, then stochastic depth (`drop_path`, with
        keys of its own, so the dropout masks do not change when it is turned on)."""
        if drop_path is None or key is None:
            return lambda y, k: _dropout(y, self.dropout, k)
        dp_keys = iter(jax.random.split(jax.random.fold_in(key, 0xD9), 2))  # attention's, then the MLP's
        return lambda y, k: _drop_path(_dropout(y, self.dropout, k), drop_path, next(dp_keys))


def _drop_path(y_BxTxD: jnp.ndarray, rate, key: jax.Array) -> jnp.ndarray:
    """Stochastic depth: the whole branch output of an example is dropped with probability `rate` (a
    traced scalar), kept ones are scaled by 1 / (1 - rate)."""
    keep = jax.random.bernoulli(key, 1.0 - rate, (y_BxTxD.shape[0],) + (1,) * (y_BxTxD.ndim - 1))
    return jnp.where(keep, y_BxTxD / (1.0 - rate), jnp.zeros_like(y_BxTxD))


class Transformer(nnx.Module):
    """x [B, T, D] -> [B, T, D] through `config.depth` blocks (no embedding).

    Dropout follows `nnx.Dropout`: `deterministic` (the call's, else the attribute that `.train()`,
    `.eval()` and `nnx.view` set, default None) and `rngs` (an `nnx.Rngs`, whose "dropout" stream gives
    one key per call, or a PRNG key). deterministic=None means "dropout exactly when rngs is given", so
    `stack(x)` is deterministic (evaluation) and `stack(x, rngs=key)` trains; the key is split into one
    key per layer, and each layer's into its attention, branch-dropout and stochastic-depth keys, so the
    same key gives the same masks.

    Args:
      config: the stack's shape and options.
      causal: causal self-attention (a decoder).
      rngs: parameter randomness.

    Example::

      >>> import jax, jax.numpy as jnp, jaxsmooth
      >>> from flax import nnx
      >>> sharpen = jaxsmooth.Spectrum("sharpen")
      >>> cfg = jaxsmooth.ModelConfig(depth=4, d_model=16, num_heads=2, spectrum=sharpen)
      >>> stack = jaxsmooth.nnx.Transformer(cfg, rngs=nnx.Rngs(0))
      >>> x = jnp.ones((2, 5, 16))
      >>> stack(x).shape
      (2, 5, 16)
      >>> out = stack.forward(x, stats="logged", attention=True)
      >>> out.stats["token_cosine"].shape, out.attention.shape
      ((4,), (4, 2, 5, 5))
    """

    def __init__(self, config: ModelConfig, *, causal: bool = False, rngs: nnx.Rngs):
        if not isinstance(config, ModelConfig):
            raise ValueError(f"config must be a jaxsmooth.ModelConfig, got {type(config).__name__}")
        self.config, self.causal = config, causal
        self.deterministic: bool | None = None  # as nnx.Dropout's; None: deterministic iff no rngs

        # transform_metadata adds the leading "layers" axis to every parameter's sharding names.
        @nnx.split_rngs(splits=config.depth)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_blocks(r: nnx.Rngs) -> Block:
            return Block(config, causal=causal, rngs=r)

        self.blocks = make_blocks(rngs)  # every block variable has a leading [L] axis
        self.final_ln = (
            LayerNorm(config.d_model, gain=config.ln_gain, eps=config.ln_eps)
            if config.residual == "pre_ln"
            else None
        )

    def set_view(self, deterministic: bool | None = None) -> None:
        """Used by `nnx.view` (as `nnx.Dropout.set_view`).

        Args:
          deterministic: the new default of the `deterministic` call argument (None: unchanged).
        """
        if deterministic is not None:
            self.deterministic = deterministic

    def __call__(
        self,
        x_BxTxD: jax.Array,
        *,
        mask_BxT: jax.Array | None = None,
        deterministic: bool | None = None,
        rngs: nnx.Rngs | nnx.RngStream | jax.Array | None = None,
    ) -> jax.Array:
        """The stack's output only (Flax's drop-in convention); see `forward`.

        Args:
          x_BxTxD: the embedded tokens.
          mask_BxT: padding mask (nonzero = real token), or None.
          deterministic: no dropout if True; None: the attribute, else "no dropout unless rngs is given".
          rngs: dropout randomness: an `nnx.Rngs` (its "dropout" stream), an `RngStream` or a PRNG key.

        Returns:
          y_BxTxD, in the config's compute dtype.
        """
        return self.forward(x_BxTxD, mask_BxT=mask_BxT, deterministic=deterministic, rngs=rngs).hidden

    def forward(
        self,
        x_BxTxD: jax.Array,
        *,
        mask_BxT: jax.Array | None = None,
        stats: StatsMode = "none",
        attention: bool = False,
        deterministic: bool | None = None,
        rngs: nnx.Rngs | nnx.RngStream | jax.Array | None = None,
    ) -> StackOutput:
        """Run the stack; the output, and the per-layer statistics and attention asked for.

        Args:
          x_BxTxD: the embedded tokens.
          mask_BxT: padding mask (nonzero = real token): padded keys are never attended to and the
            statistics leave padded tokens out.
          stats: "none", "logged" (`metrics.LAYER_STAT_KEYS`, computed inside the scan) or "full"
            (`metrics.FULL_LAYER_STAT_KEYS`: an SVD per example and layer).
          attention: also return the batch-averaged attention weights [L, N, T, T].
          deterministic: no dropout if True; None: the attribute, else "no dropout unless rngs is given"
            (see the class docstring).
          rngs: dropout randomness: an `nnx.Rngs` (its "dropout" stream), an `RngStream` or a PRNG key.

        Returns:
          A `StackOutput` (hidden [B, T, D]; stats and attention, None unless asked for). The output is
          the same whatever statistics are asked for (up to float rounding: the scan body compiles
          differently).
        """
        c = self.config
        if x_BxTxD.ndim != 3 or x_BxTxD.shape[-1] != c.d_model:
            raise ValueError(f"input has shape {x_BxTxD.shape}; expected [B, T, D={c.d_model}]")
        check_stats_mode(stats)
        graphdef, state = nnx.split(self.blocks)
        inputs_L = self._layer_inputs(self._dropout_key(deterministic, rngs))

        def body(x, xs):
            layer_state, layer_inputs = xs
            block = nnx.merge(graphdef, layer_state)
            return block(x, layer_inputs, mask_BxT=mask_BxT, stats=stats, attention=attention)

        x = x_BxTxD.astype(jnp.dtype(c.dtype))
        compose = None if c.spectrum is None else functools.partial(_compose, graphdef)
        x, per_layer = _run_stack(body, x, state, inputs_L, c, compose)
        if self.final_ln is not None:
            x = self.final_ln(x)
        att_LxNxTxT = per_layer.pop("attention", None)
        if stats == "none":
            return StackOutput(hidden=x, attention=att_LxNxTxT)
        per_layer["input"] = metrics.layer_stats(x_BxTxD, mask_BxT, full=stats == "full")
        return StackOutput(hidden=x, stats=per_layer, attention=att_LxNxTxT)

    def _dropout_key(self, deterministic: bool | None, rngs: Any) -> jax.Array | None:
        """The call's dropout key, or None (deterministic); see the class docstring."""
        det = deterministic if deterministic is not None else self.deterministic
        if det is None:
            det = rngs is None
        if det:
            return None
        if rngs is None:
            if self.config.dropout > 0 or self.config.drop_path > 0:
                raise ValueError(
                    "deterministic=False (or .train()) but no rngs: pass rngs= (an nnx.Rngs or a PRNG key) "
                    "to draw the dropout masks"
                )
            return None
        return as_key(rngs)

    def _layer_inputs(self, key: jax.Array | None) -> LayerInputs:
        """One dropout key per layer (split from `key`) and, with stochastic depth, the linear rate
        rule drop_path * l / (L - 1); both ride the scan."""
        c = self.config
        if key is None:
            return LayerInputs()
        rates_L = c.drop_path * jnp.arange(c.depth) / max(c.depth - 1, 1) if c.drop_path > 0 else None
        return LayerInputs(rngs=jax.random.split(key, c.depth), drop_path=rates_L)

    # ---- autoregressive decoding with a KV cache ---------------------------------------------------
    def init_cache(self, batch_size: int, max_length: int, dtype=jnp.float32) -> dict:
        """An empty KV cache for `decode`.

        Args:
          batch_size: B.
          max_length: the most tokens the cache holds (prompt and generated ones).
          dtype: the cached keys' and values' dtype.

        Returns:
          {"key", "value": zeros [L, B, max_length, N, K], "index": 0 (int32)}.
        """
        c = self.config
        if c.branch_scale == "featscale":
            raise NotImplementedError("decoding with branch_scale='featscale' is not supported (see layers)")
        shape = (c.depth, batch_size, max_length, c.num_heads, c.head_dim)
        return {"key": jnp.zeros(shape, dtype), "value": jnp.zeros(shape, dtype),
                "index": jnp.zeros((), jnp.int32)}  # fmt: skip

    def decode(self, x_BxTxD: jnp.ndarray, cache: dict) -> tuple[jnp.ndarray, dict]:
        """Run T new tokens (positions cache["index"] ...) through the stack, attending to the cached
        keys / values of the earlier ones. Causal stacks only; deterministic (no dropout). Pure: nothing
        in the module changes, so it jits and scans (`CausalLM.generate`).

        Args:
          x_BxTxD: the new tokens, embedded.
          cache: from `init_cache` or an earlier `decode`.

        Returns:
          (y_BxTxD, the updated cache).
        """
        c = self.config
        if not self.causal:
            raise ValueError("decode needs a causal Transformer (a bidirectional stack has no cache order)")
        graphdef, state = nnx.split(self.blocks)

        def body(x, xs):
            layer_state, vo, k_cache, v_cache = xs
            block = nnx.merge(graphdef, layer_state)
            block.attn.cached_key = nnx.Cache(k_cache)
            block.attn.cached_value = nnx.Cache(v_cache)
            block.attn.cache_index = nnx.Cache(cache["index"])
            y, _ = block(x, LayerInputs(value_output=vo), decode=True)
            return y, (block.attn.cached_key[...], block.attn.cached_value[...])

        vo = None if c.spectrum is None else _compose(graphdef, state)
        x = x_BxTxD.astype(jnp.dtype(c.dtype))
        x, (k_new, v_new) = jax.lax.scan(body, x, (state, vo, cache["key"], cache["value"]))
        if self.final_ln is not None:
            x = self.final_ln(x)
        index = cache["index"] + x_BxTxD.shape[1]
        return x, {"key": k_new, "value": v_new, "index": index}

    # ---- spectra, read straight from the stacked parameters (no forward pass) -------------------------
    def _per_layer(self, fn):
        graphdef, state = nnx.split(self.blocks)
        return jax.vmap(lambda s: fn(nnx.merge(graphdef, s)))(state)

    def effective_h(self) -> jnp.ndarray:
        """H = W_V W_O of every layer.

        Returns:
          h_LxDxD, float32.
        """
        return self._per_layer(lambda b: b.attn.effective_h())

    def eigenvalues(self):
        """The eigenvalues of H = W_V W_O per layer.

        Returns:
          [L, D]: exact real lambda (jnp, jit-able) for spectral attention; host-side complex eigenvalues
          sorted by modulus (numpy) for the unconstrained baseline.
        """
        if self.config.spectrum is not None:
            return self._per_layer(lambda b: b.attn.eigenvalues())
        return eigvals_by_modulus(np.asarray(self.effective_h(), np.float64))

    def ln_gains(self) -> jnp.ndarray:
        """The effective LayerNorm gains (softplus(g) for gain="positive") of every block.

        Returns:
          [L, 2, D] float32: (ln1, ln2) per layer.
        """
        return self._per_layer(lambda b: jnp.stack([b.ln1.effective_gain(), b.ln2.effective_gain()]))

    def effective_update(self) -> jnp.ndarray:
        """Per layer, the map M whose spectrum decides the one-step regime of the block's attention update
        (`jaxsmooth.theory.effective_update`, which this equals): H for pre-LN with value_norm="rms",
        C diag(ln1 gain) H for value_norm="ln", H / alpha for post-LN and DeepNorm. Jit-able.

        Returns:
          m_LxDxD, float32.
        """
        c = self.config
        h_LxDxD = self.effective_h()
        if c.residual != "pre_ln":
            return h_LxDxD / c.alpha_beta[0]
        if c.value_norm == "rms":
            return h_LxDxD
        gh_LxDxD = self.ln_gains()[:, 0, :, None] * h_LxDxD  # diag(g) H
        return gh_LxDxD - jnp.mean(gh_LxDxD, axis=1, keepdims=True)  # C diag(g) H

    def exact_effective_eigenvalues(self) -> jnp.ndarray | None:
        """The eigenvalues of `effective_update()`, when they are known exactly without an eigensolver
        (spectral attention whose effective map is H / alpha: pre-LN with value_norm="rms", post-LN,
        DeepNorm).

        Returns:
          [L, D] real eigenvalues, or None (compute them on the host: `theory.effective_eigenvalues`).
        """
        c = self.config
        if c.spectrum is None or (c.residual == "pre_ln" and c.value_norm == "ln"):
            return None
        return self.eigenvalues() / (c.alpha_beta[0] if c.residual != "pre_ln" else 1.0)


def _compose(graphdef, state_G):
    """Spectral (w_v, w_o, b_v, b_o) of a stack of G layers, one layer at a time.

    lax.map, not vmap: on CPU a batched QR / triangular solve is one LAPACK custom call that farms the
    batch out to XLA's own thread pool and blocks until it is done; inside the train step those tasks
    waited behind the other thread's work (QR 5-10 ms alone, 150-220 ms in the ViT-Tiny step). One matrix
    per call runs inline on the calling thread.
    """
    return jax.lax.map(lambda s: nnx.merge(graphdef, s).attn.value_output(), state_G)


def nested_group(depth: int) -> int:
    """Default layers per group of remat="nested": the divisor of depth nearest sqrt(depth), if one lies
    within a factor 1.5 of it; else round(sqrt(depth)) (the last, shorter group is then a remainder).

    Groups that divide the depth keep the [L] parameter stack a free reshape into [L / G, G]. A remainder
    needs slices of the stack, and XLA materialises them: a whole extra copy of every layer's parameters
    in temp memory (depth 1000, width 64: 185 MB, against 10 MB of activations with G = 25).

    Args:
      depth: L.

    Returns:
      G, the layers per group.
    """
    root = math.sqrt(depth)
    divisors = [g for g in range(1, depth + 1) if depth % g == 0 and root / 1.5 <= g <= 1.5 * root]
    if divisors:
        return min(divisors, key=lambda g: (abs(g - root), g))
    return max(1, int(round(root)))


def _run_stack(body, x, state, inputs_L: LayerInputs, c: ModelConfig, compose=None):
    """Apply `body` over the leading [L] axis of (state, inputs_L), scanned (or unrolled) with the
    configured remat. body(x, (layer_state, layer_inputs)) -> (x, per-layer outputs); `compose` maps a
    [G]-stack of layer states to their value / output weights ([G] stacks, `LayerInputs.value_output`),
    or is None (the baseline: the body reads W_V, W_O itself).

    Where the spectral weights are composed follows the remat mode (see the module docstring): "none"
    composes all L layers before the scan (kept for the backward pass: O(L D^2), next to O(L B T D) of
    activations); "full" and "nested" compose each layer inside its own checkpointed body (O(D^2), redone
    when the layer is recomputed). Composing a nested group's G layers as one batched call inside the
    group checkpoint deadlocked XLA:CPU's runtime at depth 1000 (G = 32, jaxlib 0.10.2), so we do not:
    we suspect (not verified) the same cause as the stall `compose` avoids: jaxlib's batched LAPACK kernels
    block a pool thread while waiting for tasks queued on the same pool.
    """
    if c.remat == "none":  # keep the matmul outputs, recompute elementwise work (see the docstring)
        policy = jax.checkpoint_policies.dots_saveable
        layer = jax.checkpoint(body, prevent_cse=not c.scan, policy=policy)
        if compose is not None:
            inputs_L = inputs_L.replace(value_output=compose(state))
    else:
        layer = jax.checkpoint(body, prevent_cse=not c.scan)
    xs = (state, inputs_L)
    if not c.scan:  # Python loop: a test oracle; trace and compile time grow with depth.
        outs = []
        for i in range(c.depth):
            x, aux = layer(x, jax.tree.map(lambda a, i=i: a[i], xs))
            outs.append(aux)
        return x, jax.tree.map(lambda *a: jnp.stack(a), *outs)
    if c.remat != "nested":
        return jax.lax.scan(layer, x, xs)
    g = c.remat_group or nested_group(c.depth)
    n_groups, rest = divmod(c.depth, g)

    def group(x, xs_g):
        return jax.lax.scan(layer, x, xs_g)

    head = jax.tree.map(lambda a: a[: n_groups * g].reshape(n_groups, g, *a.shape[1:]), xs)
    x, aux = jax.lax.scan(jax.checkpoint(group, prevent_cse=False), x, head)
    aux = jax.tree.map(lambda a: a.reshape(n_groups * g, *a.shape[2:]), aux)
    if rest:  # the remainder that does not fill a group runs layer-checkpointed
        x, aux_r = jax.lax.scan(layer, x, jax.tree.map(lambda a: a[n_groups * g :], xs))
        aux = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), aux, aux_r)
    return x, aux
