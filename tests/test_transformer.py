"""The stack: scanned == unrolled, every remat mode == no remat (values and gradients), compile size does
not grow with depth, a 1000-layer DeepNorm spectral stack trains a step, per-layer stats come out of the
scan, the task models respect causality, and every model has one calling convention (`model(x)` -> logits,
`model.forward(x, ...)` -> one typed output; dropout by `deterministic` / `rngs` as `nnx.Dropout`)."""

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxsmooth import ModelConfig, Spectrum, metrics
from jaxsmooth.nnx import CausalLM, LayerInputs, ModelOutput, StackOutput, Transformer, ViT

SHARPEN = Spectrum("sharpen")
GENERAL = Spectrum("neutral", basis="general", bound="smooth")


def _cfg(**kw):
    return ModelConfig(**{"depth": 5, "d_model": 16, "num_heads": 2, "mlp_ratio": 2.0, **kw})


def _loss_and_grad(cfg, x, key=None):
    model = Transformer(cfg, rngs=nnx.Rngs(0))

    @nnx.jit
    def f(m, x, key):
        return nnx.value_and_grad(lambda m: jnp.mean(jnp.square(m(x, rngs=key) - 0.5)))(m)

    return f(model, x, key)


def _assert_trees_close(a, b, rtol, atol):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


@pytest.mark.parametrize(
    "spectrum, residual, dropout, drop_path",
    [(None, "pre_ln", 0.1, 0.0), (SHARPEN, "deepnorm", 0.0, 0.0), (GENERAL, "post_ln", 0.0, 0.0),
     (SHARPEN, "pre_ln", 0.1, 0.6)],
    ids=["baseline-pre_ln-dropout", "sharpen-deepnorm", "general-post_ln", "sharpen-pre_ln-drop_path"],
)  # fmt: skip
def test_scanned_equals_unrolled_and_remat_equals_none(spectrum, residual, dropout, drop_path):
    # depth 3 with the default nested group round(sqrt(3)) = 2 also runs the remainder path (1 group + 1).
    # With dropout (and stochastic depth), the per-layer keys and rates must ride the scan identically in
    # every mode.
    x = jax.random.normal(jax.random.key(1), (8, 7, 16))
    key = jax.random.key(7) if dropout or drop_path else None
    cfg = lambda **v: _cfg(
        depth=3, spectrum=spectrum, residual=residual, dropout=dropout, drop_path=drop_path, **v
    )
    ref_loss, ref_grad = _loss_and_grad(cfg(), x, key)
    for v in (dict(scan=False), dict(remat="full"), dict(remat="nested")):
        loss, grad = _loss_and_grad(cfg(**v), x, key)
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, err_msg=str(v))
        _assert_trees_close(grad, ref_grad, rtol=2e-3, atol=2e-6)


def _hlo_lines(depth, remat):
    cfg = _cfg(depth=depth, spectrum=SHARPEN, remat=remat)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)

    def loss(p, x):
        return jnp.sum(nnx.merge(graphdef, p)(x))

    x = jnp.ones((2, 4, 16))
    text = jax.jit(jax.grad(loss)).lower(params, x).as_text()
    return len(text.splitlines())


@pytest.mark.parametrize("remat", ["none", "full", "nested"])
def test_compile_size_independent_of_depth(remat):
    # depth 4 and 64: nested groups of 2 and 8 with no remainder, so the programs have the same shape.
    assert _hlo_lines(4, remat) == _hlo_lines(64, remat)


def test_1000_layer_deepnorm_spectral_stack_takes_a_gradient():
    cfg = ModelConfig(
        depth=1000,
        d_model=32,
        num_heads=2,
        mlp_ratio=2.0,
        spectrum=SHARPEN,
        residual="deepnorm",
        remat="nested",
    )
    t0 = time.perf_counter()
    model = nnx.jit(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))()
    x = jax.random.normal(jax.random.key(1), (2, 8, 32))

    @nnx.jit
    def step(m, x):
        return nnx.value_and_grad(lambda m: jnp.mean(jnp.square(m(x) - x)))(m)

    loss, grads = step(model, x)
    jax.block_until_ready(grads)
    elapsed = time.perf_counter() - t0
    assert np.isfinite(float(loss))
    g = nnx.state(grads, nnx.Param)
    assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(g))
    # every layer gets gradient (not just the last few): the eigenvalue gradient is non-zero in each
    psi_grad = np.asarray(grads.blocks.attn.psi[...])
    assert psi_grad.shape == (1000, 32) and np.all(np.abs(psi_grad).sum(1) > 0)
    lam = np.asarray(model.eigenvalues())
    alpha, _ = cfg.alpha_beta
    assert lam.shape == (1000, 32) and np.all(lam < 0) and np.all(lam >= -alpha)
    print(f"1000-layer init + compile + fwd/bwd: {elapsed:.1f}s")


def test_per_layer_stats_come_out_of_the_scan():
    cfg = _cfg(depth=4, spectrum=SHARPEN)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (3, 6, 16))
    out = model.forward(x, stats="logged", attention=True)
    np.testing.assert_allclose(out.hidden, model(x), atol=1e-6)  # same forward
    aux = out.stats
    assert set(aux) == {*metrics.LAYER_STAT_KEYS, "input"}
    for k in metrics.LAYER_STAT_KEYS:
        assert aux[k].shape == (4,) and aux["input"][k].shape == ()
    assert out.attention.shape == (4, 2, 6, 6)
    # the scan's numbers are the metrics of the real intermediate activations (unrolled by hand)
    graphdef, state = nnx.split(model.blocks)
    h = x
    for layer in range(4):
        block = nnx.merge(graphdef, jax.tree.map(lambda a, i=layer: a[i], state))
        h, _ = block(h)
        np.testing.assert_allclose(aux["token_cosine"][layer], jnp.mean(metrics.token_cosine(h)), rtol=1e-4)
    np.testing.assert_allclose(aux["input"]["token_cosine"], jnp.mean(metrics.token_cosine(x)), rtol=1e-5)


def test_layer_spectra_and_gains_per_layer():
    model = Transformer(_cfg(depth=3, spectrum=SHARPEN, ln_gain="positive"), rngs=nnx.Rngs(0))
    h = np.asarray(model.effective_h(), np.float64)
    lam = np.asarray(model.eigenvalues())
    for layer in range(3):
        np.testing.assert_allclose(np.sort(np.linalg.eigvalsh(h[layer])), np.sort(lam[layer]), atol=1e-5)
    np.testing.assert_allclose(model.ln_gains(), 1.0, rtol=1e-5)  # softplus(g0) = 1
    base = Transformer(_cfg(depth=3), rngs=nnx.Rngs(0))
    assert base.eigenvalues().shape == (3, 16) and np.iscomplexobj(base.eigenvalues())


def test_positive_ln_gain_stays_positive_under_adversarial_parameters():
    model = Transformer(_cfg(depth=2, ln_gain="positive"), rngs=nnx.Rngs(0))
    model.blocks.ln1.gain[...] = jnp.full((2, 16), -1e4)
    assert np.all(np.asarray(model.ln_gains()[:, 0]) >= 0)


def test_vit_and_causal_lm():
    cfg = _cfg(depth=2, spectrum=SHARPEN)
    vit = ViT(cfg, 10, (8, 8, 1), 4, rngs=nnx.Rngs(0))
    out = vit.forward(jnp.ones((3, 8, 8, 1)), stats="logged")
    assert out.logits.shape == (3, 10) and out.stats["token_cosine"].shape == (2,)
    lm = CausalLM(
        dataclasses.replace(cfg, deepnorm_arch="decoder", residual="deepnorm"), 11, 9, rngs=nnx.Rngs(0)
    )
    ids = jnp.arange(9)[None, :] % 11
    assert lm(ids).shape == (1, 9, 11)

    # causality through the whole model: logits at position t do not depend on tokens after t. A weighted
    # sum: the last op is a unit-gain LayerNorm, whose outputs sum to 0, so a plain sum has gradient ~0.
    def f(emb):
        return (lm.transformer(emb)[0, 3] * jnp.arange(1.0, 17.0)).sum()

    emb = jax.random.normal(jax.random.key(0), (1, 9, 16))
    g = jax.grad(f)(emb)
    assert np.all(np.asarray(g[0, 4:]) == 0) and np.any(np.asarray(g[0, :4]) != 0)
    with pytest.raises(ValueError, match="max_len"):
        lm(jnp.zeros((1, 10), jnp.int32))
    with pytest.raises(ValueError, match="patch_size"):
        ViT(cfg, 10, (8, 8, 1), 3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="expected"):
        vit(jnp.ones((3, 9, 9, 1)))


def test_bf16_compute_keeps_f32_params_and_spectrum():
    cfg = _cfg(depth=3, spectrum=SHARPEN, dtype="bfloat16")
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 7, 16))
    y = model(x)
    assert y.dtype == jnp.bfloat16
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    y32 = Transformer(dataclasses.replace(cfg, dtype="float32"), rngs=nnx.Rngs(0))(x)
    np.testing.assert_allclose(np.asarray(y, np.float32), y32, atol=0.1)  # bf16 has ~3 significant digits


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(d_model=10, num_heads=3), "num_heads"),
        (dict(depth=0), "depth"),
        (dict(residual="postln"), "residual"),
        (dict(remat="sqrt"), "remat"),
        (dict(remat="nested", remat_group=9), "remat_group"),
        (dict(ln_gain="abs"), "ln_gain"),
        (dict(dtype="float64"), "dtype"),
        (dict(dropout=1.0), "dropout"),
        (dict(spectrum="sharpen"), "spectrum"),
    ],
)
def test_bad_model_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"model.{field}"):
        _cfg(**kwargs)


def test_model_config_from_dict():
    cfg = ModelConfig.from_dict(dict(depth=3, d_model=8, num_heads=2, spectrum=dict(mode="smooth", hi=0.5)))
    assert cfg.spectrum == Spectrum("smooth", hi=0.5)
    assert ModelConfig.from_dict(dict(spectrum=dict(mode="none"))).spectrum is None
    with pytest.raises(ValueError, match="unknown model config field"):
        ModelConfig.from_dict(dict(depht=3))
    with pytest.raises(ValueError, match="unknown spectrum field"):
        ModelConfig.from_dict(dict(spectrum=dict(mode="smooth", high=1.0)))
    hash(cfg)  # static argument of jit


def test_stochastic_depth_drops_whole_branches_at_the_linear_rate():
    """drop_path: layer l's branches are dropped for a whole example w.p. drop_path * l / (L - 1); layer 0
    never; evaluation (no key) is deterministic and equals the model without stochastic depth."""
    from jaxsmooth.nnx.transformer import _drop_path

    y = jnp.ones((4000, 3, 2))
    out = np.asarray(_drop_path(y, jnp.float32(0.3), jax.random.key(0)))
    per_example = out.reshape(4000, -1)
    assert np.all((per_example == 0).all(1) | np.isclose(per_example, 1 / 0.7).all(1))  # whole examples
    assert abs((per_example[:, 0] == 0).mean() - 0.3) < 0.03  # 4000 draws: sd 0.007
    x = jax.random.normal(jax.random.key(1), (16, 5, 16))
    plain, dp = (Transformer(_cfg(depth=2, drop_path=r), rngs=nnx.Rngs(0)) for r in (0.0, 0.9))
    np.testing.assert_array_equal(np.asarray(plain(x)), np.asarray(dp(x)))  # eval: no stochastic depth
    # Depth 2: layer 0 at rate 0, layer 1 at 0.9; most examples skip layer 1's branches entirely.
    one = Transformer(_cfg(depth=1), rngs=nnx.Rngs(0))
    nnx.update(one.blocks, jax.tree.map(lambda a: a[:1], nnx.state(dp.blocks)))  # dp's first layer alone
    trained = np.asarray(dp(x, rngs=jax.random.key(3)))
    first = np.asarray(one(x))
    skipped = np.isclose(trained, first, atol=1e-5).reshape(16, -1).all(1)
    assert 10 <= skipped.sum() <= 16  # both branches dropped: p = 0.9^2 = 0.81 per example (mean 13)


def _models(**kw):
    cfg = _cfg(depth=3, spectrum=SHARPEN, **kw)
    lm_cfg = dataclasses.replace(cfg, deepnorm_arch="decoder", residual="deepnorm")
    models = [
        (Transformer(cfg, rngs=nnx.Rngs(0)), jax.random.normal(jax.random.key(1), (2, 5, 16))),
        (ViT(cfg, 10, (8, 8, 1), 4, rngs=nnx.Rngs(0)), jax.random.normal(jax.random.key(1), (2, 8, 8, 1))),
        (CausalLM(lm_cfg, 11, 9, rngs=nnx.Rngs(0)), jnp.arange(12).reshape(2, 6) % 11),
    ]
    for model, _ in models:  # a zero-initialised head would hide what dropout does to its input
        head = getattr(model, "head_w", None)
        if head is not None:
            head[...] = 0.1 * jax.random.normal(jax.random.key(2), head[...].shape)
    return models


def test_every_model_has_one_output_type_whatever_is_asked():
    """model(x) is always the array; forward always the typed output, whose main array does not depend
    on which statistics are asked for (up to rounding: the scan body that also computes them compiles
    differently)."""
    for model, x in _models():
        plain = model(x)
        assert isinstance(plain, jax.Array)
        kind = StackOutput if isinstance(model, Transformer) else ModelOutput
        main = (lambda o: o.hidden) if kind is StackOutput else (lambda o: o.logits)
        bare = model.forward(x)
        assert type(bare) is kind and bare.stats is None and bare.attention is None
        np.testing.assert_array_equal(main(bare), plain)
        full = model.forward(x, stats="full", attention=True)
        assert type(full) is kind
        np.testing.assert_allclose(main(full), plain, rtol=1e-5, atol=1e-6)
        assert set(full.stats) == {*metrics.FULL_LAYER_STAT_KEYS, "input"}
        assert set(full.stats["input"]) == set(metrics.FULL_LAYER_STAT_KEYS)
        assert full.attention.shape[:2] == (3, 2)  # [L, N, T, T]
        with pytest.raises(ValueError, match="stats"):
            model.forward(x, stats=True)
        jitted = nnx.jit(lambda m, x: m.forward(x, stats="logged"))(model, x)  # a pytree: jit returns it
        assert type(jitted) is kind
        np.testing.assert_allclose(main(jitted), plain, rtol=1e-5, atol=1e-6)  # compiled vs eager


def test_dropout_follows_the_flax_convention():
    """deterministic / rngs as nnx.Dropout: no rngs -> deterministic (evaluation); a key or an nnx.Rngs
    -> dropout; deterministic=True wins over rngs; deterministic=False without rngs is an error; .eval(),
    .train() and nnx.view set the default."""
    key = jax.random.key(3)
    for model, x in _models(dropout=0.3):
        ref = model(x)
        np.testing.assert_array_equal(model(x), ref)
        np.testing.assert_array_equal(model(x, deterministic=True, rngs=key), ref)
        dropped = model(x, rngs=key)
        assert not np.allclose(dropped, ref)
        np.testing.assert_array_equal(model(x, rngs=key), dropped)  # the key decides the masks
        np.testing.assert_array_equal(model(x, deterministic=False, rngs=key), dropped)
        # an nnx.Rngs gives its "dropout" stream's next key, as nnx.Dropout reads it
        np.testing.assert_array_equal(
            model(x, rngs=nnx.Rngs(dropout=5)), model(x, rngs=nnx.Rngs(dropout=5).dropout())
        )
        with pytest.raises(ValueError, match="rngs"):
            model(x, deterministic=False)
        np.testing.assert_array_equal(nnx.view(model, deterministic=True)(x, rngs=key), ref)
        model.eval()
        np.testing.assert_array_equal(model(x, rngs=key), ref)
        model.train()
        np.testing.assert_array_equal(model(x, rngs=key), dropped)
        with pytest.raises(ValueError, match="rngs"):
            model(x)
    # No randomness to draw (dropout and drop_path 0): deterministic=False needs no rngs.
    model, x = _models()[0]
    np.testing.assert_array_equal(model(x, deterministic=False), model(x))


def test_the_models_key_reaches_each_layer_as_layer_inputs():
    """The stack splits the call's key into one key per layer (LayerInputs.rngs, with the linear
    stochastic-depth rates): running the blocks by hand with those inputs gives the stack's output."""
    cfg = _cfg(depth=3, spectrum=SHARPEN, dropout=0.2, drop_path=0.5)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (4, 6, 16))
    key = jax.random.key(9)
    graphdef, state = nnx.split(model.blocks)
    keys_L, rates_L = jax.random.split(key, 3), 0.5 * jnp.arange(3) / 2
    h = x
    for layer in range(3):
        block = nnx.merge(graphdef, jax.tree.map(lambda a, i=layer: a[i], state))
        h, extra = block(h, LayerInputs(rngs=keys_L[layer], drop_path=rates_L[layer]))
        assert extra == {}
    h = model.final_ln(h)
    np.testing.assert_allclose(model(x, rngs=key), h, rtol=1e-5, atol=1e-6)
    assert not np.allclose(model(x), h)
