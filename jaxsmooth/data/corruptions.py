"""Seeded ImageNet-C style corruptions of image sets, for robustness tests, cached on disk.

`corrupt` runs one corruption of imagecorruptions-imaug over a batch of images; `corrupt_cached` keeps
its results under `cache_dir()`; `parse_corruption(s)` read the "name:severity" specs of the config
(data.corrupt_train, data.eval_corruptions); `corrupted_test` corrupts a dataset's test split.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import replace
from pathlib import Path

import numpy as np

from jaxsmooth.data.datasets import Dataset

INSTALL_CORRUPTIONS = "pip install imagecorruptions-imaug==1.1.5"


# imagecorruptions-imaug 1.1.5 corruptions that run on 8x8 .. 32x32 RGB images with finite, in-range,
# seed-reproducible output (checked at sizes 8/16/28/32, severities 1-5). Left out: "spatter", which
# divides 0/0 (NaN output) when no pixel passes its liquid threshold, common on small images.
# Caveats: blur/pixelate/jpeg parameters are tuned for >= 32 px images, so at 8x8 they wipe out much
# more; "saturate" is the identity on grey images at severities 1-3; "frost" costs ~35 ms per image.
SMALL_IMAGE_CORRUPTIONS = (
    "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur",
    "zoom_blur", "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate",
    "jpeg_compression", "speckle_noise", "gaussian_blur", "saturate",
)  # fmt: skip


def parse_corruption(spec: str | None) -> tuple[str | None, int]:
    """ "name:severity" -> (name, severity); None / "" / "none" -> (None, 0). Validated."""
    if spec in (None, "", "none"):
        return None, 0
    name, sep, sev = str(spec).partition(":")
    if not sep or not sev.isdigit() or name not in SMALL_IMAGE_CORRUPTIONS or not 1 <= int(sev) <= 5:
        raise ValueError(
            f"corruption {spec!r} must be NAME:SEVERITY with SEVERITY in 1..5 and NAME one of "
            f"{', '.join(SMALL_IMAGE_CORRUPTIONS)}"
        )
    return name, int(sev)


def parse_corruptions(specs: str | None) -> list[tuple[str, int]]:
    """ "a:3,b:5" -> [("a", 3), ("b", 5)] (validated); None / "" -> []."""
    out = [parse_corruption(s.strip()) for s in (specs or "").split(",") if s.strip()]
    return [(n, s) for n, s in out if n is not None]


def corrupted_test(ds: Dataset, name: str, severity: int, max_examples: int = 0) -> Dataset:
    """The dataset with its (first max_examples) test images corrupted (seeded, cached on disk)."""
    x = ds.x_test[:max_examples] if max_examples else ds.x_test
    y = ds.y_test[:max_examples] if max_examples else ds.y_test
    return replace(ds, x_test=corrupt_cached(x, name, severity, seed=2), y_test=y)


def cache_dir() -> Path:
    """Where generated data (corrupted image sets) is cached: $JAXSMOOTH_CACHE or ~/.cache/jaxsmooth."""
    return Path(os.environ.get("JAXSMOOTH_CACHE") or Path.home() / ".cache" / "jaxsmooth")


def corrupt_cached(images: np.ndarray, name: str, severity: int, seed: int = 0) -> np.ndarray:
    """`corrupt`, cached on disk by a hash of the images and the arguments (generated data is never
    committed; a study corrupts the same 55,000 images in many runs)."""
    x = np.ascontiguousarray(images, dtype=np.float32)
    h = hashlib.sha256(x.tobytes())
    h.update(f"{name}:{severity}:{seed}:{x.shape}".encode())
    path = cache_dir() / "corrupted" / f"{h.hexdigest()[:24]}.npy"
    if path.is_file():
        try:
            out = np.load(path)
            if out.shape == x.shape:
                return out
        except (OSError, ValueError):
            pass  # a damaged cache file is recomputed and replaced
    out = corrupt(x, name, severity, seed=seed)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp.npy")
        np.save(tmp, out)
        os.replace(tmp, path)
    except OSError:
        pass  # no writable cache: the result is still returned
    return out


def corrupt(images: np.ndarray, name: str, severity: int, seed: int = 0) -> np.ndarray:
    """ImageNet-C corruption `name` at `severity` 1..5 of float images [N, H, W, C] (C = 1 or 3) in [0, 1].

    Returns float32 of the same shape, quantised to uint8 levels as the published corrupted sets are.
    Image i uses seed (seed, i), so corrupting a prefix of the images gives a prefix of the result.
    """
    try:
        from imagecorruptions import corruption_dict
        from PIL import Image
    except ImportError as e:
        raise ImportError(f"corrupt() needs imagecorruptions; install it with: {INSTALL_CORRUPTIONS}") from e
    if name not in SMALL_IMAGE_CORRUPTIONS:
        raise ValueError(
            f"corruption {name!r} is not one of SMALL_IMAGE_CORRUPTIONS {SMALL_IMAGE_CORRUPTIONS}"
        )
    if severity not in (1, 2, 3, 4, 5):
        raise ValueError(f"severity must be an integer in 1..5, got {severity!r}")
    x_NxHxWxC = np.asarray(images)
    if x_NxHxWxC.ndim != 4 or x_NxHxWxC.shape[-1] not in (1, 3):
        raise ValueError(f"images must be [N, H, W, 1 or 3], got shape {x_NxHxWxC.shape}")
    # The library wants uint8 RGB; grey is repeated to 3 channels here and averaged back below.
    u8_NxHxWx3 = np.rint(np.clip(x_NxHxWxC, 0, 1) * 255).astype(np.uint8)
    u8_NxHxWx3 = np.broadcast_to(u8_NxHxWx3, x_NxHxWxC.shape[:3] + (3,))
    out_NxHxWx3 = np.empty(u8_NxHxWx3.shape, np.uint8)
    saved = np.random.get_state()  # noqa: NPY002 (the library only uses the global RNG)
    try:
        for i, img in enumerate(u8_NxHxWx3):
            s = int(np.random.SeedSequence([seed, i]).generate_state(1)[0])
            np.random.seed(s)  # noqa: NPY002 - most corruptions draw from numpy's global RNG
            kwargs = {"seed": s} if name in ("glass_blur", "impulse_noise") else {}  # these take their own
            # Called directly: the library's corrupt() refuses images below 32x32.
            result = corruption_dict[name](Image.fromarray(np.ascontiguousarray(img)), severity, **kwargs)
            out_NxHxWx3[i] = np.asarray(result).astype(np.uint8)  # truncation, as the library does
    finally:
        np.random.set_state(saved)  # noqa: NPY002 - leave the caller's global RNG as it was
    out = out_NxHxWx3.astype(np.float32) / 255
    return out.mean(axis=-1, keepdims=True) if x_NxHxWxC.shape[-1] == 1 else out
