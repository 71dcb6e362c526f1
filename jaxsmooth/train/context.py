"""What a run is made of once it is set up: the typed settings, the data, the mesh and the compiled
programs, in one object the loop, its hooks and the evaluation share (built by
`jaxsmooth.train.trainer.setup`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from jaxsmooth import data as data_lib
from jaxsmooth.train import parallel
from jaxsmooth.train.settings import RunSettings


@dataclasses.dataclass
class RunContext:
    """A set-up run.

    Attributes:
      settings: the typed config (`jaxsmooth.train.settings.resolve`).
      workdir: the run directory.
      ds: the prepared dataset (train fraction, validation split, training corruption applied).
      batcher: the training batches; batch t is `batcher.batch(t)` (the same after a resume).
      mesh: the device mesh (data axis, and a model axis where parameters are sharded).
      graphdef: the model's graph definition (`nnx.split`); `nnx.merge(graphdef, params)` is the model.
      steps: with_stats -> the compiled train step (statistics of the same forward pass when True).
      eval_step: the compiled eval step (params, x, y, n_valid) -> (loss sum, number correct).
      primary: whether this is process 0 (the one that writes files).
      num_params: the number of parameters.
      init_fn: the compiled initial-state constructor (the profile at init measures its params).
    """

    settings: RunSettings
    workdir: Path
    ds: data_lib.Dataset
    batcher: data_lib.Batcher
    mesh: Any
    graphdef: Any
    steps: dict[bool, Callable]
    eval_step: Callable
    primary: bool
    num_params: int
    init_fn: Callable | None = None

    @property
    def eval_split(self) -> str:
        """Periodic evaluations and model selection use the validation split when there is one; the test
        split is then evaluated once, at the end."""
        return "val" if self.ds.x_val is not None else "test"

    def put(self, *arrays: np.ndarray):
        """This process's rows of global [B, ...] arrays -> global arrays sharded over the mesh.

        Args:
          *arrays: global batches with the same leading dimension B.
        Returns:
          A tuple of jax.Arrays placed on the mesh (the batch axis split over the data axis).
        """
        b = arrays[0].shape[0]
        rows = parallel.local_rows(self.mesh, b)
        return parallel.put_batch(self.mesh, b, *(a[rows] for a in arrays))
