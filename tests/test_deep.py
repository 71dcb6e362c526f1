"""Deep DeepNorm stacks keep learning: the guard against the collapse of issue 10.

A 1000-layer DeepNorm ViT used to collapse to an input-independent output within ~100 steps at lr 1e-3:
every block's two LayerNorms sit on the main path, so Adam's ~lr-sized steps on their 2L gains and biases
move the output by ~2L lr per step (experiments/results/deep/README.md). `ModelConfig.ln_lr="depth"` scales
those updates by 1 / (2L) (`jaxsmooth.train.optim.lr_scales`). These tests check that factor exactly, and that
a narrow 400-layer stack trained at the packaged learning rate keeps its [CLS] output input-dependent
(without the factor, the [CLS] features are the same for every image by step 30).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxsmooth import ModelConfig, Spectrum, train
from jaxsmooth.data import load_digits
from jaxsmooth.nnx import ViT
from jaxsmooth.train import optim
from jaxsmooth.train.state import new_state

# jaxsmooth/configs/deep1000.py's optimiser (lr 1e-3, clip 1, AdamW wd 0.05), with a 5-step warmup so the
# packaged
# peak learning rate is reached within the test's few dozen steps.
OPT = dict(lr=1e-3, warmup_steps=5, schedule="constant", decay_steps=100, end_lr_fraction=1.0,
           weight_decay=0.05, clip_norm=1.0, b1=0.9, b2=0.999, eps=1e-8)  # fmt: skip


def _vit(depth, *, ln_lr="depth", spectrum=None, residual="deepnorm", width=8, abstract=False):
    mcfg = ModelConfig(depth=depth, d_model=width, num_heads=2, mlp_ratio=2.0, spectrum=spectrum,
                       residual=residual, ln_lr=ln_lr)  # fmt: skip
    ds = load_digits()
    build = lambda: ViT(mcfg, ds.num_classes, ds.image_shape, 4, rngs=nnx.Rngs(params=0))
    return ds, nnx.eval_shape(build) if abstract else build()


def _one_update(model, ds, opt=OPT, steps=2):
    """The optimiser's update at step `steps` (earlier steps give every parameter a gradient: the zero-
    initialised head leaves the others without one at step 0)."""
    graphdef, pstate, _ = nnx.split(model, nnx.Param, ...)
    tx = optim.make_optimizer(opt, pstate)
    params = nnx.to_pure_dict(pstate)
    state = tx.init(params)
    x, y = ds.x_train[:16], ds.y_train[:16]
    loss = lambda p: jnp.mean(train.per_example_loss(nnx.merge(graphdef, p)(x), y))

    @jax.jit
    def run(params, state):
        for _ in range(steps):
            updates, state = tx.update(jax.grad(loss)(params), state, params)
            params = optax.apply_updates(params, updates)
        return updates

    return run(params, state)


def test_deepnorm_layernorms_learn_at_lr_over_2L():
    depth = 3
    ds, model = _vit(depth)
    blocks = model.transformer.blocks
    for ln in (blocks.ln1, blocks.ln2):
        assert ln.gain.get_metadata()["lr_scale"] == ln.bias.get_metadata()["lr_scale"] == 1 / (2 * depth)
    scaled = _one_update(model, ds)
    plain = _one_update(_vit(depth, ln_lr="none")[1], ds)
    # Same gradients and Adam moments; only the LayerNorm updates are multiplied, by exactly 1 / (2L).
    flat_s = dict(jax.tree_util.tree_flatten_with_path(scaled)[0])
    flat_p = dict(jax.tree_util.tree_flatten_with_path(plain)[0])
    n_ln = 0
    for path, u in flat_s.items():
        keys = [getattr(k, "key", None) for k in path]
        is_ln = ("ln1" in keys or "ln2" in keys) and keys[-1] in ("gain", "bias")
        want = flat_p[path] / (2 * depth) if is_ln else flat_p[path]
        np.testing.assert_allclose(u, want, rtol=1e-5, atol=1e-12, err_msg=str(keys))
        n_ln += is_ln
    assert n_ln == 4


@pytest.mark.parametrize("residual", ["pre_ln", "post_ln"])
def test_other_residuals_keep_plain_layernorm_updates(residual):
    """Only DeepNorm scales its LayerNorms; the others' optimiser (and its state layout) is unchanged."""
    _, model = _vit(2, residual=residual, abstract=True)
    pstate = nnx.split(model, nnx.Param, ...)[1]
    assert set(jax.tree.leaves(optim.lr_scales(pstate))) == {1.0}
    opt_state = jax.eval_shape(optim.make_optimizer(OPT, pstate).init, nnx.to_pure_dict(pstate))
    assert len(opt_state) == 2  # clip, adamw: no scaling stage


def test_narrow_400_layer_stack_stays_input_dependent_at_the_packaged_lr():
    """The collapse itself: 30 AdamW steps at lr 1e-3 on digits. Measured without the 1 / (2L) factor:
    the [CLS] features' spread over 32 test images is 2e-5 of their size (0.02 at init) and the last
    layer's token cosine 1.000; with it, 0.18 and 0.16. (A loss threshold cannot tell them apart this
    early: after 30 steps both train losses are within 0.02 of ln 10; the collapse shows first as an
    output that no longer depends on the image.)"""
    ds, model = _vit(400)
    graphdef, pstate, _ = nnx.split(model, nnx.Param, ...)
    tx = optim.make_optimizer(OPT, pstate)
    state = new_state(nnx.to_pure_dict(pstate), tx, seed=0)
    step = jax.jit(train.make_train_step(graphdef, tx, optim.make_schedule(OPT), dropout=False,
                                         with_stats=False, spectral=False), donate_argnums=0)  # fmt: skip
    rng = np.random.default_rng(0)
    for _ in range(30):
        idx = rng.choice(len(ds.y_train), 16, replace=False)
        state, metrics = step(state, ds.x_train[idx], ds.y_train[idx])
    assert int(metrics["bad_step"]) < 0

    m = nnx.merge(graphdef, state["params"])
    out = m.transformer.forward(m.embed(ds.x_test[:32]), stats="logged")
    y_BxTxD, aux = out.hidden, out.stats
    cls_BxD = np.asarray(y_BxTxD[:, 0], np.float64)
    spread = np.mean(np.std(cls_BxD, axis=0)) / np.sqrt(np.mean(cls_BxD**2))
    cosine = float(aux["token_cosine"][-1])
    assert spread > 0.05 and cosine < 0.9, (
        f"the 400-layer stack's output collapsed: [CLS] spread over images {spread:.3g}, last-layer token "
        f"cosine {cosine:.3f}"
    )


def test_spectral_deepnorm_layernorms_are_scaled_too():
    _, model = _vit(4, spectrum=Spectrum("sharpen"), abstract=True)
    pstate = nnx.split(model, nnx.Param, ...)[1]
    scales = optim.lr_scales(pstate)["transformer"]["blocks"]
    assert {scales[ln][k] for ln in ("ln1", "ln2") for k in ("gain", "bias")} == {1 / 8}
    assert scales["attn"]["psi"] == scales["mlp"]["w1"] == 1.0
