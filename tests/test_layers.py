"""Attention layers: forward equals a dense float64 reference built from effective_h(); heads sum to H;
Linen and NNX agree; masks and causality hold; DeepNorm's beta scales exactly the matrices it should."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxsmooth
from jaxsmooth import linen as jlinen
from jaxsmooth.nnx import Attention, SpectralAttention

D, N, T, B = 12, 3, 6, 2
SPECS = [
    jaxsmooth.Spectrum("sharpen"),
    jaxsmooth.Spectrum("smooth", basis="general", bound="smooth"),
    jaxsmooth.Spectrum("neutral", basis="general"),
]


def _softmax(z):
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def _dense_reference(m, x, causal=False, key_mask=None):
    """y = sum_n A_n X H_n: per-head attention times the per-head value-output maps, in float64."""
    x = np.asarray(x, np.float64)
    q = x @ np.asarray(m.w_q[...], np.float64) + np.asarray(m.b_q[...], np.float64)
    k = x @ np.asarray(m.w_k[...], np.float64) + np.asarray(m.b_k[...], np.float64)
    kd = D // N
    maps = np.asarray(m.head_maps(), np.float64)
    np.testing.assert_allclose(maps.sum(0), np.asarray(m.effective_h(), np.float64), atol=1e-5)
    y = np.zeros_like(x)
    for n in range(N):
        logits = (
            q[..., n * kd : (n + 1) * kd] @ np.swapaxes(k[..., n * kd : (n + 1) * kd], -1, -2) / np.sqrt(kd)
        )
        if causal:
            logits = np.where(np.tril(np.ones((T, T), bool)), logits, -np.inf)
        if key_mask is not None:
            logits = np.where(np.asarray(key_mask, bool)[:, None, :], logits, -np.inf)
        y += _softmax(logits) @ x @ maps[n]
    return y


def _spectral(spectrum=SPECS[0], **kw):
    return SpectralAttention(N, D, spectrum=spectrum, rngs=nnx.Rngs(0), **kw)


@pytest.mark.parametrize("spectrum", SPECS, ids=lambda s: f"{s.mode}-{s.basis}-{s.bound}")
@pytest.mark.parametrize("causal", ["none", "is_causal", "mask"])
def test_spectral_attention_equals_dense_reference(spectrum, causal):
    m = _spectral(spectrum)
    x = jax.random.normal(jax.random.key(1), (B, T, D))
    kw = {"is_causal": True} if causal == "is_causal" else {}
    if causal == "mask":
        kw["mask"] = nnx.make_causal_mask(jnp.ones((B, T)))
    got = np.asarray(m(x, **kw))
    np.testing.assert_allclose(got, _dense_reference(m, x, causal != "none"), atol=2e-5, rtol=1e-4)
    # eigenvalues() is exact: it matches float64 eigenvalues of effective_h()
    ev = np.linalg.eigvals(np.asarray(m.effective_h(), np.float64))
    np.testing.assert_allclose(np.sort(ev.real), np.sort(np.asarray(m.eigenvalues())), atol=1e-4)


def test_baseline_attention_equals_dense_reference():
    m = Attention(N, D, value_bias=False, rngs=nnx.Rngs(0))  # the reference has no V/O biases
    x = jax.random.normal(jax.random.key(1), (B, T, D))
    np.testing.assert_allclose(np.asarray(m(x)), _dense_reference(m, x), atol=2e-5, rtol=1e-4)
    ev = m.eigenvalues()
    assert ev.dtype == np.complex128 and np.all(np.diff(np.abs(ev)) <= 1e-12)  # sorted by modulus


def test_causal_attention_does_not_look_ahead():
    m = _spectral()
    x = jax.random.normal(jax.random.key(1), (1, T, D))
    # d y_t / d x_s == 0 for s > t (nanodo's causality-by-gradients check)
    jac = jax.jacobian(lambda x: m(x, is_causal=True)[0, 2].sum())(x)
    assert np.all(np.asarray(jac[0, 3:]) == 0) and np.any(np.asarray(jac[0, :3]) != 0)


def test_padding_mask_isolates_real_tokens():
    m = _spectral(SPECS[1])
    x = jax.random.normal(jax.random.key(1), (1, T, D))
    keep = jnp.asarray([[1, 1, 1, 1, 0, 0]])
    mask = nnx.make_attention_mask(keep, keep)  # [1, 1, T, T], Flax's helper
    y_masked = m(x, mask=mask)
    np.testing.assert_allclose(y_masked[:, :4], m(x[:, :4]), atol=1e-5)
    _, att = m.attend(x, mask=mask)
    np.testing.assert_allclose(np.asarray(att[:, :, :4]).sum(-1), 1.0, atol=1e-5)
    assert float(jnp.max(att[:, :, :4, 4:])) == 0.0


@pytest.mark.parametrize("spectrum", SPECS, ids=lambda s: f"{s.mode}-{s.basis}")
@pytest.mark.parametrize("branch_scale", ["none", "attnscale", "featscale"])
def test_linen_matches_nnx(spectrum, branch_scale):
    m = _spectral(spectrum, branch_scale=branch_scale)
    params = jlinen.nnx_to_linen_params(m)
    layer = jlinen.SpectralAttention(num_heads=N, spectrum=spectrum, branch_scale=branch_scale)
    x = jax.random.normal(jax.random.key(3), (B, T, D))
    init_params = layer.init(jax.random.key(0), x)["params"]
    assert jax.tree.map(jnp.shape, init_params) == jax.tree.map(jnp.shape, params)
    # Give the scale parameters non-zero values so the Wang et al. paths are really compared.
    params = jax.tree.map(lambda a: a + 0.1 if a.ndim == 1 else a, params)
    for k in params:
        getattr(m, k)[...] = params[k]
    got = layer.apply({"params": params}, x, is_causal=True)
    np.testing.assert_allclose(np.asarray(got), np.asarray(m(x, is_causal=True)), atol=1e-6)
    np.testing.assert_allclose(jlinen.effective_h(params, spectrum), m.effective_h(), atol=1e-6)


def test_branch_scales_at_init_are_identity_and_change_output_when_trained():
    x = jax.random.normal(jax.random.key(1), (B, T, D))
    ref = _spectral()(x)
    for bs in ("attnscale", "featscale"):
        m = _spectral(branch_scale=bs)
        np.testing.assert_allclose(m(x), ref, atol=1e-6)  # init 0 = the plain layer
        if bs == "attnscale":  # w_h = -1 removes the high-frequency part: every row is uniform
            m.attn_scale[...] = -jnp.ones(N)
            _, att = m.attend(x)
            np.testing.assert_allclose(att, 1.0 / T, atol=1e-6)
        else:  # s_hc = -1 removes the high-frequency part: all tokens equal
            m.s_hc[...] = -jnp.ones(D)
            y = m(x)
            np.testing.assert_allclose(y - y.mean(1, keepdims=True), 0, atol=1e-5)


def test_deepnorm_beta_scales_value_output_and_mlp_only():
    base = jaxsmooth.ModelConfig(depth=8, d_model=D, num_heads=N)
    deep = jaxsmooth.ModelConfig(depth=8, d_model=D, num_heads=N, residual="deepnorm")
    alpha, beta = deep.alpha_beta
    a = jaxsmooth.nnx.Block(base, rngs=nnx.Rngs(0))
    b = jaxsmooth.nnx.Block(deep, rngs=nnx.Rngs(0))
    for name in ("w_q", "w_k"):
        np.testing.assert_allclose(getattr(b.attn, name)[...], getattr(a.attn, name)[...])
    for mod, name in (("attn", "w_v"), ("attn", "w_o"), ("mlp", "w1"), ("mlp", "w2")):
        got = getattr(getattr(b, mod), name)[...]
        np.testing.assert_allclose(got, beta * getattr(getattr(a, mod), name)[...], rtol=1e-6)
    # Spectral: beta scales H = W_V W_O by beta^2 at init, i.e. every eigenvalue.
    sa = jaxsmooth.nnx.Block(base.__class__(**{**base.__dict__, "spectrum": SPECS[0]}), rngs=nnx.Rngs(0))
    sb = jaxsmooth.nnx.Block(deep.__class__(**{**deep.__dict__, "spectrum": SPECS[0]}), rngs=nnx.Rngs(0))
    np.testing.assert_allclose(sb.attn.eigenvalues(), beta**2 * sa.attn.eigenvalues(), rtol=1e-5)
    assert sb.attn.alpha == pytest.approx(alpha)


def test_bad_layer_arguments():
    with pytest.raises(ValueError, match="num_heads"):
        SpectralAttention(3, 10, spectrum=SPECS[0], rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="by keyword.*positionally"):
        SpectralAttention(12, 3, SPECS[0], rngs=nnx.Rngs(0))  # the pre-Flax-signature order
    with pytest.raises(ValueError, match="Spectrum"):
        SpectralAttention(3, 12, spectrum="sharpen", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="square"):
        SpectralAttention(3, 12, qkv_features=24, spectrum=SPECS[0], rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="grouped-query"):
        Attention(4, 12, num_kv_heads=2, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="branch_scale"):
        Attention(3, 12, branch_scale="both", rngs=nnx.Rngs(0))
    m = _spectral()
    with pytest.raises(ValueError, match="mask"):
        m(jnp.zeros((B, T, D)), mask=jnp.ones((B, T + 1), bool))
    with pytest.raises(ValueError, match="inputs_q"):
        m(jnp.zeros((B, T, D + 1)))
    with pytest.raises(ValueError, match="init_cache"):
        m(jnp.zeros((B, 1, D)), decode=True)
    with pytest.raises(ValueError, match="deterministic"):
        _spectral(dropout_rate=0.1)(jnp.zeros((B, T, D)))


@pytest.mark.parametrize("shape_in, n_out", [((2, 3, 5), 7), ((2, 3, 7), 5), ((4, 6), 6)])
def test_dense_custom_vjp_equals_autodiff(shape_in, n_out):
    """`dense` (its backward transposes the narrower operand behind optimization barriers) gives the
    same value, input gradient and weight gradient as autodiff of x @ w, in both branches (I <= O, I > O)."""
    from jaxsmooth.attention import dense

    kx, kw, kc = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, shape_in)
    w = jax.random.normal(kw, (shape_in[-1], n_out))
    c = jax.random.normal(kc, (*shape_in[:-1], n_out))  # a non-uniform cotangent
    loss = lambda f: jax.jit(jax.value_and_grad(lambda x, w: jnp.sum(jnp.tanh(f(x, w)) * c), (0, 1)))
    (v1, (gx1, gw1)), (v2, (gx2, gw2)) = loss(dense)(x, w), loss(jnp.matmul)(x, w)
    np.testing.assert_allclose(v1, v2, rtol=1e-6)
    np.testing.assert_allclose(gx1, gx2, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(gw1, gw2, rtol=1e-5, atol=1e-6)
    assert gx1.shape == x.shape and gw1.shape == w.shape
    xb, wb = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
    gxb, gwb = jax.grad(lambda x, w: jnp.sum(dense(x, w).astype(jnp.float32) * c), (0, 1))(xb, wb)
    assert gxb.dtype == gwb.dtype == jnp.bfloat16


def test_fast_backward_matches_autodiff_in_a_model_and_can_be_turned_off_for_jvp():
    """A small ViT's parameter gradients are the same with and without `fast_backward`; with it off,
    forward-mode autodiff works through the model (with it on, `dense` is reverse-mode only)."""
    from jaxsmooth.nnx import ViT

    base = dict(depth=2, d_model=16, num_heads=2, spectrum=jaxsmooth.Spectrum("sharpen"))
    x = jax.random.normal(jax.random.key(1), (3, 8, 8, 1))
    grads = []
    for fast in (True, False):
        model = ViT(jaxsmooth.ModelConfig(**base, fast_backward=fast), 10, (8, 8, 1), 4, rngs=nnx.Rngs(0))
        model.head_w[...] = jax.random.normal(jax.random.key(2), model.head_w[...].shape)  # not 0 at init
        graphdef, params = nnx.split(model, nnx.Param)
        loss = lambda p, gd=graphdef: jnp.sum(jnp.sin(nnx.merge(gd, p)(x)))
        grads.append(jax.jit(jax.grad(loss))(params))
    for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1]), strict=True):
        assert float(jnp.abs(b).max()) > 0  # every parameter gets a gradient: the comparison is not 0 == 0
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    out, tangent = jax.jvp(lambda x: model(x), (x,), (jnp.ones_like(x),))  # model: fast_backward=False
    assert np.all(np.isfinite(tangent)) and float(jnp.abs(tangent).max()) > 0
    with pytest.raises(ValueError, match="fast_backward"):
        jaxsmooth.ModelConfig(**base, fast_backward="yes")
