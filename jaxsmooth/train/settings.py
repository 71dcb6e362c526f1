"""The run config, checked once at the door: `check_config` validates every field that can be checked
without data and returns the typed model config."""

from __future__ import annotations

import ml_collections

from jaxsmooth import data as data_lib
from jaxsmooth.config import ModelConfig
from jaxsmooth.data import augment
from jaxsmooth.train import optim, watchdog
from jaxsmooth.train.evaluation import setting

# Side length of the images of each built-in image dataset (before data.kwargs.pad_to), so a patch size
# that does not divide the image fails before any data is loaded.
_IMAGE_SIZE = {"digits": 8, "mnist": 28, "fashion_mnist": 28, "cifar10": 32, "cifar100": 32}


def check_config(config: ml_collections.ConfigDict) -> ModelConfig:
    """Validate everything that can be checked without data; returns the typed model config.

    Raises ValueError naming the field (model fields are checked by ModelConfig / Spectrum).
    """
    for section in ("model", "data", "opt", "train"):
        if section not in config:
            raise ValueError(f"config has no '{section}' section")
    d = config.data
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
        **({"data.seq_len": positive} if is_text(config) else {"data.patch_size": positive}),
    }
    for field, (ok, why) in rules.items():
        section, name = field.split(".")
        value = config[section][name]
        try:
            good = ok(value) and not isinstance(value, bool)
        except TypeError:  # e.g. None where a number is needed
            good = False
        if not good:
            raise ValueError(f"{field}={value!r} {why}")
    _check_protocol(config)
    watchdog.Watchdog(setting(config, "train.step_timeout_s", watchdog.AUTO))  # validates the field
    if not is_text(config):
        size = d.kwargs.get("pad_to") or _IMAGE_SIZE.get(d.name)
        if size and size % d.patch_size:
            raise ValueError(
                f"data.patch_size={d.patch_size} must divide the {size}x{size} images of {d.name}"
                + (" (after data.kwargs.pad_to)" if d.kwargs.get("pad_to") else "")
            )
    optim.make_schedule(config.opt)  # validates opt.*
    return ModelConfig.from_dict(config.model.to_dict())


def _check_protocol(config) -> None:
    """The evaluation protocol's fields (validation split, selection, extra evaluations)."""
    for field in ("data.val_size", "train.train_eval_size", "train.test_max_examples"):
        v = setting(config, field, 0)
        if not (isinstance(v, int) and not isinstance(v, bool) and v >= 0):
            raise ValueError(f"{field}={v!r} must be an integer >= 0")
    select = setting(config, "train.select", "last")
    if select not in ("last", "best_val"):
        raise ValueError(f"train.select={select!r}; choose last or best_val")
    if select == "best_val" and not setting(config, "data.val_size", 0):
        raise ValueError("train.select=best_val needs a validation split: set data.val_size > 0")
    on_nonfinite = setting(config, "train.on_nonfinite", "stop")
    if on_nonfinite not in ("stop", "record"):
        raise ValueError(f"train.on_nonfinite={on_nonfinite!r}; choose stop or record")
    if not isinstance(setting(config, "train.profile", False), bool):
        raise ValueError(f"train.profile={setting(config, 'train.profile', False)!r} must be True or False")
    aug = augment.Augment.from_config(config)  # raises a ValueError naming a bad field
    if is_text(config) and aug.images:
        raise ValueError("data.random_crop_pad / random_flip / mixup_alpha / cutmix_alpha apply to image "
                         "datasets only; leave them at 0 / False for text")  # fmt: skip
    corrupt_train = setting(config, "data.corrupt_train", "none")
    evals = setting(config, "data.eval_corruptions", "")
    data_lib.parse_corruption(corrupt_train)  # raises a ValueError naming the bad spec
    data_lib.parse_corruptions(evals)
    if is_text(config) and (corrupt_train not in (None, "", "none") or evals):
        raise ValueError("data.corrupt_train / data.eval_corruptions apply to image datasets only")


def is_text(config: ml_collections.ConfigDict) -> bool:
    return config.data.name in ("shakespeare_char", "char_file")
