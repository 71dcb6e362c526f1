"""The pure train and eval steps (jitted by the trainer).

`train_step(state, x, y)` is one pure function: forward, loss, gradients, optax update, and metrics
(loss, lr, grad_norm). A static flag `with_stats` compiles a second variant that also returns the
per-layer smoothing statistics of the *same* forward pass (the model's scan emits them as [L] arrays) and
the per-layer eigenvalue range of H = W_V W_O; it runs every `train.stats_every` steps. The dropout key of
step t is fold_in(rng, t), so a resumed run repeats an uninterrupted one bit for bit.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxsmooth.data import augment
from jaxsmooth.train import runlog


def per_example_loss(logits: jax.Array, y: jax.Array) -> jax.Array:
    """Cross-entropy per example [B] (images: logits [B, C]; text: logits [B, T, V], mean over T); y holds
    integer labels, or soft targets with the logits' shape (label smoothing, mixup / cutmix)."""
    if y.shape == logits.shape:
        ce = optax.softmax_cross_entropy(logits, y)
    else:
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)  # [B] or [B, T]
    return ce if ce.ndim == 1 else jnp.mean(ce, axis=1)


def _all_finite(tree) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(a)) for a in jax.tree.leaves(tree)]))


def make_train_step(
    graphdef, tx, schedule, *, dropout: bool, with_stats: bool, spectral: bool,
    aug: augment.Augment | None = None, num_classes: int = 0,
):  # fmt: skip
    """The pure train step (state, x, y) -> (state, metrics); see the module docstring. `aug`: image
    augmentation / label smoothing (jaxsmooth.data.augment), drawn from the run's key and the step."""

    def train_step(state, x, y):
        step = state["step"]
        key = jax.random.fold_in(state["rng"], step) if dropout else None
        if aug is not None and (aug.images or aug.soft):
            # A key of its own (the dropout key is unchanged by turning augmentation on).
            aug_key = jax.random.fold_in(jax.random.fold_in(state["rng"], step), 0x5A17)
            x, y = augment.apply(aug, aug_key, x, y, num_classes)

        def loss_fn(params):
            model = nnx.merge(graphdef, params)
            # rngs=key (None without dropout: deterministic); the stack splits it into per-layer keys.
            out = model.forward(x, stats="logged" if with_stats else "none", rngs=key)
            return jnp.mean(per_example_loss(out.logits, y)), out.stats

        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & _all_finite(params)
        # Remember the first bad step (1-based, like the logged steps); a later log or checkpoint stops.
        bad_step = jnp.where((state["bad_step"] < 0) & ~ok, step + 1, state["bad_step"])
        metrics = {"loss": loss, "lr": schedule(step), "grad_norm": grad_norm, "bad_step": bad_step}
        if with_stats:
            metrics["layers"] = {k: aux[k] for k in runlog.LOGGED_LAYER_STATS}  # [L] each
            metrics["input"] = {k: aux["input"][k] for k in runlog.LOGGED_LAYER_STATS}  # scalars
            # Spectra of the parameters this forward pass used (before the update): of H, and of the
            # effective map the block applies (docs/theory.md), exact where known, else on the host.
            stack = nnx.merge(graphdef, state["params"]).transformer
            if spectral:
                lam_LxD = stack.eigenvalues()  # exact, real
                metrics["eig_min"], metrics["eig_max"] = jnp.min(lam_LxD, axis=1), jnp.max(lam_LxD, axis=1)
            else:  # unconstrained H has complex eigenvalues: XLA has no general eig; the host computes them
                metrics["h_LxDxD"] = stack.effective_h()
            eff_LxD = stack.exact_effective_eigenvalues()
            if eff_LxD is not None:
                metrics["eff"] = runlog.eff_summary(eff_LxD, jnp)
            else:
                metrics["m_LxDxD"] = stack.effective_update()
        new_state = dict(state, params=params, opt_state=opt_state, step=step + 1, bad_step=bad_step)
        return new_state, metrics

    return train_step


def make_eval_step(graphdef):
    """(params, x, y, n_valid) -> (sum of per-example losses, number correct) over the first n_valid rows."""

    def eval_step(params, x, y, n_valid):
        logits = nnx.merge(graphdef, params)(x, deterministic=True)
        valid_B = jnp.arange(x.shape[0]) < n_valid
        loss_sum = jnp.sum(jnp.where(valid_B, per_example_loss(logits, y), 0.0))
        if logits.ndim == 2:
            correct = jnp.sum(jnp.where(valid_B, jnp.argmax(logits, axis=-1) == y, False))
        else:
            correct = jnp.zeros((), jnp.int32)
        return loss_sum, correct

    return eval_step
