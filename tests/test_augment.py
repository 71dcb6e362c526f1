"""Augmentation and label smoothing (jaxsmooth.data.augment): targets stay distributions and say how much of
each image's pixels they came from; crops are shifts of the image and flips mirror it; a run with every
augmentation on resumes bit for bit (the draws follow the step); bad settings are one-line errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_train import tiny, train_records

from jaxsmooth import train
from jaxsmooth.data import augment
from jaxsmooth.tools import cli


def _images(b=6, h=8, w=8, c=1):
    return jax.random.uniform(jax.random.key(0), (b, h, w, c)) + 1.0  # > 0: a zero pixel is padding


def test_label_smoothing_targets():
    t = np.asarray(augment.soft_labels(jnp.array([0, 3]), 4, 0.2))
    np.testing.assert_allclose(t.sum(1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(t[0], [0.85, 0.05, 0.05, 0.05], rtol=1e-6)


@pytest.mark.parametrize("mixup, cutmix", [(1.0, 0.0), (0.0, 1.0), (0.8, 1.0)])
def test_mixed_targets_match_the_mixed_pixels(mixup, cutmix):
    x, y = _images(), jnp.arange(6) % 4  # the reversed batch has other labels in every row
    for seed in range(6):
        xm, t = augment.mix(jax.random.key(seed), x, augment.soft_labels(y, 4), mixup, cutmix)
        xm, t, xn, xr = (np.asarray(a) for a in (xm, t, x, x[::-1]))
        np.testing.assert_allclose(t.sum(1), 1.0, rtol=1e-6)
        lam = t[np.arange(6), np.asarray(y)]  # weight on each image's own label
        assert np.allclose(lam, lam[0]) and 0.0 <= lam[0] <= 1.0  # one lambda per batch
        if np.allclose(xm, lam[0] * xn + (1 - lam[0]) * xr, atol=1e-6):
            continue  # mixup: the pixels are mixed by exactly the targets' weights
        from_rev = np.isclose(xm, xr) & ~np.isclose(xn, xr)  # cutmix: pixels pasted from the partner
        assert np.all(np.isclose(xm, xn) | np.isclose(xm, xr))
        np.testing.assert_allclose(from_rev[0].mean(), 1 - lam[0], atol=1e-6)  # box area == label weight
        assert cutmix > 0.0  # only cutmix pastes boxes


def test_crops_are_shifts_and_flips_mirror():
    x = _images(b=16)
    out = np.asarray(augment.random_crop_flip(jax.random.key(1), x, pad=2, flip=True))
    xn = np.asarray(x)
    padded = np.pad(xn, ((0, 0), (2, 2), (2, 2), (0, 0)))
    flipped = 0
    for i in range(16):
        found = [
            (dy, dx, f)
            for f in (False, True)
            for dy in range(5)
            for dx in range(5)
            if np.array_equal(out[i], (padded[i, :, ::-1] if f else padded[i])[dy : dy + 8, dx : dx + 8])
        ]
        assert found, f"image {i} is not a shifted (and possibly mirrored) copy"
        flipped += found[0][2]
    assert 2 <= flipped <= 14  # p = 1/2 per image
    same = np.asarray(augment.random_crop_flip(jax.random.key(1), x, pad=0, flip=False))
    np.testing.assert_array_equal(same, xn)


def test_bad_settings_are_named():
    for overrides, match in [
        ({"data.mixup_alpha": -1.0}, "data.mixup_alpha=-1.0 must be >= 0"),
        ({"train.label_smoothing": 1.0}, r"train.label_smoothing=1.0 must be in \[0, 1\)"),
        ({"data.random_crop_pad": -1}, "data.random_crop_pad=-1 must be an integer >= 0"),
        ({"model.drop_path": 1.0}, r"model.drop_path=1.0 must be in \[0, 1\)"),
    ]:
        with pytest.raises(ValueError, match=match):
            train.check_config(tiny(**overrides))
    text = cli.load_config_file(cli.resolve_config("shakespeare_char:quick"))
    text.data.mixup_alpha = 0.8
    with pytest.raises(ValueError, match="apply to image datasets only"):
        train.check_config(text)


AUG = {
    "data.random_crop_pad": 1, "data.random_flip": True, "data.mixup_alpha": 0.8, "data.cutmix_alpha": 1.0,
    "train.label_smoothing": 0.1, "model.drop_path": 0.2,
}  # fmt: skip


def test_augmented_run_learns_differently_and_resumes_bit_for_bit(tmp_path):
    train.train(tiny(), tmp_path / "plain", verbose=False)
    plain = train_records(tmp_path / "plain")
    full = tmp_path / "full"
    train.train(tiny(**AUG), full, verbose=False)
    ref = train_records(full)
    assert [r["loss"] for r in ref] != [r["loss"] for r in plain]  # the augmentations are applied
    part = tmp_path / "part"
    with pytest.raises(train.Interrupted):
        train.train(tiny(**AUG), part, stop_after=3, verbose=False)
    train.train(tiny(**AUG), part, verbose=False)
    assert [r["loss"] for r in train_records(part)] == [r["loss"] for r in ref]
