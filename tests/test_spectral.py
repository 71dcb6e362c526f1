"""The spectral reparameterisation holds its promise for ANY finite parameters.

Every check composes H = W_V W_O in float32 through the library and verifies it with float64 numpy
eigenvalues, so a bug in the library's own eigenvalue bookkeeping cannot hide itself.
"""

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import jax.test_util
import numpy as np
import pytest

from jaxsmooth import Spectrum, spectral

D = 12
COMBOS = [
    Spectrum(mode=m, basis=b, bound=bd)
    for m, b, bd in itertools.product(
        ("smooth", "sharpen", "neutral", "free"), ("orthogonal", "general"), ("clip", "smooth")
    )
    if not (m == "free" and bd == "smooth")
]


def _ids(s):
    return f"{s.mode}-{s.basis}-{s.bound}"


def _theta_like(base, spectrum, rng):
    """Wrap a [D, D] matrix as the basis parameters of `spectrum` (the general basis gets a random w, s)."""
    if spectrum.basis == "orthogonal":
        return jnp.asarray(base, jnp.float32)
    return {
        "u": jnp.asarray(base, jnp.float32),
        "w": jnp.asarray(base.T[::-1], jnp.float32),
        "s": jnp.asarray(rng.normal(size=D) * 1e3, jnp.float32),  # saturates tanh: cond at its bound
    }


def _adversarial_thetas(rng):
    g = rng.normal(size=(D, D))
    dup = g.copy()
    dup[:, 1] = dup[:, 0] + 1e-7 * rng.normal(size=D)  # near-singular
    rank1 = np.outer(rng.normal(size=D), rng.normal(size=D))  # rank deficient
    rows = g * np.logspace(-8, 8, D)[:, None]  # badly scaled
    return {
        "random": g,
        "zeros": np.zeros((D, D)),
        "ones": np.ones((D, D)),
        "near_singular": dup,
        "rank1": rank1,
        "badly_scaled": rows,
        "huge": g * 1e30,
        "tiny": g * 1e-30,
    }


def _adversarial_psis(rng):
    return {
        "random": rng.normal(size=D),
        "zeros": np.zeros(D),
        "huge": rng.normal(size=D) * 1e30,
        "tiny": rng.normal(size=D) * 1e-30,
        "mixed": np.concatenate([np.full(D // 2, 1e19), np.full(D - D // 2, -1e-19)]),
        "fmax": np.full(D, np.finfo(np.float32).max) * np.sign(rng.normal(size=D)),
    }


def _check_h(h_DxD, lam_D, spectrum, alpha):
    h = np.asarray(h_DxD, np.float64)
    assert np.all(np.isfinite(h))
    ev = np.linalg.eigvals(h)
    scale = max(1.0, float(np.max(np.abs(ev))))
    tol = 1e-4 * scale * (spectrum.max_cond if spectrum.basis == "general" else 1.0)
    assert np.max(np.abs(ev.imag)) <= tol
    a, b = spectrum.closed_interval(alpha)
    assert np.all(ev.real >= a - tol) and np.all(ev.real <= b + tol)
    # Strict signs where the mode promises them (the open end of the interval).
    if spectrum.mode == "sharpen" and spectrum.hi == 0:
        assert np.all(ev.real < tol) and np.all(np.asarray(lam_D) < 0)
    if spectrum.mode == "smooth" and spectrum.lo == 0:
        assert np.all(ev.real > -tol) and np.all(np.asarray(lam_D) > 0)
    np.testing.assert_allclose(np.sort(ev.real), np.sort(np.asarray(lam_D, np.float64)), atol=tol)


@pytest.mark.parametrize("spectrum", COMBOS, ids=_ids)
@pytest.mark.parametrize("alpha", [1.0, 3.76])
def test_spectrum_holds_under_adversarial_parameters(spectrum, alpha):
    rng = np.random.default_rng(0)
    compose = jax.jit(lambda t, p: spectral.value_projection(t, p, spectrum, alpha))
    for (tn, theta), (pn, psi) in itertools.product(
        _adversarial_thetas(rng).items(), _adversarial_psis(rng).items()
    ):
        if spectrum.mode == "free" and pn in ("huge", "mixed", "fmax"):
            continue  # free eigenvalues are unbounded by design: H overflows with psi
        th = _theta_like(theta, spectrum, rng)
        w_v, w_o = compose(th, jnp.asarray(psi, jnp.float32))
        lam = spectral.eigenvalues(jnp.asarray(psi, jnp.float32), spectrum, alpha)
        try:
            _check_h(np.asarray(w_v, np.float64) @ np.asarray(w_o, np.float64), lam, spectrum, alpha)
        except AssertionError as e:
            raise AssertionError(f"theta={tn}, psi={pn}: {e}") from e
        if spectrum.basis == "orthogonal":  # V^-1 = V^T: W_O is orthogonal and H symmetric
            wo = np.asarray(w_o, np.float64)
            np.testing.assert_allclose(wo @ wo.T, np.eye(D), atol=1e-5)
            h = np.asarray(w_v, np.float64) @ wo
            np.testing.assert_allclose(h, h.T, atol=1e-5 * max(1.0, np.abs(h).max()))
        else:  # the eigenvector matrix stays within its condition-number bound
            v, _ = spectral.basis(th, spectrum)
            assert np.linalg.cond(np.asarray(v, np.float64)) <= spectrum.max_cond * (1 + 1e-4)


@pytest.mark.parametrize("spectrum", COMBOS, ids=_ids)
def test_gradients_finite_under_adversarial_parameters(spectrum):
    rng = np.random.default_rng(1)
    target = jnp.asarray(rng.normal(size=(D, D)), jnp.float32)

    def loss(th, psi):
        return jnp.sum((spectral.compose(th, psi, spectrum, 2.0) - target) ** 2)

    grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
    for (tn, theta), (pn, psi) in itertools.product(
        _adversarial_thetas(rng).items(), _adversarial_psis(rng).items()
    ):
        if spectrum.mode == "free" and pn in ("huge", "mixed", "fmax"):
            continue
        if tn == "tiny":  # dQ/dtheta ~ 1/|theta| ~ 1e30: finite in float32 only with |psi| modest
            psi = np.clip(psi, -1, 1)
        g = grad(_theta_like(theta, spectrum, rng), jnp.asarray(psi, jnp.float32))
        for leaf in jax.tree.leaves(g):
            assert bool(jnp.all(jnp.isfinite(leaf))), f"non-finite gradient: theta={tn}, psi={pn}"


def test_orthogonal_derivative_matches_finite_differences():
    # The custom QR derivative equals the true derivative where it exists (full-rank theta).
    with jax.enable_x64(True):
        theta = jax.random.normal(jax.random.key(0), (6, 6), jnp.float64)
        w = jax.random.normal(jax.random.key(1), (6, 6), jnp.float64)
        f = lambda t: jnp.sum(spectral.orthogonal(t) * w)
        jax.test_util.check_grads(f, (theta,), order=1, modes=["fwd", "rev"], atol=1e-6, rtol=1e-6)


def test_orthogonal_is_qr_with_positive_diagonal():
    theta = np.random.default_rng(2).normal(size=(7, 7))
    q = np.asarray(spectral.orthogonal(jnp.asarray(theta, jnp.float32)), np.float64)
    r = q.T @ theta
    np.testing.assert_allclose(np.tril(r, -1), 0, atol=1e-5)  # q^T theta is upper triangular
    assert np.all(np.diag(r) > 0)


@pytest.mark.parametrize("spectrum", [s for s in COMBOS if s.basis == "orthogonal"], ids=_ids)
def test_eigenvalue_map_inverts(spectrum):
    a, b = spectrum.closed_interval(2.0) if spectrum.mode != "free" else (-3.0, 3.0)
    lam = jnp.linspace(a + 0.01 * (b - a), b - 0.01 * (b - a), 9)
    back = spectral.eigenvalues(spectral.eigenvalues_inverse(lam, spectrum, 2.0), spectrum, 2.0)
    np.testing.assert_allclose(back, lam, rtol=1e-4, atol=1e-5)


def test_deepnorm_range_refers_to_effective_update():
    # lambda(H) in alpha * [lo, hi]: the update H / alpha relative to the skip path has the stated range.
    sp = Spectrum("neutral", lo=-0.5, hi=0.25)
    psi = jnp.asarray([-1e9, 1e9, 0.0], jnp.float32)
    lam = spectral.eigenvalues(psi, sp, alpha=4.0)
    np.testing.assert_allclose(lam, [-2.0, 1.0, 0.0])


@pytest.mark.parametrize("init", ["uniform", "matched"])
@pytest.mark.parametrize("spectrum", COMBOS, ids=_ids)
def test_init_is_interior_and_scaled(spectrum, init):
    spectrum = dataclasses.replace(spectrum, init=init, init_scale=1.0)
    theta, psi = spectral.init(jax.random.key(0), 64, spectrum, alpha=6.687, scale=0.106**2)
    lam = np.asarray(spectral.eigenvalues(psi, spectrum, 6.687))
    lo, hi = (-1.0, 1.0) if spectrum.mode == "free" else (spectrum.lo, spectrum.hi)
    # beta^2-scaled central 90% of the range, none clipped to an end point (where clip has no gradient)
    assert np.all(np.abs(lam) <= 0.106**2 * max(abs(lo), abs(hi)) * (1 + 1e-4))
    assert np.all(np.abs(lam) >= 0.106**2 * 0.05 * (hi - lo) * (1 - 1e-3)) or spectrum.mode in (
        "neutral",
        "free",
    )
    g = jax.grad(lambda p: jnp.sum(spectral.eigenvalues(p, spectrum, 6.687)))(psi)
    assert np.all(np.asarray(g) != 0), "an initial eigenvalue sits where its gradient is zero"
    v, v_inv = spectral.basis(theta, spectrum)
    np.testing.assert_allclose(np.asarray(v) @ np.asarray(v_inv), np.eye(64), atol=1e-4)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(mode="smoothing"), "spectrum.mode"),
        (dict(basis="qr"), "spectrum.basis"),
        (dict(bound="tanh"), "spectrum.bound"),
        (dict(mode="sharpen", hi=0.5), "spectrum.hi"),
        (dict(mode="smooth", lo=-1.0), "spectrum.lo"),
        (dict(mode="neutral", lo=1.0, hi=-1.0), "spectrum.lo"),
        (dict(mode="free", lo=-2.0), "spectrum.lo"),
        (dict(mode="free", bound="smooth"), "spectrum.bound"),
        (dict(basis="general", max_cond=0.5), "spectrum.max_cond"),
        (dict(mode="neutral", hi=float("nan")), "spectrum.hi"),
    ],
)
def test_bad_spectrum_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        Spectrum(**kwargs)


def test_spectrum_defaults_are_exposed_and_hashable():
    assert (Spectrum("sharpen").lo, Spectrum("sharpen").hi) == (-1.0, 0.0)
    assert (Spectrum("smooth").lo, Spectrum("smooth").hi) == (0.0, 1.0)
    assert (Spectrum("neutral").lo, Spectrum("neutral").hi) == (-1.0, 1.0)
    assert Spectrum("sharpen") == Spectrum("sharpen", lo=-1, hi=0)
    assert hash(Spectrum("sharpen")) == hash(Spectrum("sharpen", lo=-1.0))
    with pytest.raises(ValueError, match="square"):
        spectral.value_projection(jnp.zeros((4, 4)), jnp.zeros(5), Spectrum())
    with pytest.raises(ValueError, match="dict"):
        spectral.value_projection(jnp.zeros((4, 4)), jnp.zeros(4), Spectrum(basis="general"))


@pytest.mark.parametrize("mode", ["sharpen", "smooth"])
def test_eigenvalues_near_the_open_end_keep_their_gradient(mode):
    """The open end (0) is approached by the square, not clipped: an eigenvalue next to it still gets a
    gradient (clipped, it would stay there for good, as weight decay pulls psi towards 0)."""
    spectrum = Spectrum(mode)
    psi = jnp.asarray([1e-6, 1e-4, -1e-3, 0.05], jnp.float32)
    lam = np.asarray(spectral.eigenvalues(psi, spectrum))
    a, b = spectrum.closed_interval()
    assert np.all((lam >= a) & (lam <= b))
    g = np.asarray(jax.grad(lambda p: jnp.sum(spectral.eigenvalues(p, spectrum)))(psi))
    assert np.all(g != 0) and np.all(np.sign(g) == np.sign(np.asarray(psi)) * (1 if mode == "smooth" else -1))
