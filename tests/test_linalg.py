"""jaxsmooth.linalg: the CPU path (scipy's LAPACK through a host callback, which cannot deadlock XLA's
thread pool) gives bit-identical values and gradients to jaxlib's own kernels, so runs recorded before it
reproduce exactly; batching, transposition and derivatives work as they do for jnp.linalg."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsmooth import linalg, spectral


@pytest.fixture(autouse=True)
def host_path(monkeypatch):
    """This process has one CPU device, where "auto" keeps jaxlib's kernels: force the host path."""
    monkeypatch.setenv(linalg.ENV, "host")


def test_auto_uses_the_host_path_only_with_several_cpu_devices(monkeypatch):
    monkeypatch.setenv(linalg.ENV, "auto")
    for count, host in ((1, False), (4, True)):
        monkeypatch.setattr(linalg, "_cpu_device_count", lambda count=count: count)
        jax.clear_caches()  # the path is chosen at trace time; traces are cached
        text = jax.jit(linalg.qr).lower(jnp.eye(4)).as_text()
        assert ("lapack_sgeqrf" in text) is not host and ("callback" in text) is host


@pytest.fixture
def xla_kernels(monkeypatch):
    """Evaluate `fn` with jaxlib's kernels (the reference), under a fresh jit."""

    def run(fn, *args):
        # The path is chosen at trace time and traces are cached: clear them on both sides of the switch,
        # or the "reference" could be the host path's own trace.
        jax.clear_caches()
        monkeypatch.setenv(linalg.ENV, "xla")
        try:
            out = jax.jit(fn)(*args)
            assert "lapack_" in jax.jit(fn).lower(*args).as_text()  # really jaxlib's kernels
            return out
        finally:
            monkeypatch.setenv(linalg.ENV, "host")
            jax.clear_caches()

    return run


def _mats(*shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


@pytest.mark.parametrize("shape", [(64, 64), (3, 48, 48), (2, 2, 17, 17), (5, 20, 12), (12, 20)])
def test_qr_is_bit_identical_to_jaxlib(shape, xla_kernels):
    x = _mats(*shape)
    q_ref, r_ref = xla_kernels(lambda a: tuple(jnp.linalg.qr(a)), x)
    q, r = jax.jit(linalg.qr)(x)
    assert q.shape == q_ref.shape and r.shape == r_ref.shape
    np.testing.assert_array_equal(q, q_ref)
    np.testing.assert_array_equal(r, r_ref)


@pytest.mark.parametrize("transpose", [False, True])
def test_triangular_solve_is_bit_identical_and_transposes_like_jax(transpose, xla_kernels):
    r = jnp.triu(_mats(3, 32, 32, seed=1)) + 4 * jnp.eye(32)[None]
    b = _mats(3, 24, 32, seed=2)

    def native(r, b):
        return jax.lax.linalg.triangular_solve(r, b, left_side=False, lower=False, transpose_a=transpose)

    ref = xla_kernels(native, r, b)
    if transpose:  # the transpose path: the VJP of b -> b r^-1 solves with r^T
        got = jax.jit(lambda r, b: jax.linear_transpose(lambda v: linalg.solve_upper_right(r, v), b)(b)[0])(
            r, b
        )
    else:
        got = jax.jit(linalg.solve_upper_right)(r, b)
    np.testing.assert_array_equal(got, ref)
    np.testing.assert_allclose(got @ (jnp.swapaxes(r, -1, -2) if transpose else r), b, rtol=2e-4, atol=2e-4)


def test_singular_values_are_bit_identical_and_differentiable(xla_kernels):
    x = _mats(6, 17, 32, seed=3)
    ref = xla_kernels(lambda a: jnp.linalg.svd(a, compute_uv=False), x)
    np.testing.assert_array_equal(jax.jit(linalg.svdvals)(x), ref)
    g = jax.grad(lambda a: jnp.sum(linalg.svdvals(a)))(x)
    g_ref = jax.grad(lambda a: jnp.sum(jnp.linalg.svd(a, compute_uv=False)))(x)
    np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("basis", ["orthogonal", "general"])
def test_spectral_gradients_are_bit_identical_to_jaxlib_kernels(basis, xla_kernels):
    """What a training step computes (the composition and its gradient, batched over layers as the init
    and the statistics are) is exactly what it was with jaxlib's kernels."""
    spectrum = jaxsmooth_spectrum(basis)
    keys = jax.random.split(jax.random.key(0), 3)
    theta, psi = jax.vmap(lambda k: spectral.init(k, 24, spectrum))(keys)
    theta = jax.tree.map(lambda a: a + 0.3 * _mats(*a.shape, seed=4), theta)  # not orthogonal any more
    probe = _mats(24, 24, seed=5)

    def loss(theta, psi):
        h = jax.vmap(lambda t, p: spectral.compose(t, p, spectrum))(theta, psi)
        return jnp.sum(jnp.tanh(h @ probe))

    step = lambda t, p: jax.value_and_grad(loss, argnums=(0, 1))(t, p)
    ref = xla_kernels(step, theta, psi)
    got = jax.jit(step)(theta, psi)
    jax.tree.map(np.testing.assert_array_equal, got, ref)


def jaxsmooth_spectrum(basis):
    from jaxsmooth import Spectrum

    return Spectrum("sharpen", basis=basis)


def test_second_derivatives_fall_back_to_jax_rules():
    x = _mats(8, 8, seed=6) + 3 * jnp.eye(8)
    f = lambda a: jnp.sum(spectral.orthogonal(a) ** 3)
    hvp = jax.jvp(jax.grad(f), (x,), (jnp.ones_like(x),))[1]
    assert np.all(np.isfinite(hvp))


def test_float64_stays_float64_and_matches_jaxlib(xla_kernels):
    with jax.enable_x64(True):
        x = jnp.asarray(np.random.default_rng(7).standard_normal((2, 9, 9)), jnp.float64)
        q_ref, r_ref = xla_kernels(lambda a: tuple(jnp.linalg.qr(a)), x)
        q, r = jax.jit(linalg.qr)(x)
        assert q.dtype == r.dtype == jnp.float64
        np.testing.assert_array_equal(q, q_ref)
        np.testing.assert_array_equal(r, r_ref)
        s_ref = xla_kernels(lambda a: jnp.linalg.svd(a, compute_uv=False), x)
        np.testing.assert_array_equal(jax.jit(linalg.svdvals)(x), s_ref)
        # The custom QR derivative on the host path equals the true one (finite differences, float64).
        w = jnp.asarray(np.random.default_rng(8).standard_normal((9, 9)), jnp.float64)
        f = lambda t: jnp.sum(spectral.orthogonal(t) * w)
        jax.test_util.check_grads(f, (x[0],), order=1, modes=["fwd", "rev"], atol=1e-6, rtol=1e-6)


def test_bad_choice_is_named(monkeypatch):
    monkeypatch.setenv(linalg.ENV, "lapack")
    with pytest.raises(ValueError, match="JAXSMOOTH_CPU_LINALG='lapack'"):
        linalg.qr(jnp.eye(3))
