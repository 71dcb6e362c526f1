"""The trainer: one loop with hooks over a jitted step, and what it needs around it.

    from jaxsmooth.train import train
    summary = train(config, "runs/x")            # or: jaxsmooth train --config digits --workdir runs/x

Modules, each one concept (imports point down this list and to the core, `jaxsmooth.nnx` and
`jaxsmooth.data`, never up to `jaxsmooth.tools`):
  trainer      `train()`: set-up, the loop, the summary
  hooks        the loop's hooks (logging, statistics, evaluation, best-validation selection,
               checkpoints, TensorBoard) and the typed objects they share
  step         the pure train and eval steps
  state        the one train-state constructor, the model builder and the one run loader
  settings     the ConfigDict resolved once into typed sections; the defaults of fields older configs lack
  migrate      everything written by an older version, migrated once at load time
  evaluation   a split's loss and accuracy, best-validation selection, the final evaluation
  checkpoint, workdir, jsonl, runlog, tblog, plots, watchdog, parallel, optim, runtime

The names below are imported on first use, so `jaxsmooth.train.workdir` stays free of JAX.
"""

import importlib

# name -> the module of this package that defines it
_EXPORTS = {
    "train": "trainer",
    "Interrupted": "trainer",
    "NonFiniteError": "trainer",
    "IncompatibleWorkdirError": "trainer",
    "RESTART_HINT": "trainer",
    "check_config": "settings",
    "is_text": "settings",
    "build_model": "state",
    "new_state": "state",
    "load_run": "state",
    "LoadedRun": "state",
    "make_train_step": "step",
    "make_eval_step": "step",
    "per_example_loss": "step",
    "read_metrics": "runlog",
    "NoUsableCheckpointError": "checkpoint",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
