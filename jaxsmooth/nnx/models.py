"""Task models on top of `Transformer`: a ViT classifier and a causal character/token LM."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from jaxsmooth.config import ModelConfig
from jaxsmooth.nnx.layers import param
from jaxsmooth.nnx.transformer import Transformer

_embed_init = jax.nn.initializers.normal(0.02)


def _with_aux(out, fn):
    """Apply fn to the main output of a Transformer call that may be (y, aux)."""
    return (fn(out[0]), out[1]) if isinstance(out, tuple) else fn(out)


class ViT(nnx.Module):
    """Vision transformer: non-overlapping patches -> linear embedding, a [CLS] token, learned positions,
    `Transformer`, and a linear head on the [CLS] output (zero-initialised, as in big_vision)."""

    def __init__(
        self,
        config: ModelConfig,
        num_classes: int,
        image_shape: tuple[int, int, int],
        patch_size: int,
        *,
        rngs: nnx.Rngs,
    ):
        if len(image_shape) != 3:
            raise ValueError(f"image_shape={image_shape} must be (height, width, channels)")
        h, w, ch = image_shape
        if patch_size < 1 or h % patch_size or w % patch_size:
            raise ValueError(f"patch_size={patch_size} must divide the image height {h} and width {w}")
        if num_classes < 2:
            raise ValueError(f"num_classes={num_classes} must be >= 2")
        d = config.d_model
        self.image_shape, self.patch_size = tuple(image_shape), patch_size
        self.num_patches = (h // patch_size) * (w // patch_size)
        patch_init = jax.nn.initializers.lecun_normal()(rngs.params(), (patch_size**2 * ch, d))
        self.patch_w = param(nnx.Param, patch_init, ("patch", "embed"))
        self.patch_b = param(nnx.Param, jnp.zeros((d,)), ("embed",))
        self.cls = param(nnx.Param, jnp.zeros((1, 1, d)), (None, None, "embed"))
        self.pos = param(
            nnx.Param, _embed_init(rngs.params(), (1, self.num_patches + 1, d)), (None, None, "embed")
        )
        self.transformer = Transformer(config, rngs=rngs)
        self.head_w = param(nnx.Param, jnp.zeros((d, num_classes)), ("embed", "classes"))
        self.head_b = param(nnx.Param, jnp.zeros((num_classes,)), ("classes",))

    def embed(self, images_BxHxWxC: jnp.ndarray) -> jnp.ndarray:
        """[B, H, W, C] -> tokens [B, 1 + N, D] ([CLS] first)."""
        if images_BxHxWxC.shape[1:] != self.image_shape:
            raise ValueError(f"images have shape {images_BxHxWxC.shape[1:]}; expected {self.image_shape}")
        b, (h, w, ch), p = images_BxHxWxC.shape[0], self.image_shape, self.patch_size
        x = images_BxHxWxC.reshape(b, h // p, p, w // p, p, ch).transpose(0, 1, 3, 2, 4, 5)
        x_BxNxP = x.reshape(b, self.num_patches, p * p * ch)
        tok_BxNxD = x_BxNxP @ self.patch_w[...] + self.patch_b[...][None, None, :]
        cls_Bx1xD = jnp.broadcast_to(self.cls[...], (b, 1, tok_BxNxD.shape[-1]))
        return jnp.concatenate([cls_Bx1xD, tok_BxNxD], axis=1) + self.pos[...]

    def __call__(
        self,
        images_BxHxWxC,
        *,
        dropout_key=None,
        return_stats=False,
        return_attention=False,
        full_stats=False,
    ):
        """Logits [B, classes], or (logits, aux) with per-layer stats/attention (see Transformer)."""
        out = self.transformer(
            self.embed(images_BxHxWxC),
            dropout_key=dropout_key,
            return_stats=return_stats,
            return_attention=return_attention,
            full_stats=full_stats,
        )
        head = lambda y: y[:, 0, :].astype(jnp.float32) @ self.head_w[...] + self.head_b[...][None, :]
        return _with_aux(out, head)


class CausalLM(nnx.Module):
    """Decoder-only language model: token + learned position embeddings, causal `Transformer`, untied
    linear output head. DeepNorm uses the decoder-only formulas when config.deepnorm_arch="decoder"."""

    def __init__(self, config: ModelConfig, vocab_size: int, max_len: int, *, rngs: nnx.Rngs):
        if vocab_size < 2 or max_len < 1:
            raise ValueError(f"vocab_size={vocab_size} must be >= 2 and max_len={max_len} >= 1")
        d = config.d_model
        self.vocab_size, self.max_len = vocab_size, max_len
        self.tok = param(nnx.Param, _embed_init(rngs.params(), (vocab_size, d)), ("vocab", "embed"))
        self.pos = param(nnx.Param, _embed_init(rngs.params(), (1, max_len, d)), (None, None, "embed"))
        self.transformer = Transformer(config, causal=True, rngs=rngs)
        head_init = jax.nn.initializers.xavier_uniform()(rngs.params(), (d, vocab_size))
        self.head_w = param(nnx.Param, head_init, ("embed", "vocab"))
        self.head_b = param(nnx.Param, jnp.zeros((vocab_size,)), ("vocab",))

    def _head(self, y_BxTxD):
        return y_BxTxD.astype(jnp.float32) @ self.head_w[...] + self.head_b[...][None, None, :]

    def __call__(
        self, ids_BxT, *, dropout_key=None, return_stats=False, return_attention=False, full_stats=False
    ):
        """Next-token logits [B, T, V] (float32), or (logits, aux)."""
        t = ids_BxT.shape[1]
        if t > self.max_len:
            raise ValueError(f"sequence length {t} exceeds max_len={self.max_len}")
        x_BxTxD = jnp.take(self.tok[...], ids_BxT, axis=0) + self.pos[...][:, :t, :]
        out = self.transformer(
            x_BxTxD, dropout_key=dropout_key, return_stats=return_stats, return_attention=return_attention,
            full_stats=full_stats,
        )  # fmt: skip
        return _with_aux(out, self._head)

    def decode(self, ids_BxT: jnp.ndarray, cache: dict) -> tuple[jnp.ndarray, dict]:
        """Logits [B, T, V] of T new tokens at positions cache["index"] ..., using and extending the KV
        cache (`Transformer.init_cache(batch, max_len)`); pure, so it jits."""
        t = ids_BxT.shape[1]
        pos_1xTxD = jax.lax.dynamic_slice_in_dim(self.pos[...], cache["index"], t, axis=1)
        x_BxTxD = jnp.take(self.tok[...], ids_BxT, axis=0) + pos_1xTxD
        y, cache = self.transformer.decode(x_BxTxD, cache)
        return self._head(y), cache

    def generate(
        self,
        prompt_BxP,
        max_new_tokens: int,
        *,
        temperature: float = 1.0,
        top_k: int | None = None,
        rng: jax.Array | None = None,
    ) -> jnp.ndarray:
        """Sample `max_new_tokens` tokens after `prompt_BxP` with a KV cache; returns [B, P + N] ids.

        One compiled program per (batch, prompt length, max_new_tokens, top_k): the prompt fills the cache
        in one pass, then a lax.scan decodes one token per step, each attending to the cache.

        Args:
          prompt_BxP: int ids [B, P] (P >= 1).
          max_new_tokens: N >= 1; P + N must not exceed max_len (learned positions).
          temperature: softmax temperature; 0 means greedy (argmax).
          top_k: sample among the k most likely tokens only (None: all).
          rng: PRNG key for sampling (required unless temperature == 0).
        """
        prompt = jnp.asarray(prompt_BxP)
        if prompt.ndim != 2 or prompt.shape[1] < 1 or not jnp.issubdtype(prompt.dtype, jnp.integer):
            raise ValueError(f"prompt must be int ids [B, P >= 1], got {prompt.dtype} {prompt.shape}")
        b, p = prompt.shape
        n = int(max_new_tokens)
        if n < 1 or p + n > self.max_len:
            raise ValueError(
                f"prompt length {p} + max_new_tokens {n} must be within max_len={self.max_len} (and n >= 1)"
            )
        if top_k is not None and not 1 <= top_k <= self.vocab_size:
            raise ValueError(f"top_k={top_k} must be in [1, vocab_size={self.vocab_size}]")
        if not (temperature >= 0 and jnp.isfinite(temperature)):
            raise ValueError(f"temperature={temperature} must be a finite number >= 0")
        if rng is None:
            if temperature > 0:
                raise ValueError("sampling with temperature > 0 needs rng= (a PRNG key); use temperature=0 "
                                 "for greedy decoding")  # fmt: skip
            rng = jax.random.key(0)
        graphdef, state = nnx.split(self)
        return _generate(graphdef, state, prompt, jnp.float32(temperature), rng, n=n, top_k=top_k)


@functools.partial(jax.jit, static_argnames=("graphdef", "n", "top_k"))
def _generate(graphdef, state, prompt_BxP, temperature, rng, *, n: int, top_k: int | None):
    model = nnx.merge(graphdef, state)
    b, p = prompt_BxP.shape
    dtype = jnp.dtype(model.transformer.config.dtype)
    cache = model.transformer.init_cache(b, p + n, dtype)
    logits, cache = model.decode(prompt_BxP, cache)

    def pick(logits_BxV, key):
        if top_k is not None:
            kth = jax.lax.top_k(logits_BxV, top_k)[0][:, -1:]
            logits_BxV = jnp.where(logits_BxV < kth, -jnp.inf, logits_BxV)
        greedy = jnp.argmax(logits_BxV, axis=-1)
        sampled = jax.random.categorical(key, logits_BxV / jnp.maximum(temperature, 1e-6), axis=-1)
        return jnp.where(temperature > 0, sampled, greedy).astype(prompt_BxP.dtype)

    def step(carry, key):
        logits_BxV, cache = carry
        tok_B = pick(logits_BxV, key)
        new_logits, cache = model.decode(tok_B[:, None], cache)
        return (new_logits[:, -1], cache), tok_B

    keys = jax.random.split(rng, n)
    _, toks_NxB = jax.lax.scan(step, (logits[:, -1], cache), keys)
    return jnp.concatenate([prompt_BxP, toks_NxB.T], axis=1)
