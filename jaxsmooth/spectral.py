"""The spectral reparameterisation H = W_V W_O = V diag(lambda) V^-1 as pure functions (docs/theory.md).

Shapes: D = model width. `theta` parameterises the eigenvector matrix V, `psi_D` the eigenvalues.
    basis="orthogonal": theta is a [D, D] array; V = Q of QR(theta), V^-1 = V^T, H symmetric.
    basis="general":    theta is a dict {"u": [D, D], "w": [D, D], "s": [D]};
                        V = Q(u) diag(sigma) Q(w)^T with sigma = kappa^(tanh(s)/2), so cond(V) <= kappa
                        (= Spectrum.max_cond) and V^-1 = Q(w) diag(1/sigma) Q(u)^T is exact: no matrix
                        inverse is ever computed, whatever the parameters.
    W_V := V diag(lambda), W_O := V^-1, so W_V W_O = H and, for multi-head attention, head h uses columns
    h*K:(h+1)*K of W_V and the same rows of W_O: the per-head maps sum to H.
    lambda = f(c psi) with c = sqrt(D) for Spectrum.param_scale="width" (the default) and c = 1 for "unit":
    with "width", psi and theta have the entry scale (1 / sqrt(D)) of the baseline matrices they replace,
    so one Adam step moves H at about the baseline's relative rate (docs/design.md).

Everything is computed in float32 (callers cast the result to their compute dtype). For any finite
parameters the eigenvalues lie in Spectrum.closed_interval(alpha) and gradients are finite: QR is
scale-invariant so theta is normalised first, and the QR derivative (which needs R^-1) uses an R whose
diagonal is floored, which only changes gradients at (near-)rank-deficient theta, where the true
derivative does not exist.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from jaxsmooth import linalg
from jaxsmooth.config import Spectrum
from jaxsmooth.linalg import limit_lapack_threads  # noqa: F401  (public name, kept here too)

Theta = Any  # jnp.ndarray [D, D] (orthogonal basis) or dict(u=[D, D], w=[D, D], s=[D]) (general basis)

_TINY = 1e-30  # smallest scale we normalise theta by; below it QR would work on subnormal numbers
_R_FLOOR = (
    1e-6  # floor on diag(R) of the normalised theta in the QR derivative (only active near rank deficiency)
)


def _qr_positive(theta_DxD: jnp.ndarray):
    """QR of theta / max|theta| with diag(R) >= 0 (the unique QR for full-rank input), and the scale."""
    peak = jnp.max(jnp.abs(theta_DxD))
    scale = jnp.where(peak > _TINY, peak, 1.0)  # all-zero (or subnormal) theta: QR of zeros, Q = I
    q, r = linalg.qr(theta_DxD / scale)  # deadlock-free on multi-device CPU (jaxsmooth/linalg.py)
    sign_D = jnp.where(jnp.diagonal(r) < 0, -1.0, 1.0).astype(q.dtype)
    return q * sign_D[None, :], r * sign_D[:, None], scale


@jax.custom_jvp
def orthogonal(theta_DxD: jnp.ndarray) -> jnp.ndarray:
    """Q factor of QR(theta) with positive diag(R): an orthogonal matrix for ANY finite theta.

    Its derivative is a custom JVP that stays finite at (near-)rank-deficient theta (module docstring).

    Args:
      theta_DxD: any finite [D, D] matrix; it is divided by its largest |entry| first (QR is
        scale-invariant), and an all-zero (or subnormal) theta gives Q = I.

    Returns:
      Q_DxD, orthogonal.
    """
    return _qr_positive(theta_DxD)[0]


@orthogonal.defjvp
def _orthogonal_jvp(primals, tangents):
    # X = QR  =>  Q^T dX R^-1 = Q^T dQ + dR R^-1, with Q^T dQ skew and dR R^-1 upper triangular, so
    # dQ = Q (L - L^T) with L = strict lower triangle of Q^T dX R^-1 (the square case of JAX's qr_jvp).
    (theta,), (dtheta,) = primals, tangents
    q, r, scale = _qr_positive(theta)
    d_D = jnp.diagonal(r)
    floor = _R_FLOOR  # in units of the normalised theta, whose largest entry is 1
    r_safe = r + jnp.diag(jnp.maximum(d_D, floor) - d_D)
    dx_rinv = linalg.solve_upper_right(r_safe, dtheta / scale)  # dtheta R^-1, transposable
    low = jnp.tril(q.T @ dx_rinv, -1)
    return q, q @ (low - low.T)


def psi_unit(spectrum: Spectrum, d: int) -> float:
    """c in lambda = f(c psi): sqrt(D) for param_scale="width", 1 for "unit".

    Args:
      spectrum: the constraint; only its param_scale is read.
      d: width D.

    Returns:
      c, a Python float.
    """
    return math.sqrt(d) if spectrum.param_scale == "width" else 1.0


def eigenvalues(psi_D: jnp.ndarray, spectrum: Spectrum, alpha: float = 1.0) -> jnp.ndarray:
    """lambda_D of H from the free vector psi_D; inside spectrum.closed_interval(alpha) for any finite psi.

    With p = c psi (c = `psi_unit`) and [a, b] = `Spectrum.closed_interval(alpha)`:
    clip:   sharpen b - p^2, smooth a + p^2 (the paper's "minus"/"plus", offset by the margin that keeps
            0 excluded), clipped at the far end; neutral p |p| (the signed square), clipped to [a, b].
    smooth: alpha (lo + (hi - lo) sigmoid(p)); also clipped, since sigmoid saturates to 0/1 in float32.
    free:   p |p| (eigen-parameterised but unconstrained).
    The controls (neutral, free) use the same square map as sharpen and smooth, only with the sign left
    free, so a difference between them is the sign's, not the parameterisation's (docs/design.md).

    Args:
      psi_D: the free parameters [D] (any finite values).
      spectrum: the constraint.
      alpha: DeepNorm's residual scale; the interval is alpha * [lo, hi].
    Returns:
      lambda_D, float32.
    """
    psi = jnp.asarray(psi_D, jnp.float32)
    psi = psi * psi_unit(spectrum, psi.shape[-1])
    if spectrum.mode == "free":
        return psi * jnp.abs(psi)
    a, b = spectrum.closed_interval(alpha)
    if spectrum.bound == "smooth":
        raw = alpha * (spectrum.lo + (spectrum.hi - spectrum.lo) * jax.nn.sigmoid(psi))
    elif spectrum.mode in ("sharpen", "smooth"):
        # |psi| beyond r already saturates the clip; capping it first keeps psi^2 (and its derivative
        # 2 psi, multiplied by the clip's zero derivative) finite for psi up to float32 max.
        r = 2.0 * math.sqrt(max(abs(a), abs(b))) + 1.0
        sq = jnp.square(jnp.clip(psi, -r, r))
        # The open end (0) is approached by the square itself, offset to the margin, not clipped: a
        # clipped eigenvalue has no gradient, and near 0 one stayed there for good (weight decay pulls
        # psi towards 0); here the gradient 2 psi vanishes only at psi = 0 exactly.
        raw = b - sq if spectrum.mode == "sharpen" else a + sq
    else:  # neutral: the signed square, |psi| capped first as above (|p| > r is clipped anyway)
        r = math.sqrt(max(abs(a), abs(b))) + 1.0
        capped = jnp.clip(psi, -r, r)
        raw = capped * jnp.abs(capped)
    return jnp.clip(raw, a, b)


def eigenvalues_inverse(lam_D: jnp.ndarray, spectrum: Spectrum, alpha: float = 1.0) -> jnp.ndarray:
    """A psi_D with eigenvalues(psi) == lam_D (after clipping lam_D into the allowed interval).

    Args:
      lam_D: target eigenvalues [D].
      spectrum: the constraint.
      alpha: DeepNorm's residual scale; the interval is alpha * [lo, hi].

    Returns:
      psi_D, float32. For bound="smooth" the sigmoid value it inverts is clipped to [1e-6, 1 - 1e-6],
      so targets at the interval's ends are only approached.
    """
    lam = jnp.asarray(lam_D, jnp.float32)
    unit = psi_unit(spectrum, lam.shape[-1])
    signed_sqrt = lambda x: jnp.sign(x) * jnp.sqrt(jnp.abs(x))
    if spectrum.mode == "free":
        return signed_sqrt(lam) / unit
    a, b = spectrum.closed_interval(alpha)
    lam = jnp.clip(lam, a, b)
    if spectrum.bound == "smooth":
        p = (lam / alpha - spectrum.lo) / (spectrum.hi - spectrum.lo)
        p = jnp.clip(p, 1e-6, 1 - 1e-6)
        return (jnp.log(p) - jnp.log1p(-p)) / unit
    if spectrum.mode in ("sharpen", "smooth"):
        return jnp.sqrt(jnp.abs(lam - (b if spectrum.mode == "sharpen" else a))) / unit
    return signed_sqrt(lam) / unit


def basis(theta: Theta, spectrum: Spectrum) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(V, V^-1), both [D, D] float32, for either basis; V^-1 is formed from orthogonal factors only.

    Args:
      theta: the eigenvector parameters: a [D, D] array for basis="orthogonal", a dict with keys "u",
        "w" ([D, D]) and "s" ([D]) for basis="general" (module docstring); the wrong kind raises a
        ValueError.
      spectrum: the constraint; its basis and max_cond are read.

    Returns:
      (V, V^-1): V = Q(theta), V^-1 = V^T (orthogonal); V = Q(u) diag(sigma) Q(w)^T and V^-1 =
      Q(w) diag(1/sigma) Q(u)^T with cond(V) <= max_cond (general).
    """
    if spectrum.basis == "orthogonal":
        if isinstance(theta, dict):
            raise ValueError("basis='orthogonal' takes theta as one [D, D] array, got a dict")
        q = orthogonal(jnp.asarray(theta, jnp.float32))
        return q, q.T
    if not (isinstance(theta, dict) and set(theta) == {"u", "w", "s"}):
        raise ValueError("basis='general' takes theta as a dict with keys 'u', 'w' ([D, D]) and 's' ([D])")
    q1 = orthogonal(jnp.asarray(theta["u"], jnp.float32))
    q2 = orthogonal(jnp.asarray(theta["w"], jnp.float32))
    # sigma in [kappa^-1/2, kappa^1/2] => cond(V) = max sigma / min sigma <= kappa.
    log_sigma_D = 0.5 * math.log(spectrum.max_cond) * jnp.tanh(jnp.asarray(theta["s"], jnp.float32))
    v = (q1 * jnp.exp(log_sigma_D)[None, :]) @ q2.T
    v_inv = (q2 * jnp.exp(-log_sigma_D)[None, :]) @ q1.T
    return v, v_inv


def value_projection(
    theta: Theta, psi_D: jnp.ndarray, spectrum: Spectrum, alpha: float = 1.0
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(w_v_DxD, w_o_DxD) with w_v @ w_o = H = V diag(lambda) V^-1 and eig(H) = lambda (float32).

    W_V := V diag(lambda) and W_O := V^-1, so for multi-head attention head h uses columns h*K:(h+1)*K of
    W_V and the same rows of W_O, and the per-head maps sum to H.

    Args:
      theta: the eigenvector parameters (`basis`).
      psi_D: the eigenvalue parameters [D] (`eigenvalues`).
      spectrum: the constraint.
      alpha: DeepNorm's residual scale; the eigenvalues lie in `spectrum.closed_interval(alpha)`.

    Returns:
      (w_v_DxD, w_o_DxD), float32. A basis that is not square or does not match psi's width raises a
      ValueError.
    """
    v, v_inv = basis(theta, spectrum)
    lam_D = eigenvalues(psi_D, spectrum, alpha)
    _check_width(v, lam_D)
    return v * lam_D[None, :], v_inv


def compose(theta: Theta, psi_D: jnp.ndarray, spectrum: Spectrum, alpha: float = 1.0) -> jnp.ndarray:
    """H_DxD = W_V W_O = V diag(lambda) V^-1, the map the attention branch applies (float32).

    Args:
      theta: the eigenvector parameters (`basis`): a [D, D] array for basis="orthogonal", a dict
        {"u", "w", "s"} for basis="general".
      psi_D: the eigenvalue parameters [D] (`eigenvalues`).
      spectrum: the constraint.
      alpha: DeepNorm's residual scale; the eigenvalues lie in `spectrum.closed_interval(alpha)`.

    Returns:
      H_DxD, float32, with eigenvalues `eigenvalues(psi_D, spectrum, alpha)`.

    Example::

      >>> import jax, jax.numpy as jnp
      >>> from jaxsmooth import Spectrum, spectral
      >>> sharpen = Spectrum("sharpen")  # eigenvalues in [-1, 0)
      >>> theta, psi_D = spectral.init(jax.random.key(0), 8, sharpen)
      >>> h_DxD = spectral.compose(theta, psi_D, sharpen)
      >>> h_DxD.shape, h_DxD.dtype
      ((8, 8), dtype('float32'))
      >>> lam_D = jnp.linalg.eigvalsh(h_DxD)  # orthogonal basis: H is symmetric
      >>> bool(jnp.all((lam_D >= -1) & (lam_D < 0)))
      True
    """
    w_v, w_o = value_projection(theta, psi_D, spectrum, alpha)
    return w_v @ w_o


def init(
    key: jax.Array, d: int, spectrum: Spectrum, *, alpha: float = 1.0, scale: float = 1.0
) -> tuple[Theta, jnp.ndarray]:
    """Initial (theta, psi_D). Our choices (the paper gives none; docs/design.md):

    - theta: param_scale="width": a Haar-random orthogonal matrix (entries of size 1 / sqrt(D), the
      baseline matrices' scale; QR perfectly conditioned); "unit": theta ~ N(0, 1) (the paper authors'
      choice). Q of its QR is Haar-distributed either way; the scale sets how far one optimiser step turns
      it. General basis: u, w drawn the same way, s = 0, so V starts orthogonal and the optimiser may skew
      it up to cond(V) <= max_cond.
    - eigenvalues (`Spectrum.init`): "uniform" over the central 90% of the mode's interval ([-1, 1] for
      "free"), so none starts at (or clipped to) an end point where the clip has no gradient; "matched":
      |lambda| distributed as |Re mu| for mu an eigenvalue of the baseline's W_V W_O at init (xavier W_V,
      W_O: mu = r e^(i phi) with r ~ Uniform(0, 1) and a uniform phase, measured; mean |Re mu| = 1/pi):
      the real part is what grows or shrinks the DC mode per layer (|1 + mu| ~ 1 + Re mu), so each
      eigenvalue pushes as hard as a baseline eigenvalue does, but all one way. The mode gives the sign
      (random signs for neutral and free); magnitudes are kept inside the central 90% of the interval.
      Both times `Spectrum.init_scale` and `scale`. DeepNorm passes scale = beta^2: beta multiplies W_V
      and W_O at init, so it multiplies H = W_V W_O, hence lambda, by beta^2, exactly as for the
      unconstrained model.

    Args:
      key: PRNG key.
      d: width D.
      spectrum: the constraint and its init options.
      alpha: DeepNorm's residual scale (the interval is alpha * [lo, hi]).
      scale: extra factor on the initial eigenvalues (DeepNorm's beta^2).
    Returns:
      (theta, psi_D): theta a [D, D] array (orthogonal basis) or a dict (general basis), psi_D [D].
    """
    if not (isinstance(d, int) and d >= 1):
        raise ValueError(f"width d={d!r} must be a positive integer")
    k_theta, k_w, k_lam, k_sign = jax.random.split(key, 4)
    lo, hi = (-1.0, 1.0) if spectrum.mode == "free" else (spectrum.lo, spectrum.hi)
    pad = 0.05 * (hi - lo)
    if spectrum.init == "uniform":
        lam_D = jax.random.uniform(k_lam, (d,), jnp.float32, lo + pad, hi - pad)
    else:  # matched: |lambda| ~ |Re mu| of the baseline's eigenvalues mu = r e^(i phi), the mode's sign
        k_r, k_phi = jax.random.split(k_lam)
        r_D = jax.random.uniform(k_r, (d,), jnp.float32, 0.0, 1.0)
        mod_D = r_D * jnp.abs(jnp.cos(jax.random.uniform(k_phi, (d,), jnp.float32, 0.0, 2 * math.pi)))
        # Kept off the interval's ends, as "uniform" is: an eigenvalue clipped to an end has no gradient.
        if spectrum.mode in ("sharpen", "smooth"):
            mod_D = jnp.clip(mod_D, pad, hi - lo - pad)
        else:
            mod_D = jnp.minimum(mod_D, min(abs(lo), abs(hi)) - pad)
        if spectrum.mode in ("sharpen", "smooth"):
            sign_D = jnp.full((d,), -1.0 if spectrum.mode == "sharpen" else 1.0, jnp.float32)
        else:
            sign_D = jnp.where(jax.random.bernoulli(k_sign, 0.5, (d,)), 1.0, -1.0).astype(jnp.float32)
        lam_D = sign_D * mod_D
    lam_D = lam_D * (spectrum.init_scale * scale)
    psi_D = eigenvalues_inverse(lam_D, spectrum, alpha)
    if spectrum.param_scale == "width":
        # A Haar-orthogonal theta: entries of size 1 / sqrt(D) like the baseline's, and QR perfectly
        # conditioned (R = I). A square Gaussian theta's smallest singular value is ~1 / D of its largest,
        # so the last columns of Q would turn many times faster per optimiser step than the rest.
        draw = lambda key: orthogonal(jax.random.normal(key, (d, d), jnp.float32))
    else:  # the paper authors' Gaussian theta
        draw = lambda key: jax.random.normal(key, (d, d), jnp.float32)
    if spectrum.basis == "orthogonal":
        return draw(k_theta), psi_D
    return {"u": draw(k_theta), "w": draw(k_w), "s": jnp.zeros((d,), jnp.float32)}, psi_D


def _check_width(v_DxD: jnp.ndarray, lam_D: jnp.ndarray) -> None:
    if v_DxD.ndim != 2 or v_DxD.shape[0] != v_DxD.shape[1] or lam_D.shape != v_DxD.shape[:1]:
        raise ValueError(
            f"theta must give a square [D, D] basis and psi a [D] vector; got basis {v_DxD.shape}, "
            f"psi {lam_D.shape}"
        )
