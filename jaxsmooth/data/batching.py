"""Batches: `Batcher` makes the training batch of global step t a pure function of (seed, t), so a resumed
run sees exactly the batches an uninterrupted one would; `eval_batches` walks a split in order, padded to
static shapes.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from jaxsmooth.data.datasets import Dataset


class Batcher:
    """Training batches where the batch of global step t is a pure function of (seed, t).

    Images: epoch e = t // steps_per_epoch is the permutation `default_rng([seed, e]).permutation(N)`
    cut into full batches (the remainder is dropped). Text: B windows of seq_len + 1 characters at
    offsets drawn from `default_rng([seed, t])`, returned as inputs and next-character targets [B, T].
    """

    def __init__(self, ds: Dataset, batch_size: int, seed: int = 0, seq_len: int | None = None):
        if batch_size < 1 or seed < 0:
            raise ValueError(f"need batch_size >= 1 and seed >= 0, got {batch_size} and {seed}")
        self.ds, self.batch_size, self.seed, self.seq_len = ds, batch_size, seed, seq_len
        n = len(ds.x_train)
        self.steps_per_epoch: int | None = None
        if ds.kind == "text":
            if seq_len is None or not 1 <= seq_len < n:
                raise ValueError(f"text needs 1 <= seq_len < {n} training characters, got seq_len={seq_len}")
        else:
            self.steps_per_epoch = n // batch_size
            if self.steps_per_epoch == 0:
                raise ValueError(f"batch_size={batch_size} exceeds the {n} training examples")
        self._perm_epoch, self._perm = -1, np.empty(0, np.int64)

    def permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:  # cached: consecutive steps almost always share an epoch
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.ds.x_train))
            self._perm_epoch = epoch
        return self._perm

    def batch(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        step = int(step)
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        b = self.batch_size
        if self.ds.kind == "text":
            tokens_N = self.ds.x_train
            # Highest start is N - T - 1 so that the target window (start + 1 ... start + T) exists.
            start_B = np.random.default_rng([self.seed, step]).integers(
                0, len(tokens_N) - self.seq_len, size=b
            )
            idx_BxT = start_B[:, None] + np.arange(self.seq_len)[None, :]
            return tokens_N[idx_BxT], tokens_N[idx_BxT + 1]
        epoch, i = divmod(step, self.steps_per_epoch)
        idx_B = self.permutation(epoch)[i * b : (i + 1) * b]
        return self.ds.x_train[idx_B], self.ds.y_train[idx_B]

    def eval_batches(self, batch_size: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
        return eval_batches(self.ds, batch_size or self.batch_size, seq_len=self.seq_len)


def eval_batches(
    ds: Dataset, batch_size: int, seq_len: int | None = None, split: str = "test", max_examples: int = 0
) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
    """A split ("test", "val" or "train") in order as (x, y, n_valid), zero-padded to batch_size rows so
    shapes stay static; at most max_examples items (0: all; for text, windows).

    Rows >= n_valid are padding (label 0) and must be masked. Text is cut into consecutive windows of
    seq_len characters with next-character targets; the final (len - 1) % seq_len targets are dropped.
    """
    if split not in ("test", "val", "train"):
        raise ValueError(f"split={split!r}; choose test, val or train")
    xs, ys = {"test": (ds.x_test, ds.y_test), "val": (ds.x_val, ds.y_val), "train": (ds.x_train, ds.y_train)}[
        split
    ]
    if xs is None:
        raise ValueError(
            f"dataset {ds.name!r} has no {split} split (set data.val_size for a validation split)"
        )
    if ds.kind == "text":
        if seq_len is None or seq_len < 1:
            raise ValueError(f"text evaluation needs seq_len >= 1, got {seq_len}")
        n_win = (len(xs) - 1) // seq_len
        if n_win == 0:
            raise ValueError(f"the {len(xs)}-character {split} split is too short for seq_len={seq_len}")
        x_all = xs[: n_win * seq_len].reshape(n_win, seq_len)
        y_all = xs[1 : n_win * seq_len + 1].reshape(n_win, seq_len)
    else:
        x_all, y_all = xs, ys
    if max_examples:
        x_all, y_all = x_all[:max_examples], y_all[:max_examples]
    for start in range(0, len(x_all), batch_size):
        x, y = x_all[start : start + batch_size], y_all[start : start + batch_size]
        n_valid = len(x)
        if n_valid < batch_size:
            x = np.pad(x, [(0, batch_size - n_valid)] + [(0, 0)] * (x.ndim - 1))
            y = np.pad(y, [(0, batch_size - n_valid)] + [(0, 0)] * (y.ndim - 1))
        yield x, y, n_valid
