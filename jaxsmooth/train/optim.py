"""The optimiser: one function of `config.opt`.

    tx = chain(clip_by_global_norm(clip_norm),
               adamw(schedule, b1, b2, eps, weight_decay, mask=<precomputed bool tree>),
               [scale each update by its variable's `lr_scale` metadata, where any variable has one])

Per-variable learning-rate factors come from the model: a variable created with `lr_scale=f` metadata has
its update (Adam step and decay alike) multiplied by f. DeepNorm stacks give their main-path LayerNorm gains
and biases f = 1 / (2 depth), which keeps a 1000-layer stack from collapsing (`ModelConfig.ln_lr`).

Weight decay is decoupled (AdamW: p <- p - lr * (adam_update + wd * p)) and applies to *matrices*: the
parameters whose logical rank is 2 (their sharding names without the stacked "layers" axis; the array's
rank for variables that carry no names): W_Q, W_K, the baseline's W_V / W_O, both MLP matrices, the patch /
token embedding, the head, and the spectral basis theta. A variable's `weight_decay` metadata overrides the
rule. The choices for the spectral parameters treat them like the matrices they replace, so the
comparison with the baseline is fair (docs/design.md, "Matched learning dynamics"):
  - EigBasis (theta) is decayed like W_V: V = Q of QR(theta) does not depend on theta's scale, but the
    scale sets how far one Adam step turns V, so theta follows the same norm trajectory as the baseline's
    W_V when both are decayed alike;
  - EigVals (psi) carry `weight_decay=True` with the clip bound: decaying psi pulls lambda towards 0 at
    (1 - lr wd)^2 per step for lambda = +-(c psi)^2 (neutral, free: c^2 psi |psi|), as decaying W_V and
    W_O pulls H = W_V W_O towards 0;
    with the sigmoid bound psi = 0 is the middle of the interval, not 0, so they are not decayed.
Never decayed: LNGain, BranchScale, biases and other vectors (their scale is meaningful: LN gain signs set
smoothing, docs/theory.md), positional embeddings and the [CLS] token ([1, T, D] / [1, 1, D]: not maps
between features, and decaying them only erases position information early in training).
The mask is a precomputed *tree* of bools, not a function: a mask function inside
`optax.inject_hyperparams` is silently treated as a hyperparameter and disables decay.

Params here are the pure-dict form (`nnx.to_pure_dict`) of `nnx.split(model, nnx.Param, ...)[1]`
(nested dicts of arrays), the form the trainer keeps and checkpoints; the mask is built from the typed
`nnx.State` and has that form.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxsmooth.nnx.variables import BranchScale, LNGain

SCHEDULES = ("cosine", "linear", "constant")
# Variable types never decayed, whatever their shape (see the module docstring for why).
NO_DECAY_TYPES = (LNGain, BranchScale)
# The logical axis name nnx.vmap adds to the variables of a layer stack (jaxsmooth.nnx.Transformer builds
# its blocks with transform_metadata={nnx.PARTITION_NAME: STACK_AXIS}); it does not count in the rank.
STACK_AXIS = "layers"


def _fields(opt: Any) -> Any:
    """The opt section with attribute access: OptSettings and ConfigDict as they are, a plain dict wrapped."""
    return types.SimpleNamespace(**opt) if isinstance(opt, dict) else opt


def make_schedule(opt: Any) -> Callable[[jnp.ndarray], jnp.ndarray]:
    """Learning rate as a function of the optimiser step: linear warmup from 0, then the decay.

    Args:
      opt: the opt section (`settings.opt`, `config.opt` or a dict with the same fields).
        opt.schedule: "cosine" (to end_lr_fraction * lr at decay_steps), "linear" (same end point),
        "constant" (lr after warmup). decay_steps counts from step 0, warmup included (optax convention).
    Returns:
      step -> learning rate.
    Raises:
      ValueError naming a bad opt field.
    """
    opt = _fields(opt)
    _check_opt(opt)
    lr, warmup, total = float(opt.lr), int(opt.warmup_steps), int(opt.decay_steps)
    end = lr * float(opt.end_lr_fraction)
    if opt.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(total, warmup + 1), end_value=end)
    warm = optax.linear_schedule(0.0, lr, max(warmup, 1))
    rest = (
        optax.linear_schedule(lr, end, max(total - warmup, 1))
        if opt.schedule == "linear"
        else optax.constant_schedule(lr)
    )
    return optax.join_schedules([warm, rest], [warmup])


def decays(variable: nnx.Variable) -> bool:
    """Whether weight decay applies to one variable: by its `weight_decay` metadata if it has one, else
    by type and logical rank (see the module docstring)."""
    meta = variable.get_metadata()
    if "weight_decay" in meta:
        return bool(meta["weight_decay"])
    if isinstance(variable, NO_DECAY_TYPES) or not isinstance(variable, nnx.Param):
        return False
    names = meta.get("out_sharding")
    if names:  # logical axes, e.g. ("layers", "embed", "heads"): a matrix of a layer stack
        return sum(n != STACK_AXIS for n in names) == 2
    # get_value(), not v[...]: the mask is also built from abstract (ShapeDtypeStruct) params.
    return variable.get_value().ndim == 2


def weight_decay_mask(params: nnx.State) -> dict:
    """Bool tree (pure dict, same structure as nnx.to_pure_dict(params)): True where weight decay applies."""
    flat = [(path, decays(v)) for path, v in nnx.to_flat_state(params)]
    return nnx.to_pure_dict(nnx.from_flat_state(flat))


def make_optimizer(opt: Any, params: nnx.State) -> optax.GradientTransformation:
    """chain(clip_by_global_norm, adamw(schedule, mask=weight_decay_mask(params))) from config.opt.

    `params` (the typed nnx.State of the model's nnx.Param variables) only decides the mask; the returned
    transformation acts on `nnx.to_pure_dict(params)`-shaped trees.
    """
    opt = _fields(opt)
    _check_opt(opt)
    stages = [
        optax.clip_by_global_norm(float(opt.clip_norm)),
        optax.adamw(
            make_schedule(opt),
            b1=float(opt.b1),
            b2=float(opt.b2),
            eps=float(opt.eps),
            weight_decay=float(opt.weight_decay),
            mask=weight_decay_mask(params),
        ),
    ]
    scales = lr_scales(params)
    if any(f != 1.0 for f in jax.tree.leaves(scales)):  # else the state layout is the plain chain's
        stages.append(scale_by_tree(scales))
    return optax.chain(*stages)


def lr_scales(params: nnx.State) -> dict:
    """Float tree (pure dict, like weight_decay_mask): each variable's `lr_scale` metadata, 1.0 if none.
    A factor f multiplies that variable's whole update (Adam step and decay alike): a learning rate f lr."""
    flat = [(path, float(v.get_metadata().get("lr_scale", 1.0))) for path, v in nnx.to_flat_state(params)]
    return nnx.to_pure_dict(nnx.from_flat_state(flat))


def scale_by_tree(factors) -> optax.GradientTransformation:
    """Multiply each update leaf by the matching leaf of `factors` (stateless)."""

    def update(updates, state, params=None):
        del params
        return jax.tree.map(lambda u, f: u * jnp.asarray(f, u.dtype), updates, factors), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def _check_opt(opt: Any) -> None:
    """Fail with the field name on values that would train silently wrong."""
    if opt.schedule not in SCHEDULES:
        raise ValueError(
            f"opt.schedule={opt.schedule!r} is not allowed; choose one of {', '.join(SCHEDULES)}"
        )
    checks = [
        ("lr", opt.lr > 0, "must be > 0"),
        ("warmup_steps", opt.warmup_steps >= 0, "must be >= 0"),
        ("decay_steps", opt.decay_steps >= 1, "must be >= 1"),
        ("end_lr_fraction", 0 <= opt.end_lr_fraction <= 1, "must be in [0, 1]"),
        ("weight_decay", opt.weight_decay >= 0, "must be >= 0"),
        ("clip_norm", opt.clip_norm > 0, "must be > 0"),
        ("b1", 0 <= opt.b1 < 1, "must be in [0, 1)"),
        ("b2", 0 <= opt.b2 < 1, "must be in [0, 1)"),
        ("eps", opt.eps > 0, "must be > 0"),
    ]
    for name, ok, why in checks:
        if not ok:
            raise ValueError(f"opt.{name}={getattr(opt, name)!r} {why}")
