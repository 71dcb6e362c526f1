"""Everything an older jaxsmooth wrote, brought to today's form in one place, once, at load time.

A field added to the run config after runs had been made has a value that behaves exactly as before it
existed (ADDED_FIELDS). Where that value depends on other fields, a rule says so (`model.value_norm`: a
pre-LN run made before the field existed read LN1(x) in its value path, so it is "ln", not today's
default "rms"). Every reader of a saved config goes through `migrate_config`:
  - the trainer, resuming: the config stored with a checkpoint (or DIR/config.json for checkpoints that
    predate stored configs) is compared with the new run's after migration (`workdir.config_differences`);
  - the run loader (`jaxsmooth.train.state.load_run`, also used by the audit): the model is rebuilt from
    the migrated config;
  - the typed settings (`jaxsmooth.train.settings.resolve`): a config file written before a field existed
    trains as it did.
Study record keys leave out the fields added after study records existed, at their neutral value
(STUDY_KEY_NEUTRAL), so adding a field never orphans a finished cell.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

# Fields added to the config after runs had been made, with the value that behaves as before they existed.
ADDED_FIELDS: dict[str, Any] = {
    "data.val_size": 0,
    "data.corrupt_train": "none",
    "data.eval_corruptions": "",
    "train.select": "last",
    "train.train_eval_size": 0,
    "train.test_max_examples": 0,
    "train.profile": False,
    "train.on_nonfinite": "stop",
    "model.drop_path": 0.0,
    "data.random_crop_pad": 0,
    "data.random_flip": False,
    "data.mixup_alpha": 0.0,
    "data.cutmix_alpha": 0.0,
    "train.label_smoothing": 0.0,
    "train.step_timeout_s": -1.0,
    # Placement and logging fields (resumable changes; listed so that typed settings have their defaults).
    "train.tensorboard": True,
    "train.model_parallel": 1,
    "train.param_sharding": "replicated",
}

# The added fields that postdate the first study records: a record key omits such a field at this value.
# (The fields added before any study record existed stay in the keys: changing that would orphan them.)
STUDY_KEY_NEUTRAL: dict[str, Any] = {
    k: ADDED_FIELDS[k]
    for k in (
        "model.drop_path",
        "data.random_crop_pad",
        "data.random_flip",
        "data.mixup_alpha",
        "data.cutmix_alpha",
        "train.label_smoothing",
        "train.step_timeout_s",
    )
}


def legacy_value_norm(model: Mapping[str, Any]) -> bool:
    """Whether a saved model config predates `model.value_norm` and its value path read LN1(x).

    Args:
      model: the saved `model` section (a dict).
    Returns:
      True for a pre-LN model section without `value_norm` (such runs trained with "ln").
    """
    return "value_norm" not in model and model.get("residual", "pre_ln") == "pre_ln"


def migrate_config(config: Mapping[str, Any]) -> tuple[dict, list[str]]:
    """A saved run config (written by any jaxsmooth version) in today's form, and one note per change made
    that a reader should know about.

    Args:
      config: the run config as a plain dict (config.json, or the config stored with a checkpoint); any
        of its sections may be missing.
    Returns:
      (a new dict, notes). The input is not modified.
    """
    out = with_added_fields(config)
    notes = []
    model = out.get("model")
    if isinstance(model, dict) and legacy_value_norm(model):
        model["value_norm"] = "ln"
        notes.append(
            "the config predates model.value_norm; its pre-LN value path read LN1(x), so value_norm='ln'"
        )
    return out, notes


def with_added_fields(config: Mapping[str, Any]) -> dict:
    """A copy of a run config with every absent ADDED_FIELDS field set to its value (which is also today's
    default, so a new config that leaves a field out gets the same).

    Args:
      config: the run config as a plain dict.
    Returns:
      A new dict; sections the config lacks stay absent.
    """
    out = copy.deepcopy(dict(config))
    for field, value in ADDED_FIELDS.items():
        section, name = field.split(".")
        if isinstance(out.get(section), dict) and name not in out[section]:
            out[section][name] = value
    return out


def study_key_config(config: Mapping[str, Any]) -> dict:
    """A resolved config as a study record key holds it: the fields of STUDY_KEY_NEUTRAL left out where
    they have their neutral value.

    Args:
      config: the resolved run config (plain dict of sections).
    Returns:
      A new dict (one level of sections copied).
    """
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in config.items()}
    for field, neutral in STUDY_KEY_NEUTRAL.items():
        section, name = field.split(".")
        if name in out.get(section, {}) and out[section][name] == neutral:
            del out[section][name]
    return out
