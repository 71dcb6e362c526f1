"""The run config, resolved once at the door into typed, frozen sections.

    settings = resolve(config)          # config: the ml_collections.ConfigDict of jaxsmooth/configs/
    settings.model                      # jaxsmooth.ModelConfig
    settings.data, settings.opt, settings.train, settings.augment

Below `jaxsmooth.train.trainer.train` no code sees the ConfigDict: each module receives the section it needs.
`resolve` validates every field that can be checked without data (a ValueError names the field and what
it must be), fills in the fields that configs written before they existed lack (with the values that
behave as before: `jaxsmooth.train.migrate.ADDED_FIELDS`, the one table of them) and refuses a field
jaxsmooth does not know (a misspelt field is never silently ignored).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

import ml_collections

from jaxsmooth import data as data_lib
from jaxsmooth.config import ModelConfig
from jaxsmooth.data import augment
from jaxsmooth.train import migrate, optim, watchdog
from jaxsmooth.train import workdir as wd

# Side length of the images of each built-in image dataset (before data.kwargs.pad_to), so a patch size
# that does not divide the image fails before any data is loaded.
IMAGE_SIZE = {"digits": 8, "mnist": 28, "fashion_mnist": 28, "cifar10": 32, "cifar100": 32}
TEXT_DATASETS = ("shakespeare_char", "char_file")


@dataclasses.dataclass(frozen=True)
class DataSettings:
    """The `data` section (field meanings: jaxsmooth/configs/_common.py `data()`)."""

    name: str
    kwargs: Mapping[str, Any]
    batch_size: int
    eval_batch_size: int
    seed: int
    train_fraction: float
    patch_size: int | None
    seq_len: int | None
    val_size: int
    corrupt_train: str | None
    eval_corruptions: str
    random_crop_pad: int
    random_flip: bool
    mixup_alpha: float
    cutmix_alpha: float

    @property
    def text(self) -> bool:
        """Whether the dataset is text (a causal LM) rather than images (a ViT)."""
        return self.name in TEXT_DATASETS


@dataclasses.dataclass(frozen=True)
class OptSettings:
    """The `opt` section (jaxsmooth.train.optim.make_optimizer; meanings: configs/_common.py `opt()`)."""

    lr: float
    warmup_steps: int
    schedule: str
    decay_steps: int
    end_lr_fraction: float
    weight_decay: float
    clip_norm: float
    b1: float
    b2: float
    eps: float


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """The `train` section (field meanings: jaxsmooth/configs/_common.py `train()`)."""

    steps: int
    log_every: int
    stats_every: int
    eval_every: int
    eval_max_batches: int
    checkpoint_every: int
    max_to_keep: int
    seed: int
    num_devices: int
    select: str
    train_eval_size: int
    test_max_examples: int
    profile: bool
    label_smoothing: float
    on_nonfinite: str
    tensorboard: bool
    model_parallel: int
    param_sharding: str
    step_timeout_s: float


@dataclasses.dataclass(frozen=True)
class RunSettings:
    """A whole run config, typed: what `train()` hands down instead of the ConfigDict.

    Attributes:
      name: the run's name (the default workdir is ./runs/<name>).
      model: the typed model config.
      data, opt, train: the typed sections.
      augment: the train step's augmentation and label smoothing (from data.* and train.label_smoothing).
      config_dict: the config as given, a plain JSON-able dict (saved as config.json and in checkpoints).
    """

    name: str
    model: ModelConfig
    data: DataSettings
    opt: OptSettings
    train: TrainSettings
    augment: augment.Augment
    config_dict: dict

    @property
    def resolved(self) -> dict:
        """The config with the model section as ModelConfig resolved it (what checkpoints compare)."""
        return wd.resolved_config(self.config_dict, self.model)


def _section(cls, raw: Mapping[str, Any], name: str):
    """A typed section from its dict; an unknown or missing field raises a ValueError naming it."""
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - fields)
    if unknown:
        known = ", ".join(sorted(fields))
        raise ValueError(
            f"config field {name}.{unknown[0]} is not a field jaxsmooth knows; {name} has: {known}"
        )
    missing = sorted(fields - set(raw))
    if missing:
        raise ValueError(
            f"config has no field {name}.{missing[0]}; add it (configs/_common.py shows its default)"
        )
    return cls(**{k: raw[k] for k in fields})


def resolve(config: ml_collections.ConfigDict | Mapping[str, Any]) -> RunSettings:
    """Validate a run config and resolve it into typed sections.

    Args:
      config: the run config (a ConfigDict, or the same as a plain dict, e.g. a config.json).
    Returns:
      The RunSettings.
    Raises:
      ValueError naming the first bad field and what it must be (model fields are checked by ModelConfig
      and Spectrum, opt fields by jaxsmooth.train.optim).
    """
    raw = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else dict(config)
    for section in ("model", "data", "opt", "train"):
        if not isinstance(raw.get(section), Mapping):
            raise ValueError(f"config has no '{section}' section")
    if isinstance(config, ml_collections.ConfigDict):
        config_dict = json.loads(config.to_json_best_effort())
    else:
        config_dict = json.loads(json.dumps(raw))
    full = migrate.with_added_fields(raw)
    data = _section(DataSettings, full["data"], "data")
    data = dataclasses.replace(data, kwargs=dict(data.kwargs or {}))
    train = _section(TrainSettings, full["train"], "train")
    opt = _section(OptSettings, full["opt"], "opt")
    _check_numbers(data, train)
    aug = _check_protocol(data, train)
    watchdog.Watchdog(train.step_timeout_s)  # validates the field
    if not data.text:
        size = data.kwargs.get("pad_to") or IMAGE_SIZE.get(data.name)
        if size and size % data.patch_size:
            raise ValueError(
                f"data.patch_size={data.patch_size} must divide the {size}x{size} images of {data.name}"
                + (" (after data.kwargs.pad_to)" if data.kwargs.get("pad_to") else "")
            )
    optim.make_schedule(opt)  # validates opt.*
    model = ModelConfig.from_dict(dict(full["model"]))
    return RunSettings(raw.get("name", "run"), model, data, opt, train, aug, config_dict)


def check_config(config: ml_collections.ConfigDict) -> ModelConfig:
    """Validate everything that can be checked without data (`resolve`); returns the typed model config.

    Args:
      config: the run config.
    Returns:
      The ModelConfig.
    Raises:
      ValueError naming the field.
    """
    return resolve(config).model


def is_text(config: ml_collections.ConfigDict) -> bool:
    """Whether a run config trains on text (a causal LM) rather than images.

    Args:
      config: the run config.
    Returns:
      True for the text datasets.
    """
    return config.data.name in TEXT_DATASETS


def _check_numbers(d: DataSettings, t: TrainSettings) -> None:
    positive, non_negative = (lambda v: v >= 1, "must be >= 1"), (lambda v: v >= 0, "must be >= 0")
    rules = {
        **{f"train.{k}": positive for k in ("steps", "log_every", "stats_every", "eval_every")},
        "train.checkpoint_every": positive,
        "train.max_to_keep": positive,
        "train.seed": non_negative,
        "train.num_devices": (lambda v: v >= 0, "must be >= 0 (0 = all devices)"),
        "train.eval_max_batches": (lambda v: v >= 0, "must be >= 0 (0 = the whole test split)"),
        "data.name": (lambda v: v in data_lib.DATASETS, f"is unknown; choose one of {data_lib.DATASETS}"),
        "data.batch_size": positive,
        "data.eval_batch_size": positive,
        "data.seed": non_negative,
        "data.train_fraction": (lambda v: 0 < v <= 1, "must be in (0, 1]"),
        # Text needs a context length, images a patch size (the other field may stay None).
        **({"data.seq_len": positive} if d.text else {"data.patch_size": positive}),
    }
    for field, (ok, why) in rules.items():
        section, name = field.split(".")
        value = getattr({"data": d, "train": t}[section], name)
        try:
            good = ok(value) and not isinstance(value, bool)
        except TypeError:  # e.g. None where a number is needed
            good = False
        if not good:
            raise ValueError(f"{field}={value!r} {why}")


def _check_protocol(d: DataSettings, t: TrainSettings) -> augment.Augment:
    """The evaluation protocol's fields (validation split, selection, extra evaluations) and the
    augmentation; returns the Augment."""
    for field, v in (("data.val_size", d.val_size), ("train.train_eval_size", t.train_eval_size),
                     ("train.test_max_examples", t.test_max_examples)):  # fmt: skip
        if not (isinstance(v, int) and not isinstance(v, bool) and v >= 0):
            raise ValueError(f"{field}={v!r} must be an integer >= 0")
    if t.select not in ("last", "best_val"):
        raise ValueError(f"train.select={t.select!r}; choose last or best_val")
    if t.select == "best_val" and not d.val_size:
        raise ValueError("train.select=best_val needs a validation split: set data.val_size > 0")
    if t.on_nonfinite not in ("stop", "record"):
        raise ValueError(f"train.on_nonfinite={t.on_nonfinite!r}; choose stop or record")
    if not isinstance(t.profile, bool):
        raise ValueError(f"train.profile={t.profile!r} must be True or False")
    aug = augment.Augment(  # raises a ValueError naming a bad field
        crop_pad=d.random_crop_pad, flip=d.random_flip, mixup=d.mixup_alpha, cutmix=d.cutmix_alpha,
        label_smoothing=t.label_smoothing,
    )  # fmt: skip
    if d.text and aug.images:
        raise ValueError("data.random_crop_pad / random_flip / mixup_alpha / cutmix_alpha apply to image "
                         "datasets only; leave them at 0 / False for text")  # fmt: skip
    data_lib.parse_corruption(d.corrupt_train)  # raises a ValueError naming the bad spec
    data_lib.parse_corruptions(d.eval_corruptions)
    if d.text and (d.corrupt_train not in (None, "", "none") or d.eval_corruptions):
        raise ValueError("data.corrupt_train / data.eval_corruptions apply to image datasets only")
    return aug
