"""Training-time image augmentation and label smoothing, on device, inside the jitted train step.

Pure functions of (key, images [B, H, W, C], integer labels [B]); the key comes from the run's seed and
the step (`train.make_train_step`), so a resumed run draws the same augmentations. The recipe the paper's
vision experiments used (DeiT's, docs/experiments.md "Full-size configs") also has RandAugment and random
erasing; those are not implemented here.

- `random_crop_flip`: pad by `pad` pixels (zeros) and crop back at a random offset, per image; a random
  horizontal flip, per image.
- `mix`: mixup (Zhang et al. 2018) or cutmix (Yun et al. 2019) of the batch with its reverse, one lambda
  per batch (timm's "batch" mode): with both alphas > 0, each batch is one or the other with probability
  1/2. Cutmix's lambda is corrected to the pasted box's real area.
- `soft_labels`: one-hot labels with label smoothing, the targets `mix` interpolates.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Augment:
    """What the train step applies (all off by default); the trainer builds it from data.random_crop_pad,
    data.random_flip, data.mixup_alpha, data.cutmix_alpha and train.label_smoothing
    (`jaxsmooth.train.settings.resolve`)."""

    crop_pad: int = 0  # data.random_crop_pad: pad-and-crop shift in pixels (0: none)
    flip: bool = False  # data.random_flip: horizontal flips
    mixup: float = 0.0  # data.mixup_alpha: Beta(a, a) mixing weight (0: no mixup)
    cutmix: float = 0.0  # data.cutmix_alpha: Beta(a, a) box area (0: no cutmix)
    label_smoothing: float = 0.0  # train.label_smoothing

    def __post_init__(self):
        if not (
            isinstance(self.crop_pad, int) and not isinstance(self.crop_pad, bool) and self.crop_pad >= 0
        ):
            raise ValueError(f"data.random_crop_pad={self.crop_pad!r} must be an integer >= 0")
        if not isinstance(self.flip, bool):
            raise ValueError(f"data.random_flip={self.flip!r} must be True or False")
        for name, v in (("data.mixup_alpha", self.mixup), ("data.cutmix_alpha", self.cutmix)):
            if not (isinstance(v, int | float) and v >= 0):
                raise ValueError(f"{name}={v!r} must be >= 0 (0 turns it off)")
        if not (isinstance(self.label_smoothing, int | float) and 0 <= self.label_smoothing < 1):
            raise ValueError(f"train.label_smoothing={self.label_smoothing!r} must be in [0, 1)")

    @property
    def images(self) -> bool:
        """Whether any image transform is on."""
        return bool(self.crop_pad or self.flip or self.mixup or self.cutmix)

    @property
    def soft(self) -> bool:
        """Whether the loss needs soft targets (mixing or label smoothing)."""
        return bool(self.mixup or self.cutmix or self.label_smoothing)


def random_crop_flip(key: jax.Array, x_BxHxWxC: jax.Array, pad: int, flip: bool) -> jax.Array:
    """Per image: a random shift by up to `pad` pixels (zero padding) and a random horizontal flip."""
    b, h, w, _ = x_BxHxWxC.shape
    k_crop, k_flip = jax.random.split(key)
    if pad:
        padded = jnp.pad(x_BxHxWxC, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
        off = jax.random.randint(k_crop, (b, 2), 0, 2 * pad + 1)
        crop = lambda img, o: jax.lax.dynamic_slice(img, (o[0], o[1], 0), (h, w, img.shape[-1]))
        x_BxHxWxC = jax.vmap(crop)(padded, off)
    if flip:
        do = jax.random.bernoulli(k_flip, 0.5, (b, 1, 1, 1))
        x_BxHxWxC = jnp.where(do, x_BxHxWxC[:, :, ::-1], x_BxHxWxC)
    return x_BxHxWxC


def soft_labels(y_B: jax.Array, num_classes: int, smoothing: float = 0.0) -> jax.Array:
    """One-hot targets [B, C], smoothed: 1 - s + s / C on the label, s / C elsewhere."""
    onehot = jax.nn.one_hot(y_B, num_classes)
    return onehot * (1.0 - smoothing) + smoothing / num_classes


def mix(
    key: jax.Array, x_BxHxWxC: jax.Array, t_BxC: jax.Array, mixup: float, cutmix: float
) -> tuple[jax.Array, jax.Array]:
    """Mixup or cutmix of the batch with its reverse; returns (images, targets). One of the alphas may be
    0 (that method is off); with both > 0 each call picks one with probability 1/2."""
    if not (mixup or cutmix):
        return x_BxHxWxC, t_BxC
    k_pick, k_lam, k_box = jax.random.split(key, 3)
    x_rev, t_rev = x_BxHxWxC[::-1], t_BxC[::-1]
    _, h, w, _ = x_BxHxWxC.shape

    def do_mixup():
        lam = jax.random.beta(k_lam, mixup, mixup)
        return lam * x_BxHxWxC + (1 - lam) * x_rev, lam

    def do_cutmix():
        lam = jax.random.beta(k_lam, cutmix, cutmix)
        cut = jnp.sqrt(1.0 - lam)  # box sides, as fractions of the image's
        ch, cw = jnp.floor(cut * h).astype(jnp.int32), jnp.floor(cut * w).astype(jnp.int32)
        cy, cx = jax.random.randint(k_box, (2,), 0, jnp.array([h, w]))
        y0, y1 = jnp.clip(cy - ch // 2, 0, h), jnp.clip(cy + ch // 2, 0, h)
        x0, x1 = jnp.clip(cx - cw // 2, 0, w), jnp.clip(cx + cw // 2, 0, w)
        rows, cols = jnp.arange(h)[:, None], jnp.arange(w)[None, :]
        box = (rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)  # [H, W]
        lam = 1.0 - jnp.mean(box.astype(jnp.float32))  # the real kept area
        return jnp.where(box[None, :, :, None], x_rev, x_BxHxWxC), lam

    if mixup and cutmix:
        (xm, lm), (xc, lc) = do_mixup(), do_cutmix()
        use_cut = jax.random.bernoulli(k_pick, 0.5)
        x, lam = jnp.where(use_cut, xc, xm), jnp.where(use_cut, lc, lm)
    else:
        x, lam = do_mixup() if mixup else do_cutmix()
    return x.astype(x_BxHxWxC.dtype), lam * t_BxC + (1 - lam) * t_rev


def apply(aug: Augment, key: jax.Array, x_BxHxWxC: jax.Array, y_B: jax.Array, num_classes: int):
    """(images, targets): targets are soft [B, C] when `aug.soft`, else the integer labels."""
    k_geo, k_mix = jax.random.split(key)
    if aug.crop_pad or aug.flip:
        x_BxHxWxC = random_crop_flip(k_geo, x_BxHxWxC, aug.crop_pad, aug.flip)
    if not aug.soft:
        return x_BxHxWxC, y_B
    t = soft_labels(y_B, num_classes, aug.label_smoothing)
    return mix(k_mix, x_BxHxWxC, t, aug.mixup, aug.cutmix)
