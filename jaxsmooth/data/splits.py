"""The training data a run uses, from a loaded dataset: `prepare` carves the validation split, keeps a
seeded subset of the training split for data-efficiency studies, and optionally corrupts the images.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from jaxsmooth.data.corruptions import corrupt_cached, parse_corruption
from jaxsmooth.data.datasets import Dataset, check_fraction, stratified_pick

VAL_SEED = 20240101  # the validation split does not depend on data.seed: every seed is judged on it


def prepare(
    ds: Dataset,
    train_fraction: float = 1.0,
    seed: int = 0,
    *,
    val_size: int = 0,
    corrupt_train: str | None = None,
) -> Dataset:
    """The training data a run uses: a validation split, a subset, and optionally corrupted images.

    Args:
      ds: the loaded dataset.
      train_fraction: keep a seeded subset of round(train_fraction * N) of the training items left after
        the validation split (class-stratified for images; text keeps a seeded contiguous window, since
        scattered characters are no corpus).
      seed: draws the subset (data.seed).
      val_size: carve this many training items out as the validation split first (images: class-
        stratified, drawn with a fixed seed, so every run and seed is judged on the same items; text: the
        last val_size characters of the training stream). 0: no validation split.
      corrupt_train: "name:severity" (`corrupt`): corrupt the training and validation images (the test
        set stays clean; evaluate corrupted test sets with `corrupted_test`). None or "none": clean.
    Returns:
      The prepared Dataset (x_val / y_val set when val_size > 0).
    """
    check_fraction("train_fraction", train_fraction, allow_one=True)
    if not (isinstance(val_size, int | np.integer) and 0 <= val_size < len(ds.x_train)):
        raise ValueError(f"data.val_size={val_size!r} must be an integer in [0, {len(ds.x_train)})")
    if val_size:
        if ds.kind == "text":
            if val_size < 2:
                raise ValueError(
                    f"data.val_size={val_size} characters is too short for a text validation split"
                )
            cut = len(ds.x_train) - val_size
            ds = replace(ds, x_train=ds.x_train[:cut], x_val=ds.x_train[cut:])
        else:
            val = stratified_pick(ds.y_train, val_size, np.random.default_rng(VAL_SEED))
            keep = np.setdiff1d(np.arange(len(ds.x_train)), val)
            ds = replace(ds, x_train=ds.x_train[keep], y_train=ds.y_train[keep], x_val=ds.x_train[val],
                         y_val=ds.y_train[val])  # fmt: skip
    if train_fraction != 1:
        n_total = len(ds.x_train)
        n = round(train_fraction * n_total)
        if n < 1:
            raise ValueError(f"train_fraction={train_fraction} keeps none of the {n_total} training items")
        rng = np.random.default_rng(seed)
        if ds.kind == "text":
            start = int(rng.integers(0, n_total - n + 1))
            ds = replace(ds, x_train=ds.x_train[start : start + n])
        else:
            keep = stratified_pick(ds.y_train, n, rng)
            ds = replace(ds, x_train=ds.x_train[keep], y_train=ds.y_train[keep])
    name, severity = parse_corruption(corrupt_train)
    if name is not None:
        if ds.kind != "image":
            raise ValueError("data.corrupt_train applies to image datasets only")
        x_val = None if ds.x_val is None else corrupt_cached(ds.x_val, name, severity, seed=1)
        ds = replace(ds, x_train=corrupt_cached(ds.x_train, name, severity, seed=0), x_val=x_val)
    return ds
