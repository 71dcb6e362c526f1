"""The train state, built in one place, and the one loader of a run directory.

The state is a plain dict pytree (its layout is what every checkpoint holds):
    {"params": nnx.to_pure_dict(params), "opt_state": optax state, "step": int32 (updates done),
     "rng": uint32[2] (base dropout key), "bad_step": int32 (first non-finite step, -1 if none)}
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from jaxsmooth import data as data_lib
from jaxsmooth.config import ModelConfig
from jaxsmooth.nnx import CausalLM, ViT
from jaxsmooth.train import checkpoint, migrate
from jaxsmooth.train import workdir as wd


def build_model(mcfg: ModelConfig, ds: data_lib.Dataset, data, rngs: nnx.Rngs) -> nnx.Module:
    """The model a run trains: a ViT for an image dataset, a causal LM for text.

    Args:
      mcfg: the model config.
      ds: the dataset (its kind, classes or vocabulary, image shape).
      data: the data section, typed (`settings.data`) or not (`config.data`): its patch_size (images) or
        seq_len (text). A whole run config is accepted too.
      rngs: the parameter initialisation's Rngs.
    Returns:
      The nnx model.
    """
    if hasattr(data, "data") and not hasattr(data, "patch_size"):  # a whole run config
        data = data.data
    if ds.kind == "text":
        return CausalLM(mcfg, ds.vocab_size, data.seq_len, rngs=rngs)
    return ViT(mcfg, ds.num_classes, ds.image_shape, data.patch_size, rngs=rngs)


def new_state(params, tx: optax.GradientTransformation, *, seed: int, step: int = 0) -> dict:
    """The train state of `params` (a pure dict) with a fresh optimiser state.

    Args:
      params: the model's parameters as a pure dict (`nnx.to_pure_dict(nnx.state(model, nnx.Param))`).
      tx: the optimiser (`jaxsmooth.train.optim.make_optimizer`).
      seed: the run's `train.seed`; the base dropout key is PRNGKey(seed + 1) (the parameters use seed).
      step: the number of updates already done (a converted run continues at its source's step).
    Returns:
      The state dict the trainer steps, checkpoints and restores.
    """
    return {
        "params": params,
        "opt_state": tx.init(params),
        "step": jnp.asarray(step, jnp.int32),
        "rng": jax.random.PRNGKey(seed + 1),
        "bad_step": jnp.full((), -1, jnp.int32),
    }


@dataclasses.dataclass
class LoadedRun:
    """A trained model rebuilt from a run directory (see `load_run`)."""

    config: ml_collections.ConfigDict
    model_config: ModelConfig
    dataset: data_lib.Dataset  # the full dataset (test split as trained against; no train_fraction subset)
    model: nnx.Module
    step: int
    # What jaxsmooth.train.migrate changed in the saved config (e.g. a run older than model.value_norm).
    migration_notes: list[str] = dataclasses.field(default_factory=list)


def load_run(workdir: str | Path, step: int | None = None) -> LoadedRun:
    """Rebuild a run's model and restore its parameters (newest step by default).

    Args:
      workdir: the run directory (relative paths work).
      step: the checkpoint step (default: the newest).
    Returns a LoadedRun. The model is built from the config saved inside the checkpoint (DIR/config.json
    for checkpoints of older versions), migrated to today's form (jaxsmooth.train.migrate; its notes say
    what changed). Read-only: a corrupt, unverifiable or ill-fitting step raises
    `checkpoint.CheckpointError` saying which and naming the other steps; a damaged config.json raises
    `workdir.MetadataError` naming it; nothing is moved. For evaluation, audits and experiments.
    """
    workdir = Path(workdir).absolute()
    cfg_path = workdir / "config.json"
    if not (workdir / "checkpoints").is_dir() and not cfg_path.is_file():
        raise FileNotFoundError(
            f"{workdir} has no checkpoints/ and no config.json: not a jaxsmooth run directory"
        )
    step = checkpoint.pick_step(workdir, step)
    meta, _ = checkpoint.read_meta(workdir / "checkpoints" / str(step))
    if meta is not None and isinstance(meta.get("config"), dict):
        raw, source = meta["config"], f"the config saved with step {step}"
    else:
        if not cfg_path.is_file():
            raise FileNotFoundError(
                f"{workdir} has no config.json, so the model of step {step} cannot be rebuilt"
            )
        raw, source = wd.read_json(cfg_path, "restore it from a copy of the run"), str(cfg_path)
    raw, notes = migrate.migrate_config(raw)  # a config written by an older jaxsmooth, in today's form
    config = ml_collections.ConfigDict(raw)
    mcfg = ModelConfig.from_dict(config.model.to_dict())
    ds = data_lib.load(config.data.name, **config.data.kwargs.to_dict())
    abstract = nnx.eval_shape(lambda: build_model(mcfg, ds, config, nnx.Rngs(params=0)))
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    step, pure = checkpoint.restore_params(workdir, nnx.to_pure_dict(params), step, source=source)
    nnx.replace_by_pure_dict(params, pure)
    return LoadedRun(config, mcfg, ds, nnx.merge(graphdef, params, rest), step, notes)
