"""The optimiser of config.opt: the weight-decay mask selects exactly the matrices, decay really happens on
them (and nowhere else), and the schedule has the stated shape."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from jaxsmooth.config import ModelConfig, Spectrum
from jaxsmooth.nnx import CausalLM, ViT
from jaxsmooth.train.optim import make_optimizer, make_schedule, weight_decay_mask


def _opt(**kw):
    base = dict(lr=1e-2, warmup_steps=0, schedule="constant", decay_steps=10, end_lr_fraction=0.0,
                weight_decay=0.1, clip_norm=1.0, b1=0.9, b2=0.999, eps=1e-8)  # fmt: skip
    return ml_collections.ConfigDict({**base, **kw})


def _decayed(params_state) -> set[str]:
    flat = jax.tree_util.tree_flatten_with_path(weight_decay_mask(params_state))[0]
    return {"/".join(k.key for k in path) for path, on in flat if on}


def test_mask_spectral_vit_general_basis_featscale():
    cfg = ModelConfig(depth=2, d_model=8, num_heads=2, spectrum=Spectrum(mode="smooth", basis="general"),
                      branch_scale="featscale", ln_gain="positive")  # fmt: skip
    model = nnx.eval_shape(lambda: ViT(cfg, 10, (8, 8, 1), 4, rngs=nnx.Rngs(0)))  # abstract: types suffice
    _, params, _ = nnx.split(model, nnx.Param, ...)
    # Decayed like the matrices they replace: the basis matrices theta, theta_w and (clip bound) psi.
    # Not decayed: theta_s (a vector), LN gains, FeatScale, biases, pos, cls.
    assert _decayed(params) == {
        "patch_w", "head_w",
        "transformer/blocks/attn/w_q", "transformer/blocks/attn/w_k",
        "transformer/blocks/attn/theta", "transformer/blocks/attn/theta_w", "transformer/blocks/attn/psi",
        "transformer/blocks/mlp/w1", "transformer/blocks/mlp/w2",
    }  # fmt: skip
    # With the sigmoid bound psi = 0 is the middle of the interval, not lambda = 0: psi is not decayed.
    cfg = ModelConfig(depth=2, d_model=8, num_heads=2, spectrum=Spectrum(mode="smooth", bound="smooth"))
    model = nnx.eval_shape(lambda: ViT(cfg, 10, (8, 8, 1), 4, rngs=nnx.Rngs(0)))
    assert "transformer/blocks/attn/psi" not in _decayed(nnx.split(model, nnx.Param, ...)[1])


def test_mask_selects_by_type_and_shape_not_attribute_names():
    """A user's own model: a layer stack under any attribute name (built by nnx.vmap with the "layers"
    partition name, as jaxsmooth's Transformer is) and plain Flax layers without sharding names."""
    from jaxsmooth.nnx import SpectralAttention

    class UserModel(nnx.Module):
        def __init__(self, rngs):
            @nnx.split_rngs(splits=3)
            @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
            def make(r):
                return SpectralAttention(2, 8, spectrum=Spectrum(), rngs=r)

            self.my_stack = make(rngs)
            self.proj = nnx.Linear(8, 8, rngs=rngs)  # Flax's own layer: kernel [8, 8], bias [8]
            self.norm = nnx.LayerNorm(8, rngs=rngs)

    params = nnx.split(nnx.eval_shape(lambda: UserModel(nnx.Rngs(0))), nnx.Param, ...)[1]
    assert _decayed(params) == {"my_stack/w_q", "my_stack/w_k", "my_stack/theta", "my_stack/psi",
                                "proj/kernel"}  # fmt: skip


def test_mask_baseline_lm():
    cfg = ModelConfig(depth=3, d_model=8, num_heads=2, spectrum=None, branch_scale="attnscale")
    model = nnx.eval_shape(lambda: CausalLM(cfg, vocab_size=11, max_len=16, rngs=nnx.Rngs(0)))
    _, params, _ = nnx.split(model, nnx.Param, ...)
    # The baseline's W_V / W_O are ordinary matrices; the token embedding [V, D] is a matrix too (decayed,
    # as in GPT-2 / nanoGPT), the positional table [1, T, D] is not. (No V/O biases: vo_bias=False.)
    assert _decayed(params) == {
        "tok", "head_w",
        "transformer/blocks/attn/w_q", "transformer/blocks/attn/w_k",
        "transformer/blocks/attn/w_v", "transformer/blocks/attn/w_o",
        "transformer/blocks/mlp/w1", "transformer/blocks/mlp/w2",
    }  # fmt: skip


def test_decay_happens_exactly_on_masked_leaves():
    cfg = ModelConfig(depth=2, d_model=8, num_heads=2, spectrum=Spectrum())
    model = nnx.eval_shape(lambda: ViT(cfg, 10, (8, 8, 1), 4, rngs=nnx.Rngs(0)))
    _, params_state, _ = nnx.split(model, nnx.Param, ...)
    # Every leaf nonzero (and distinct), so "unchanged" is a real check.
    leaves, treedef = jax.tree.flatten(nnx.to_pure_dict(params_state))
    params = jax.tree.unflatten(treedef, [jnp.full(a.shape, 0.5 + i, a.dtype) for i, a in enumerate(leaves)])
    lr, wd = 1e-2, 0.1
    tx = make_optimizer(_opt(lr=lr, weight_decay=wd), params_state)
    zeros = jax.tree.map(jnp.zeros_like, params)  # zero gradients: Adam's update is exactly 0
    step = jax.jit(lambda p: optax.apply_updates(p, tx.update(zeros, tx.init(p), p)[0]))  # one compile
    new = step(params)
    mask = weight_decay_mask(params_state)
    for on, p, q in zip(jax.tree.leaves(mask), jax.tree.leaves(params), jax.tree.leaves(new), strict=True):
        expected = p * (1 - lr * wd) if on else p  # AdamW: p <- p - lr * wd * p
        np.testing.assert_allclose(q, expected, rtol=1e-6)
    assert sum(jax.tree.leaves(mask)) == 8  # w_q, w_k, theta, psi, w1, w2, patch_w, head_w


def test_schedule_shape():
    s = make_schedule(_opt(lr=1.0, warmup_steps=10, schedule="cosine", decay_steps=110, end_lr_fraction=0.1))
    assert float(s(0)) == 0.0
    assert float(s(10)) == pytest.approx(1.0)
    assert float(s(60)) == pytest.approx(0.55, abs=1e-6)  # halfway down the cosine: (1 + 0.1) / 2
    assert float(s(110)) == pytest.approx(0.1)
    c = make_schedule(_opt(lr=2.0, warmup_steps=4, schedule="constant"))
    assert [float(c(i)) for i in (0, 2, 4, 1000)] == [0.0, 1.0, 2.0, 2.0]
    lin = make_schedule(_opt(lr=1.0, warmup_steps=0, schedule="linear", decay_steps=10, end_lr_fraction=0.0))
    assert float(lin(5)) == pytest.approx(0.5)


@pytest.mark.parametrize(
    "field,value",
    [("schedule", "exp"), ("lr", 0.0), ("weight_decay", -1.0), ("b2", 1.0), ("warmup_steps", -1)],
)
def test_bad_opt_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"opt.{field}"):
        make_schedule(_opt(**{field: value}))
