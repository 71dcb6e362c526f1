"""What the packaged configs share: the parsing of their `arg` and one builder per config section, each
field set (and commented) once here. A config file states only what differs: its sizes, data and schedule.

    def get_config(arg=None):
        args = common.parse_args(arg, {"quick": False, "mode": "sharpen", "depth": int})
        quick = args["quick"]
        train = common.train(quick, steps=20 if quick else 5000, ...)
        return common.config(
            "name", quick,
            model=common.model(depth=..., d_model=..., num_heads=..., spectrum=common.spectrum(args["mode"])),
            data=common.data("name", {...loader kwargs}, batch_size=...), train=train,
            opt=common.opt(train, warmup_steps=...),
        )

The leading underscore keeps this module out of the config names `jaxsmooth train` lists. Configs import
it as `jaxsmooth.configs._common`, also when ml_collections.config_flags loads a config by file path (so a
copy of a config kept anywhere still works).
Every field stays a plain value, or a typed placeholder (`config_dict.placeholder`) where it is unset, so
`--config.<section>.<field>=value` overrides work for all of them.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

import ml_collections
from ml_collections import config_dict


def parse_args(arg: str | None, known: dict[str, Any]) -> dict[str, Any]:
    """`quick,mode=smooth,depth=12` -> {"quick": True, "mode": "smooth", "depth": 12}.

    `known` maps each accepted arg to its default, whose type converts the given value, or to a bare type
    for an arg without a fixed default (it is then absent from the result unless given, for
    `args.get("depth", 2 if quick else 12)`). A bool default (or `bool`) makes a flag: `quick` alone means
    True (`quick=0` False). Unknown args and values of the wrong type raise ValueError naming them.
    """
    given = dict(kv.split("=", 1) if "=" in kv else (kv, None) for kv in (arg or "").split(",") if kv)
    unknown = set(given) - set(known)
    if unknown:
        listing = ", ".join(k if _is_flag(v) else f"{k}=..." for k, v in known.items())
        raise ValueError(f"unknown config args {sorted(unknown)}; known: {listing}")
    out = {k: v for k, v in known.items() if not isinstance(v, type)}
    for key, text in given.items():
        spec = known[key]
        kind = spec if isinstance(spec, type) else type(spec)
        if text is None and not _is_flag(spec):
            raise ValueError(f"config arg {key} needs a value: {key}=...")
        try:
            out[key] = _flag(text) if _is_flag(spec) else kind(text)
        except ValueError:
            raise ValueError(f"config arg {key}={text!r}: expected {kind.__name__}") from None
    return out


def sibling(name: str) -> ModuleType:
    """Another packaged config, e.g. cifar100 reuses cifar10's recipe."""
    return importlib.import_module(f"jaxsmooth.configs.{name}")


def _is_flag(spec: Any) -> bool:
    return spec is bool or isinstance(spec, bool)


def _flag(text: str | None) -> bool:
    if text is None or text.lower() in ("1", "true", "yes"):
        return True
    if text.lower() in ("0", "false", "no"):
        return False
    raise ValueError(text)


def _unset(value: Any, kind: type) -> Any:
    """`value`, or a typed placeholder (None, settable from the command line) when value is None."""
    return config_dict.placeholder(kind) if value is None else value


def _override(c: ml_collections.ConfigDict, overrides: dict[str, Any], section: str):
    """Set existing fields of a section; a misspelt field fails here rather than in the trainer."""
    for key, value in overrides.items():
        if key not in c:
            raise TypeError(f"config section {section} has no field {key!r}; fields: {', '.join(c)}")
        c[key] = value
    return c


def config(
    name: str,
    quick: bool,
    *,
    model: ml_collections.ConfigDict,
    data: ml_collections.ConfigDict,
    train: ml_collections.ConfigDict,
    opt: ml_collections.ConfigDict,
) -> ml_collections.ConfigDict:
    """The whole run config from its sections (the `train` section is the one `opt` was built with)."""
    c = ml_collections.ConfigDict()
    c.name = name + ("_quick" if quick else "")  # run name: default workdir is ./runs/<name>
    c.model = model  # jaxsmooth.ModelConfig fields (model(), below)
    c.data = data  # dataset, batching (jaxsmooth.data; data(), below)
    c.train = train  # loop, logging, checkpoints (jaxsmooth.train; train(), below)
    c.opt = opt  # optimiser (jaxsmooth.train.optim.make_optimizer; opt(), below)
    return c


def model(
    *,
    depth: int,
    d_model: int,
    num_heads: int,
    spectrum: ml_collections.ConfigDict,
    remat_group: int | None = None,
    **overrides: Any,
) -> ml_collections.ConfigDict:
    """jaxsmooth.ModelConfig fields; `overrides` replace the defaults below."""
    c = ml_collections.ConfigDict()
    c.depth = depth  # number of transformer blocks L
    c.d_model = d_model  # width D
    c.num_heads = num_heads  # attention heads; must divide d_model
    c.mlp_ratio = 4.0  # MLP hidden width = mlp_ratio * d_model
    c.spectrum = spectrum  # constraint on the eigenvalues of H = W_V W_O (spectrum(), below)
    c.residual = "pre_ln"  # pre_ln | post_ln | deepnorm
    c.deepnorm_arch = "encoder"  # which DeepNet formula sets alpha, beta (encoder | decoder)
    c.ln_gain = "free"  # free | positive (softplus gain > 0)
    c.value_norm = "rms"  # pre_ln: the value path reads x / rms(x) (rms: the promise holds) or LN1(x) (ln)
    c.remat = "none"  # none | full | nested (activation memory vs recompute)
    c.remat_group = _unset(remat_group, int)  # remat=nested: layers per group (None: sqrt(L))
    c.scan = True  # scan over layers (False: unrolled loop, a test oracle)
    c.dropout = 0.0  # dropout on attention probabilities and branch outputs
    c.drop_path = 0.0  # stochastic depth: branch dropped per example w.p. drop_path * l / (depth - 1)
    c.dtype = "float32"  # compute dtype (params stay float32)
    c.qkv_bias = True  # biases on the Q and K projections
    c.vo_bias = False  # biases on the V and O projections (a DC term outside the spectral constraint)
    c.branch_scale = "none"  # none | attnscale | featscale (Wang et al. 2022 baselines)
    c.ln_eps = 1e-6  # LayerNorm epsilon
    c.ln_lr = "depth"  # deepnorm: the blocks' LayerNorms learn at lr / (2 depth) (none: at lr)
    return _override(c, overrides, "model")


def spectrum(
    mode: str, *, lo: float | None = None, hi: float | None = None, **overrides: Any
) -> ml_collections.ConfigDict:
    """model.spectrum: the interval the eigenvalues of each layer's H = W_V W_O are held in."""
    c = ml_collections.ConfigDict()
    c.mode = mode  # sharpen|smooth|neutral|free, or none = baseline (no constraint)
    c.basis = "orthogonal"  # orthogonal (symmetric H, the paper) | general (cond <= max_cond)
    c.bound = "clip"  # clip (the paper) | smooth (sigmoid map, never saturates)
    c.lo = _unset(lo, float)  # lower end of the interval (None: mode default)
    c.hi = _unset(hi, float)  # upper end of the interval (None: mode default)
    c.max_cond = 10.0  # basis=general: bound on the condition number of V
    c.margin = 1e-6  # keeps open interval ends open, as a fraction of hi - lo
    c.init = "matched"  # initial eigenvalues: matched (the baseline's |Re eig|) | uniform (over the interval)
    c.init_scale = 0.5  # multiplies the initial eigenvalues (0.5: a deep smooth stack starts uncollapsed)
    c.param_scale = "width"  # width: parameters at the baseline's entry scale | unit: the paper's
    return _override(c, overrides, "model.spectrum")


def data(
    name: str,
    kwargs: dict[str, Any],
    *,
    batch_size: int,
    patch_size: int | None = None,
    seq_len: int | None = None,
    **overrides: Any,
) -> ml_collections.ConfigDict:
    """Dataset and batching (jaxsmooth.data): images set patch_size, text sets seq_len."""
    c = ml_collections.ConfigDict()
    c.name = name  # dataset (jaxsmooth.data.DATASETS)
    c.kwargs = ml_collections.ConfigDict(kwargs)  # loader arguments (see the dataset's loader)
    c.train_fraction = 1.0  # keep this fraction of the training split (data-efficiency studies)
    c.batch_size = batch_size  # global batch (images or text windows), split over the devices
    c.eval_batch_size = 256  # test batches (padded, masked)
    c.seed = 0  # data order (text: window offsets) and the train_fraction subset
    c.val_size = 0  # training items held out as the validation split (text: characters); 0 = none
    c.corrupt_train = "none"  # images: "NAME:SEVERITY" corrupts the training and validation images
    c.random_crop_pad = 0  # images: random shift by up to this many pixels (pad and crop; 0 = none)
    c.random_flip = False  # images: random horizontal flips
    c.mixup_alpha = 0.0  # images: mixup's Beta(a, a) (0 = none); with cutmix, one of the two per batch
    c.cutmix_alpha = 0.0  # images: cutmix's Beta(a, a) (0 = none)
    c.eval_corruptions = ""  # images: "NAME:SEVERITY,..." corrupted test sets of the final evaluation
    c.patch_size = _unset(patch_size, int)  # images: side of the square patches (None for text)
    c.seq_len = _unset(seq_len, int)  # text: context length T in tokens (None for images)
    return _override(c, overrides, "data")


def train(quick: bool, *, steps: int, **overrides: Any) -> ml_collections.ConfigDict:
    """The loop, logging and checkpoints (jaxsmooth.train). `quick` (a CPU smoke test) logs more often,
    evaluates on at most 2 test batches, and takes the statistics, an evaluation and a checkpoint once,
    at the end; a full run's intervals are usually set by the config."""
    c = ml_collections.ConfigDict()
    c.steps = steps  # optimiser steps
    c.log_every = 10 if quick else 100  # steps between metrics.jsonl records
    c.stats_every = steps if quick else 500  # steps between per-layer statistics (same forward pass)
    c.eval_every = steps if quick else 1000  # steps between test-set evaluations
    c.eval_max_batches = 2 if quick else 0  # periodic evals on at most this many test batches (0 = all)
    c.checkpoint_every = steps if quick else 1000  # steps between checkpoints (and one at the end)
    c.max_to_keep = 3  # checkpoints kept (>= 2 lets a corrupt latest one fall back)
    c.seed = 0  # parameter init and dropout
    c.num_devices = 0  # data-parallel devices (0 = all)
    c.select = "last"  # parameters the final test uses: last | best_val (best validation metric)
    c.train_eval_size = 0  # training items evaluated at the end (train accuracy / loss); 0 = none
    c.test_max_examples = 0  # test items in the final evaluation (0 = all)
    c.profile = False  # per-layer smoothing profile (eval mode, held-out data) at init and at the end
    c.label_smoothing = 0.0  # cross-entropy targets 1 - s + s / C on the label, s / C elsewhere
    c.on_nonfinite = "stop"  # stop (an error) | record (summary.json marks the run as diverged)
    c.tensorboard = True  # also write TensorBoard event files to DIR/tensorboard (when tensorboardX is there)
    c.model_parallel = 1  # devices along the mesh's "model" axis (> 1: a 2-D ("data", "model") mesh)
    c.param_sharding = "replicated"  # replicated / tensor_parallel / fsdp / fsdp_tp (parallel.RULES)
    # Step watchdog (jaxsmooth.train.watchdog): no step done in this many seconds -> stacks, exit 124.
    c.step_timeout_s = -1.0  # -1 = scaled to the step time (max(300 s, 100x the median)); 0 = off
    return _override(c, overrides, "train")


def opt(
    train: ml_collections.ConfigDict, *, warmup_steps: int, **overrides: Any
) -> ml_collections.ConfigDict:
    """The optimiser (jaxsmooth.train.optim.make_optimizer); its schedule follows `train.steps`, also when
    that is
    overridden (`--config.train.steps=200`)."""
    c = ml_collections.ConfigDict()
    c.lr = 1e-3  # peak learning rate
    c.warmup_steps = warmup_steps  # linear warmup from 0
    c.schedule = "cosine"  # cosine | linear | constant (after warmup)
    c.decay_steps = train.get_ref("steps")  # schedule length: follows train.steps
    c.end_lr_fraction = 0.01  # final lr = end_lr_fraction * lr
    c.weight_decay = 0.05  # AdamW decoupled decay, on matrices only (jaxsmooth.train.optim)
    c.clip_norm = 1.0  # global gradient-norm clip
    c.b1 = 0.9  # Adam beta1
    c.b2 = 0.999  # Adam beta2
    c.eps = 1e-8  # Adam epsilon
    return _override(c, overrides, "opt")
