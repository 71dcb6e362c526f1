"""The block stack: `depth` blocks built by nnx.vmap and run by a scan, so init and compile time do not
grow with depth (docs/theory.md section 5 for DeepNorm).

    pre_ln:   x = x + Attn(LN1(x));            x = x + MLP(LN2(x));            final LN after the stack
    post_ln:  x = LN1(x + Attn(x));            x = LN2(x + MLP(x))
    deepnorm: x = LN1(alpha x + Attn(x));      x = LN2(alpha x + MLP(x))        (DeepNet)

Running the stack: the stacked block state is split off once (nnx.split), a pure body merges one layer's
slice and applies it, and jax.lax.scan runs the body over the leading [L] axis. The body returns only
the new activations (and per-layer statistics), never parameters, so XLA does not copy the stack.
Per-layer inputs (dropout keys) ride the scan as xs; depth constants (alpha) are closed over.

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
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxsmooth import attention as attn_fn
from jaxsmooth import metrics
from jaxsmooth.attention import dropout as _dropout
from jaxsmooth.attention import rms_normalize as _rms
from jaxsmooth.config import ModelConfig
from jaxsmooth.nnx.layers import MLP, Attention, LayerNorm, SpectralAttention, eigvals_by_modulus


class Block(nnx.Module):
    """One attention + MLP block; __call__ returns (x, per-layer aux dict)."""

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
        self, x_BxTxD, *, mask=None, mask_BxT=None, dropout_key=None, stats=False, attention=False,
        value_output=None, decode=False, full_stats=False, drop_path=None,
    ):  # fmt: skip
        """mask: Flax-style boolean attention mask [B, 1, T, S] (or None); mask_BxT: the [B, T] padding
        mask the statistics exclude. value_output: this layer's precomputed (w_v, w_o, b_v, b_o), see
        `AttentionBase.attend`. decode: attend through the attention's KV cache. drop_path: this layer's
        stochastic-depth rate (applied with dropout_key only)."""
        keys = [None] * 3 if dropout_key is None else list(jax.random.split(dropout_key, 3))
        if drop_path is None or dropout_key is None:
            drop = lambda y, k: _dropout(y, self.dropout, k)
        else:  # stochastic depth after dropout, with keys of its own (the dropout masks are unchanged)
            dp_keys = iter(jax.random.split(jax.random.fold_in(dropout_key, 0xD9), 2))
            drop = lambda y, k: _drop_path(_dropout(y, self.dropout, k), drop_path, next(dp_keys))

        def attend(x, v_in=None):
            return self.attn.attend(
                x, x, v_in, mask=mask, deterministic=keys[0] is None, rngs=keys[0], decode=decode,
                is_causal=self.causal, value_output=value_output,
            )  # fmt: skip

        if self.residual == "pre_ln":
            # value_norm="rms": V reads x / rms(x), so the branch applies H itself whatever LN1's gain is.
            h = self.ln1(x_BxTxD)
            a, att = attend(h, _rms(x_BxTxD, eps=self.ln_eps) if self.value_norm == "rms" else None)
            x = x_BxTxD + drop(a, keys[1]).astype(x_BxTxD.dtype)
            x = x + drop(self.mlp(self.ln2(x)), keys[2]).astype(x.dtype)
        else:
            skip = 1.0 if self.residual == "post_ln" else self.alpha
            a, att = attend(x_BxTxD)
            x = self.ln1(skip * x_BxTxD + drop(a, keys[1]).astype(x_BxTxD.dtype))
            x = self.ln2(skip * x + drop(self.mlp(x), keys[2]).astype(x.dtype))
        aux: dict[str, Any] = {}
        if stats:
            aux.update(metrics.layer_stats(x, mask_BxT, full=full_stats))
        if attention:
            aux["attention"] = jnp.mean(att, axis=0)  # batch-averaged [H, T, S]
        return x, aux


def _drop_path(y_BxTxD: jnp.ndarray, rate, key: jax.Array) -> jnp.ndarray:
    """Stochastic depth: the whole branch output of an example is dropped with probability `rate` (a
    traced scalar), kept ones are scaled by 1 / (1 - rate)."""
    keep = jax.random.bernoulli(key, 1.0 - rate, (y_BxTxD.shape[0],) + (1,) * (y_BxTxD.ndim - 1))
    return jnp.where(keep, y_BxTxD / (1.0 - rate), jnp.zeros_like(y_BxTxD))


class Transformer(nnx.Module):
    """x [B, T, D] -> [B, T, D] through `config.depth` blocks (no embedding).

    Args:
      config: the stack's shape and options.
      causal: causal self-attention (a decoder).
      rngs: parameter randomness.
    """

    def __init__(self, config: ModelConfig, *, causal: bool = False, rngs: nnx.Rngs):
        if not isinstance(config, ModelConfig):
            raise ValueError(f"config must be a jaxsmooth.ModelConfig, got {type(config).__name__}")
        self.config, self.causal = config, causal

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

    def __call__(
        self,
        x_BxTxD: jnp.ndarray,
        *,
        mask_BxT: jnp.ndarray | None = None,
        dropout_key: jax.Array | None = None,
        return_stats: bool = False,
        return_attention: bool = False,
        full_stats: bool = False,
    ):
        """Returns y_BxTxD, or (y_BxTxD, aux) if return_stats/return_attention.

        Args:
          x_BxTxD: the embedded tokens.
          mask_BxT: padding mask (nonzero = real token): padded keys are never attended to and the
            statistics leave padded tokens out.
          dropout_key: PRNG key for dropout; None means deterministic (no dropout).
          return_stats: also return aux["<stat>"]: [L] per-layer smoothing metrics of the residual stream
            after each block (keys: `metrics.LAYER_STAT_KEYS`), and aux["input"]["<stat>"]: the same for
            the stack's input, so concatenating gives L + 1 points.
          return_attention: also return aux["attention"]: [L, H, T, T] batch-averaged attention.
          full_stats: the statistics include `metrics.FULL_LAYER_STAT_KEYS` (an SVD per example and layer).
        """
        c = self.config
        if x_BxTxD.ndim != 3 or x_BxTxD.shape[-1] != c.d_model:
            raise ValueError(f"input has shape {x_BxTxD.shape}; expected [B, T, D={c.d_model}]")
        graphdef, state = nnx.split(self.blocks)
        keys_L = None if dropout_key is None else jax.random.split(dropout_key, c.depth)
        if keys_L is not None and c.drop_path > 0:  # per-layer rates ride the scan with the keys
            keys_L = (keys_L, c.drop_path * jnp.arange(c.depth) / max(c.depth - 1, 1))
        want = dict(stats=return_stats, attention=return_attention, full_stats=full_stats)
        mask = None if mask_BxT is None else attn_fn.padding_mask(mask_BxT)

        def body(x, xs):
            layer_state, vo, key = xs  # vo: precomputed (w_v, w_o, b_v, b_o), or None: compose here
            key, rate = key if isinstance(key, tuple) else (key, None)
            block = nnx.merge(graphdef, layer_state)
            y, aux = block(x, mask=mask, mask_BxT=mask_BxT, dropout_key=key, value_output=vo,
                           drop_path=rate, **want)  # fmt: skip
            return y, aux

        x = x_BxTxD.astype(jnp.dtype(c.dtype))
        compose = None if c.spectrum is None else functools.partial(_compose, graphdef)
        x, aux = _run_stack(body, x, state, keys_L, c, compose)
        if self.final_ln is not None:
            x = self.final_ln(x)
        if not (return_stats or return_attention):
            return x
        if return_stats:
            aux["input"] = metrics.layer_stats(x_BxTxD, mask_BxT, full=full_stats)
        return x, aux

    # ---- autoregressive decoding with a KV cache ---------------------------------------------------
    def init_cache(self, batch_size: int, max_length: int, dtype=jnp.float32) -> dict:
        """An empty KV cache for `decode`: {"key", "value": [L, B, max_length, H, K], "index": 0}."""
        c = self.config
        if c.branch_scale == "featscale":
            raise NotImplementedError("decoding with branch_scale='featscale' is not supported (see layers)")
        shape = (c.depth, batch_size, max_length, c.num_heads, c.head_dim)
        return {"key": jnp.zeros(shape, dtype), "value": jnp.zeros(shape, dtype),
                "index": jnp.zeros((), jnp.int32)}  # fmt: skip

    def decode(self, x_BxTxD: jnp.ndarray, cache: dict) -> tuple[jnp.ndarray, dict]:
        """Run T new tokens (positions cache["index"] ...) through the stack, attending to the cached
        keys / values of the earlier ones; returns (y_BxTxD, the updated cache). Causal stacks only.
        Pure: nothing in the module changes, so it jits and scans (`CausalLM.generate`)."""
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
            y, _ = block(x, value_output=vo, decode=True)
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
        """[L, D, D]: H = W_V W_O of every layer."""
        return self._per_layer(lambda b: b.attn.effective_h())

    def eigenvalues(self):
        """[L, D] eigenvalues of H per layer: exact real lambda (jnp) for spectral attention; host-side
        complex eigenvalues sorted by modulus (numpy) for the unconstrained baseline."""
        if self.config.spectrum is not None:
            return self._per_layer(lambda b: b.attn.eigenvalues())
        return eigvals_by_modulus(np.asarray(self.effective_h(), np.float64))

    def ln_gains(self) -> jnp.ndarray:
        """[L, 2, D] effective LayerNorm gains (ln1, ln2) of every block."""
        return self._per_layer(lambda b: jnp.stack([b.ln1.effective_gain(), b.ln2.effective_gain()]))

    def effective_update(self) -> jnp.ndarray:
        """[L, D, D] float32: per layer, the map M whose spectrum decides the one-step regime of the block's
        attention update (`jaxsmooth.theory.effective_update`, which this equals): H for pre-LN with
        value_norm="rms", C diag(ln1 gain) H for value_norm="ln", H / alpha for post-LN and DeepNorm.
        Jit-able."""
        c = self.config
        h_LxDxD = self.effective_h()
        if c.residual != "pre_ln":
            return h_LxDxD / c.alpha_beta[0]
        if c.value_norm == "rms":
            return h_LxDxD
        gh_LxDxD = self.ln_gains()[:, 0, :, None] * h_LxDxD  # diag(g) H
        return gh_LxDxD - jnp.mean(gh_LxDxD, axis=1, keepdims=True)  # C diag(g) H

    def exact_effective_eigenvalues(self) -> jnp.ndarray | None:
        """[L, D] real eigenvalues of `effective_update()` when they are known exactly without an
        eigensolver (spectral attention whose effective map is H / alpha: pre-LN with value_norm="rms",
        post-LN, DeepNorm), else None (compute them on the host: `theory.effective_eigenvalues`)."""
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
    """
    root = math.sqrt(depth)
    divisors = [g for g in range(1, depth + 1) if depth % g == 0 and root / 1.5 <= g <= 1.5 * root]
    if divisors:
        return min(divisors, key=lambda g: (abs(g - root), g))
    return max(1, int(round(root)))


def _run_stack(body, x, state, keys_L, c: ModelConfig, compose=None):
    """Apply `body` over the leading [L] axis of (state, keys), scanned (or unrolled) with the configured
    remat. body(x, (layer_state, vo, key)); `compose` maps a [G]-stack of layer states to their value /
    output weights `vo` ([G] stacks), or is None (the baseline: the body reads W_V, W_O itself).

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
        xs = (state, None if compose is None else compose(state), keys_L)
    else:
        layer = jax.checkpoint(body, prevent_cse=not c.scan)
        xs = (state, None, keys_L)
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
