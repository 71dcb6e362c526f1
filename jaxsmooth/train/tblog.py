"""TensorBoard event files for `jaxsmooth train`, through tensorboardX (a maintained writer that needs no
TensorFlow). Optional: when tensorboardX is not installed, or `train.tensorboard=False`, nothing is written
and training is unaffected; metrics.jsonl stays the complete record.

    tensorboard --logdir runs/            # every run's DIR/tensorboard/

What is written (step = optimiser updates done):
  - scalars: train/loss, train/lr, train/grad_norm at log steps; <split>/<metric> at evaluations
    (val/accuracy, test/loss, ...); smoothing/token_cosine_last, smoothing/hfc_lfc_last (the last layer)
    at stats steps;
  - histograms over layers at stats steps: layers/token_cosine, layers/hfc_lfc, layers/eff_re_max (the
    largest real part of each layer's effective-map eigenvalues), layers/eff_re_min;
  - at the end, the run's curves.png as an image (curves), with the layer x step smoothing heatmaps.
A resumed run purges the events after its restart step (tensorboardX's purge_step), so TensorBoard shows
one continuous run. Event files are a view, never the record: a failed write (a full disk) turns the
writer off with one warning and training goes on (metrics.jsonl and the checkpoints say what happened).
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import numpy as np

LAYER_KEYS = ("token_cosine", "hfc_lfc", "eff_re_max", "eff_re_min")


def _guarded(method):
    """Run a writer method; an OSError (e.g. a full disk) disables the writer with one warning."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        if self.writer is None:
            return None
        try:
            return method(self, *args, **kwargs)
        except OSError as e:
            print(f"warning: TensorBoard event files disabled ({e}); metrics.jsonl is unaffected",
                  file=sys.stderr, flush=True)  # fmt: skip
            self.writer = None
            return None

    return wrapper


class TensorBoard:
    """A thin writer over tensorboardX.SummaryWriter; every method is a no-op when disabled."""

    def __init__(self, logdir: Path, *, enabled: bool, purge_step: int | None = None):
        self.writer = None
        if not enabled:
            return
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            return
        try:
            self.writer = SummaryWriter(str(logdir), purge_step=purge_step, flush_secs=30)
        except OSError as e:
            print(f"warning: no TensorBoard event files ({e})", file=sys.stderr, flush=True)

    @property
    def active(self) -> bool:
        return self.writer is not None

    @_guarded
    def train_record(self, rec: dict) -> None:
        """A metrics.jsonl "train" record: scalars, and per-layer histograms when it has statistics."""
        if self.writer is None:
            return
        step = rec["step"]
        for k in ("loss", "lr", "grad_norm"):
            if rec.get(k) is not None:
                self.writer.add_scalar(f"train/{k}", rec[k], step)
        for k in LAYER_KEYS:
            values = rec.get(k)
            if values:
                arr = np.asarray(values, np.float64)
                self.writer.add_histogram(f"layers/{k}", arr, step)
                if k in ("token_cosine", "hfc_lfc"):
                    self.writer.add_scalar(f"smoothing/{k}_last", float(arr[-1]), step)

    @_guarded
    def eval_record(self, rec: dict) -> None:
        """A metrics.jsonl "eval" record: <split>/<metric> scalars."""
        if self.writer is None:
            return
        for k, v in rec.items():
            split, _, metric = k.partition("_")
            if (
                split in ("val", "test", "train")
                and metric not in ("", "examples")
                and isinstance(v, int | float)
            ):
                self.writer.add_scalar(f"{split}/{metric}", v, rec["step"])

    @_guarded
    def image(self, tag: str, png: Path, step: int) -> None:
        if self.writer is None or not png.is_file():
            return
        from matplotlib.image import imread

        img = imread(str(png))[..., :3]  # HxWx3 floats in [0, 1]
        self.writer.add_image(tag, img, step, dataformats="HWC")

    @_guarded
    def close(self) -> None:
        writer, self.writer = self.writer, None
        writer.close()
