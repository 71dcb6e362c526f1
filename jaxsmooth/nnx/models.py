"""Task models on top of `Transformer`: a ViT classifier and a causal character/token LM (shape letters:
`jaxsmooth.nnx`).

Every model is called the same way:

    model(x)                                     -> logits (an array, always: Flax's drop-in convention)
    model(x, rngs=key)                           -> logits with dropout (the train step passes its key)
    model.forward(x, stats="logged", attention=True, deterministic=None, rngs=None)
                                                 -> ModelOutput(logits, stats, attention)

Dropout follows `nnx.Dropout` (see `Transformer`): `deterministic` (call, else the attribute that
`.train()` / `.eval()` / `nnx.view` set on the stack, default None) and `rngs` (an `nnx.Rngs`, an
`RngStream` or a PRNG key). With deterministic=None the model drops out exactly when `rngs` is given, so
`model(x)` is deterministic (evaluation relies on it). A key passed as `rngs` reaches the stack unchanged:
it is split into one key per layer, so the same key gives the same dropout masks.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from jaxsmooth.config import ModelConfig
from jaxsmooth.nnx.layers import param
from jaxsmooth.nnx.transformer import StatsMode, Transformer

_embed_init = jax.nn.initializers.normal(0.02)
Rngs = nnx.Rngs | nnx.RngStream | jax.Array | None


@flax.struct.dataclass
class ModelOutput:
    """What a model's `forward` returns (a pytree: it passes through jit, grad's has_aux and scans).

    Args:
      logits: float32 [B, C] (ViT) or [B, T, V] (CausalLM).
      stats: None unless asked for; else the per-layer statistics (`StackOutput.stats`): {"<stat>": [L],
        ..., "input": {"<stat>": scalar}}, of the stack's input and of each block's output.
      attention: None unless asked for; else the batch-averaged attention weights [L, N, T, T].
    """

    logits: jax.Array
    stats: dict[str, Any] | None = None
    attention: jax.Array | None = None


class ViT(nnx.Module):
    """Vision transformer: non-overlapping patches -> linear embedding, a [CLS] token, learned positions,
    `Transformer`, and a linear head on the [CLS] output (zero-initialised, as in big_vision).

    Args:
      config: the stack's shape and options.
      num_classes: C >= 2.
      image_shape: (height, width, channels).
      patch_size: side of the square patches; divides the height and the width.
      rngs: parameter randomness.

    Example::

      >>> import jax, jax.numpy as jnp, jaxsmooth
      >>> from flax import nnx
      >>> cfg = jaxsmooth.ModelConfig(depth=2, d_model=16, num_heads=2, dropout=0.1)
      >>> vit = jaxsmooth.nnx.ViT(cfg, 10, (8, 8, 1), 4, rngs=nnx.Rngs(0))
      >>> images = jnp.ones((3, 8, 8, 1))
      >>> vit(images).shape  # no rngs: deterministic
      (3, 10)
      >>> vit(images, rngs=jax.random.key(1)).shape  # dropout
      (3, 10)
      >>> out = vit.forward(images, stats="logged", attention=True)
      >>> out.logits.shape, out.stats["token_cosine"].shape, out.attention.shape
      ((3, 10), (2,), (2, 2, 5, 5))
    """

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
        height, width, channels = image_shape
        if patch_size < 1 or height % patch_size or width % patch_size:
            raise ValueError(
                f"patch_size={patch_size} must divide the image height {height} and width {width}"
            )
        if num_classes < 2:
            raise ValueError(f"num_classes={num_classes} must be >= 2")
        d = config.d_model
        self.image_shape, self.patch_size = tuple(image_shape), patch_size
        self.num_patches = (height // patch_size) * (width // patch_size)
        patch_init = jax.nn.initializers.lecun_normal()(rngs.params(), (patch_size**2 * channels, d))
        self.patch_w = param(nnx.Param, patch_init, ("patch", "embed"))
        self.patch_b = param(nnx.Param, jnp.zeros((d,)), ("embed",))
        self.cls = param(nnx.Param, jnp.zeros((1, 1, d)), (None, None, "embed"))
        self.pos = param(
            nnx.Param, _embed_init(rngs.params(), (1, self.num_patches + 1, d)), (None, None, "embed")
        )
        self.transformer = Transformer(config, rngs=rngs)
        self.head_w = param(nnx.Param, jnp.zeros((d, num_classes)), ("embed", "classes"))
        self.head_b = param(nnx.Param, jnp.zeros((num_classes,)), ("classes",))

    def embed(self, images: jax.Array) -> jax.Array:
        """Patches -> tokens: the [CLS] token first, then one token per patch (row-major), plus positions.

        Args:
          images: [B, height, width, channels], as `image_shape`.

        Returns:
          x_BxTxD with T = 1 + num_patches.
        """
        if images.shape[1:] != self.image_shape:
            raise ValueError(f"images have shape {images.shape[1:]}; expected {self.image_shape}")
        b, (height, width, channels), p = images.shape[0], self.image_shape, self.patch_size
        x = images.reshape(b, height // p, p, width // p, p, channels).transpose(0, 1, 3, 2, 4, 5)
        x_BxTxF = x.reshape(b, self.num_patches, p * p * channels)  # T = patches here
        tok_BxTxD = x_BxTxF @ self.patch_w[...] + self.patch_b[...][None, None, :]
        cls_Bx1xD = jnp.broadcast_to(self.cls[...], (b, 1, tok_BxTxD.shape[-1]))
        return jnp.concatenate([cls_Bx1xD, tok_BxTxD], axis=1) + self.pos[...]

    def __call__(
        self, images: jax.Array, *, deterministic: bool | None = None, rngs: Rngs = None
    ) -> jax.Array:
        """Class logits only (Flax's drop-in convention); see `forward`.

        Args:
          images: [B, height, width, channels].
          deterministic: no dropout if True; None: "no dropout unless rngs is given" (module docstring).
          rngs: dropout randomness: an `nnx.Rngs` (its "dropout" stream), an `RngStream` or a PRNG key.

        Returns:
          logits_BxC, float32.
        """
        return self.forward(images, deterministic=deterministic, rngs=rngs).logits

    def forward(
        self,
        images: jax.Array,
        *,
        stats: StatsMode = "none",
        attention: bool = False,
        deterministic: bool | None = None,
        rngs: Rngs = None,
    ) -> ModelOutput:
        """Logits, and the per-layer statistics and attention asked for.

        Args:
          images: [B, height, width, channels].
          stats: "none", "logged" or "full" (see `Transformer.forward`).
          attention: also return the batch-averaged attention weights [L, N, T, T].
          deterministic: no dropout if True; None: "no dropout unless rngs is given" (module docstring).
          rngs: dropout randomness: an `nnx.Rngs` (its "dropout" stream), an `RngStream` or a PRNG key.

        Returns:
          A `ModelOutput` with logits [B, C] (float32); the logits do not depend on stats / attention
          (up to float rounding).
        """
        out = self.transformer.forward(
            self.embed(images), stats=stats, attention=attention, deterministic=deterministic, rngs=rngs
        )
        cls_BxD = out.hidden[:, 0, :].astype(jnp.float32)
        logits_BxC = cls_BxD @ self.head_w[...] + self.head_b[...][None, :]
        return ModelOutput(logits=logits_BxC, stats=out.stats, attention=out.attention)


class CausalLM(nnx.Module):
    """Decoder-only language model: token + learned position embeddings, causal `Transformer`, untied
    linear output head. DeepNorm uses the decoder-only formulas when config.deepnorm_arch="decoder".

    Args:
      config: the stack's shape and options.
      vocab_size: V >= 2.
      max_len: the longest sequence (learned positions).
      rngs: parameter randomness.

    Example::

      >>> import jax, jax.numpy as jnp, jaxsmooth
      >>> from flax import nnx
      >>> cfg = jaxsmooth.ModelConfig(depth=2, d_model=16, num_heads=2)
      >>> lm = jaxsmooth.nnx.CausalLM(cfg, vocab_size=11, max_len=9, rngs=nnx.Rngs(0))
      >>> ids = jnp.zeros((1, 4), jnp.int32)
      >>> lm(ids).shape
      (1, 4, 11)
      >>> lm.forward(ids, stats="logged").stats["input"]["token_cosine"].shape
      ()
      >>> lm.generate(ids, max_new_tokens=3, temperature=0.0).shape
      (1, 7)
    """

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
        self, ids_BxT: jax.Array, *, deterministic: bool | None = None, rngs: Rngs = None
    ) -> jax.Array:
        """Next-token logits only (Flax's drop-in convention); see `forward`.

        Args:
          ids_BxT: int token ids, T <= max_len.
          deterministic: no dropout if True; None: "no dropout unless rngs is given" (module docstring).
          rngs: dropout randomness: an `nnx.Rngs` (its "dropout" stream), an `RngStream` or a PRNG key.

        Returns:
          logits_BxTxV, float32.
        """
        return self.forward(ids_BxT, deterministic=deterministic, rngs=rngs).logits

    def forward(
        self,
        ids_BxT: jax.Array,
        *,
        stats: StatsMode = "none",
        attention: bool = False,
        deterministic: bool | None = None,
        rngs: Rngs = None,
    ) -> ModelOutput:
        """Next-token logits, and the per-layer statistics and attention asked for.

        Args:
          ids_BxT: int token ids, T <= max_len.
          stats: "none", "logged" or "full" (see `Transformer.forward`).
          attention: also return the batch-averaged attention weights [L, N, T, T].
          deterministic: no dropout if True; None: "no dropout unless rngs is given" (module docstring).
          rngs: dropout randomness: an `nnx.Rngs` (its "dropout" stream), an `RngStream` or a PRNG key.

        Returns:
          A `ModelOutput` with logits [B, T, V] (float32); the logits do not depend on stats / attention
          (up to float rounding).
        """
        t = ids_BxT.shape[1]
        if t > self.max_len:
            raise ValueError(f"sequence length {t} exceeds max_len={self.max_len}")
        x_BxTxD = jnp.take(self.tok[...], ids_BxT, axis=0) + self.pos[...][:, :t, :]
        out = self.transformer.forward(
            x_BxTxD, stats=stats, attention=attention, deterministic=deterministic, rngs=rngs
        )
        return ModelOutput(logits=self._head(out.hidden), stats=out.stats, attention=out.attention)

    def decode(self, ids_BxT: jnp.ndarray, cache: dict) -> tuple[jnp.ndarray, dict]:
        """Logits of T new tokens at positions cache["index"] ..., using and extending the KV cache;
        deterministic and pure, so it jits.

        Args:
          ids_BxT: the new tokens' ids.
          cache: from `transformer.init_cache(batch, max_len)` or an earlier `decode`.

        Returns:
          (logits_BxTxV, the updated cache).
        """
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
        """Sample `max_new_tokens` tokens after `prompt_BxP` with a KV cache.

        One compiled program per (batch, prompt length, max_new_tokens, top_k): the prompt fills the cache
        in one pass, then a lax.scan decodes one token per step, each attending to the cache.

        Args:
          prompt_BxP: int ids [B, P] (P >= 1).
          max_new_tokens: R >= 1; P + R must not exceed max_len (learned positions).
          temperature: softmax temperature; 0 means greedy (argmax).
          top_k: sample among the k most likely tokens only (None: all).
          rng: PRNG key for sampling (required unless temperature == 0).

        Returns:
          int ids [B, P + R]: the prompt, then the new tokens.
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
    logits_BxPxV, cache = model.decode(prompt_BxP, cache)

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

    keys_R = jax.random.split(rng, n)
    _, toks_RxB = jax.lax.scan(step, (logits_BxPxV[:, -1], cache), keys_R)
    return jnp.concatenate([prompt_BxP, toks_RxB.T], axis=1)
