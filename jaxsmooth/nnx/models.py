"""Task models on top of `Transformer`: a ViT classifier and a causal character/token LM."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxsmooth.config import ModelConfig
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
        self.patch_w = nnx.Param(jax.nn.initializers.lecun_normal()(rngs.params(), (patch_size**2 * ch, d)))
        self.patch_b = nnx.Param(jnp.zeros((d,)))
        self.cls = nnx.Param(jnp.zeros((1, 1, d)))
        self.pos = nnx.Param(_embed_init(rngs.params(), (1, self.num_patches + 1, d)))
        self.transformer = Transformer(config, rngs=rngs)
        self.head_w = nnx.Param(jnp.zeros((d, num_classes)))
        self.head_b = nnx.Param(jnp.zeros((num_classes,)))

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

    def __call__(self, images_BxHxWxC, *, dropout_key=None, return_stats=False, return_attention=False):
        """Logits [B, classes], or (logits, aux) with per-layer stats/attention (see Transformer)."""
        out = self.transformer(
            self.embed(images_BxHxWxC),
            dropout_key=dropout_key,
            return_stats=return_stats,
            return_attention=return_attention,
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
        self.tok = nnx.Param(_embed_init(rngs.params(), (vocab_size, d)))
        self.pos = nnx.Param(_embed_init(rngs.params(), (1, max_len, d)))
        self.transformer = Transformer(config, causal=True, rngs=rngs)
        self.head_w = nnx.Param(jax.nn.initializers.xavier_uniform()(rngs.params(), (d, vocab_size)))
        self.head_b = nnx.Param(jnp.zeros((vocab_size,)))

    def __call__(self, ids_BxT, *, dropout_key=None, return_stats=False, return_attention=False):
        """Next-token logits [B, T, V] (float32), or (logits, aux)."""
        t = ids_BxT.shape[1]
        if t > self.max_len:
            raise ValueError(f"sequence length {t} exceeds max_len={self.max_len}")
        x_BxTxD = jnp.take(self.tok[...], ids_BxT, axis=0) + self.pos[...][:, :t, :]
        out = self.transformer(
            x_BxTxD, dropout_key=dropout_key, return_stats=return_stats, return_attention=return_attention
        )
        head = lambda y: y.astype(jnp.float32) @ self.head_w[...] + self.head_b[...][None, None, :]
        return _with_aux(out, head)
