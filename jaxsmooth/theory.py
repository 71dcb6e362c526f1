"""Eigen-theory of the linear residual attention layer X_{l+1} = X_l + A X_l H (docs/theory.md section 1).

Tokens are rows: X in R^{n x d}, A in R^{n x n} row-stochastic (the attention matrix, held fixed),
H = W_V W_O in R^{d x d}. Write the layer map as T(X) = X + A X H. Linear algebra runs on the host in
numpy float64; inputs may be jax or numpy arrays.

Eigen-matrices. If A v_j = lambda^A_j v_j and u_i^T H = lambda^H_i u_i^T (u_i a *left* eigenvector of
H), then A (v_j u_i^T) H = lambda^A_j lambda^H_i v_j u_i^T, so the rank-one matrix E_ij = v_j u_i^T obeys

    T(E_ij) = mu_ij E_ij,       mu_ij = 1 + lambda^A_j lambda^H_i.

Vectorised, vec(T(X)) = (I + H^T kron A) vec(X), whose n d eigenvalues are exactly the mu_ij. With
the dual bases W^T V = I (w_j^T v_k = delta_jk) and U^T R = I (u_i^T r_k = delta_ik, H r_i =
lambda^H_i r_i), a diagonalisable pair (A, H) gives X_0 = sum_ij c_ij E_ij with c_ij = w_j^T X_0 r_i and

    X_L = T^L(X_0) = sum_ij c_ij mu_ij^L E_ij = V (C * Mu^L) U^T.

Dominance. Let M = max |mu_ij| and the dominant set D = {(i, j): |mu_ij| >= (1 - tol) M}. For X_0 with a
nonzero component on D, X_L / M^L -> P_L = Re sum_{(i,j) in D} c_ij (mu_ij / M)^L E_ij with relative
error O(rate^L), rate = |mu_2| / |mu_1| = (largest |mu| outside D) / M. D is closed under complex
conjugation (real A, H), so P_L is real. Its column space lies in S_A = span{v_j : (i, j) in D} and its
row space in S_H = span{u_i : (i, j) in D}; with r_A = dim S_A, r_H = dim S_H (complex dimensions, equal
to the real dimensions of the conjugation-closed spans), rank P_L <= min(r_A, r_H), with equality for
generic X_0.

Regimes (our precise definitions; the paper states them informally), strongest first:

- "input_convergence": r_A = 1 and S_A = span{1}. Then P_L = 1 b_L^T: every token converges to the
  same vector b_L (which may still rotate from layer to layer if the dominant lambda^H are a complex
  pair, or lie anywhere in a plane if lambda^H is repeated): mean cos -> 1, HFC/LFC -> 0, res -> 0. For
  a row-stochastic A this says the only dominant A-mode is the DC mode lambda^A = 1, and it is simple.
- "angle_convergence": the angle between every pair of tokens converges (to 0 or pi): the tokens become
  collinear with *fixed* coefficients, either because r_A = 1 (one real A-eigenvector v: P_L = v b_L^T,
  any real lambda^A, e.g. a negative one), or because r_H = 1 and all dominant mu are one real value
  (P_L proportional to a u^T with a fixed). |cos| -> 1 for every pair of tokens with a nonzero
  coefficient, while cos itself need not -> 1 (the v_k may differ in sign).
- "rank_collapse": r_H = 1 but the dominant mu are not all equal, i.e. a complex-conjugate pair mu,
  conj(mu) from a complex pair of lambda^A times one real lambda^H (or a real tie mu, -mu). P_L =
  a_L u^T is rank one at every layer (sigma_2 / sigma_1 -> 0), but the token coefficients
  a_L = 2 Re(c (mu / M)^L v) rotate, so the angles do *not* converge: pairs of tokens keep flipping
  between parallel and anti-parallel (signed cosines oscillate), and |cos| dips whenever a coefficient
  crosses zero and that token's direction is set by the sub-dominant modes.
- "no_collapse": r_A >= 2 and r_H >= 2 (e.g. conjugate pairs in both A and H, or equal-modulus modes on
  distinct A- and H-eigenvectors): the limit has rank >= 2 and sigma_2 / sigma_1 stays bounded away
  from 0.

A *unique* dominant mu (|D| = 1) is necessarily real with real lambda^A and lambda^H (a complex factor
brings its conjugate pair, with the same |mu|), hence r_A = r_H = 1: a unique dominant mode always
gives angle (or input) convergence. Ties are needed to escape, but a tie prevents collapse only when it
spans at least two directions in both token and feature space: a complex pair of lambda^H on the DC
mode still gives input convergence.

Numerical tolerances: ties in |mu| use relative ``tol``; subspace dimensions and the "v parallel to 1"
test use ``sqrt(tol)`` (an eigenvalue error eps moves eigenvectors by about eps / gap).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import numpy as np
import numpy.typing as npt

REGIMES: tuple[str, ...] = ("input_convergence", "angle_convergence", "rank_collapse", "no_collapse")


def _as_matrix(x: Any, name: str, square: bool = False) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 2 or (square and arr.shape[0] != arr.shape[1]):
        raise ValueError(f"{name} must be a {'square ' if square else ''}matrix, got {arr.shape}")
    return arr


@dataclasses.dataclass(frozen=True)
class UpdateSpectrum:
    """All n*d eigenvalues mu_k = 1 + lambda^A lambda^H of X -> X + A X H, sorted by |mu| descending.

    Built by `update_spectrum`. Per pair k (length P = n*d arrays) the eigen-matrix is
    E_k = v_{idx_a[k]} u_{idx_h[k]}^T (complex n x d). Ties in |mu| are ordered by real part, then
    imaginary part, descending.

    Attributes:
      mu: [P] complex, mu_k = 1 + lam_a[k] lam_h[k].
      lam_a: [P], lambda^A_{idx_a[k]}.
      lam_h: [P], lambda^H_{idx_h[k]}.
      idx_a: [P] int, the A-eigenpair of pair k.
      idx_h: [P] int, the H-eigenpair of pair k.
      eigvals_a: [n] eigenvalues of A.
      eigvecs_a: [n, n], unit columns v_j, A v_j = lambda v_j.
      eigvals_h: [d] eigenvalues of H.
      left_eigvecs_h: [d, d], unit columns u_i, u_i^T H = lambda u_i^T.
      duals_a: [n, n], columns w_j, W^T V = I (computed on first use).
      right_eigvecs_h: [d, d], columns r_i, H r_i = lambda r_i, U^T R = I (computed on first use).
    """

    mu: np.ndarray
    lam_a: np.ndarray
    lam_h: np.ndarray
    idx_a: np.ndarray
    idx_h: np.ndarray
    eigvals_a: np.ndarray
    eigvecs_a: np.ndarray
    eigvals_h: np.ndarray
    left_eigvecs_h: np.ndarray

    # Dual bases by inversion (not by pairing left/right eigenvectors), which stays biorthogonal inside
    # repeated eigenspaces; pinv keeps defective (non-diagonalisable) inputs finite. Computed on first
    # use: predict() never needs them, and two D x D SVDs dominate the cost at BERT width.
    @functools.cached_property
    def duals_a(self) -> np.ndarray:
        return np.linalg.pinv(self.eigvecs_a).T

    @functools.cached_property
    def right_eigvecs_h(self) -> np.ndarray:
        return np.linalg.pinv(self.left_eigvecs_h).T

    def eigen_matrix(self, k: int) -> np.ndarray:
        """E_k = v_{idx_a[k]} u_{idx_h[k]}^T, with T(E_k) = mu_k E_k (complex n x d).

        Args:
          k: index of the pair (into ``mu``).

        Returns:
          E_k, complex [n, d].
        """
        return np.outer(self.eigvecs_a[:, self.idx_a[k]], self.left_eigvecs_h[:, self.idx_h[k]])

    def coefficients(self, x0_NxD: Any) -> np.ndarray:
        """c_k = w_{idx_a[k]}^T X_0 r_{idx_h[k]}, so X_0 = sum_k c_k E_k (diagonalisable A, H).

        Args:
          x0_NxD: the input X_0 [n, d].

        Returns:
          c_P, complex, in the order of ``mu``.
        """
        x0 = _as_matrix(x0_NxD, "x0")
        c_NxD = self.duals_a.T @ x0 @ self.right_eigvecs_h
        return c_NxD[self.idx_a, self.idx_h]

    def evolve(self, x0_NxD: Any, n_layers: int, pairs: npt.ArrayLike | None = None) -> np.ndarray:
        """Re sum_{k in pairs} c_k (mu_k / |mu_max|)^L E_k: T^L(X_0) / |mu_max|^L restricted to ``pairs``.

        With all pairs (default) this is the exact closed form of L layers, up to the positive factor
        |mu_max|^L (divided out so large L neither overflows nor underflows). ``pairs`` should be
        closed under conjugation (the dominant set is) for the real part to be the exact result.

        Args:
          x0_NxD: the input X_0 [n, d].
          n_layers: L.
          pairs: indices into ``mu`` of the pairs to keep; None: all.

        Returns:
          The real [n, d] matrix above.
        """
        c_P = self.coefficients(x0_NxD)
        sel = np.arange(self.mu.size) if pairs is None else np.asarray(pairs, dtype=int)
        top = abs(self.mu[0]) if abs(self.mu[0]) > 0 else 1.0
        coef = c_P[sel] * (self.mu[sel] / top) ** n_layers
        v_NxK = self.eigvecs_a[:, self.idx_a[sel]]
        u_DxK = self.left_eigvecs_h[:, self.idx_h[sel]]
        return np.real((v_NxK * coef[None, :]) @ u_DxK.T)


def update_spectrum(a_NxN: Any, h_DxD: Any) -> UpdateSpectrum:
    """Eigen-pairs of X -> X + A X H: mu_ij = 1 + lambda^A_j lambda^H_i, eigen-matrix v_j u_i^T.

    Args:
      a_NxN: the attention matrix A (jax or numpy; computed in float64).
      h_DxD: H = W_V W_O.

    Returns:
      UpdateSpectrum, the pairs sorted by |mu| descending.
    """
    a = _as_matrix(a_NxN, "A", square=True)
    h = _as_matrix(h_DxD, "H", square=True)
    lam_a, v = np.linalg.eig(a)
    # Left eigenvectors of H are right eigenvectors of H^T: H^T u = lambda u  <=>  u^T H = lambda u^T.
    lam_h, u = np.linalg.eig(h.T)
    lam_a, v = lam_a.astype(np.complex128), v.astype(np.complex128)
    lam_h, u = lam_h.astype(np.complex128), u.astype(np.complex128)
    mu_NxD = 1.0 + lam_a[:, None] * lam_h[None, :]
    ia, ih = np.meshgrid(np.arange(lam_a.size), np.arange(lam_h.size), indexing="ij")
    mu = mu_NxD.ravel()
    # np.lexsort: the last key is the primary one.
    order = np.lexsort((-mu.imag, -mu.real, -np.abs(mu)))
    ia, ih = ia.ravel()[order], ih.ravel()[order]
    return UpdateSpectrum(
        mu=mu[order],
        lam_a=lam_a[ia],
        lam_h=lam_h[ih],
        idx_a=ia,
        idx_h=ih,
        eigvals_a=lam_a,
        eigvecs_a=v,
        eigvals_h=lam_h,
        left_eigvecs_h=u,
    )


@dataclasses.dataclass(frozen=True)
class Prediction:
    """What many layers of X -> X + A X H do to a generic X_0 (see the module docstring).

    Built by `predict`.

    Attributes:
      regime: one of ``REGIMES``.
      rate: |mu_2| / |mu_1|, the next distinct modulus over the dominant one (0 if every pair is
        dominant): the relative sub-dominant part shrinks by this factor per layer.
      mu_max: |mu_1|.
      dominant: indices into ``spectrum`` of the dominant pairs (all pairs with |mu| within relative tol
        of the max).
      dominant_mu: their mu (complex, one entry per dominant pair).
      dominant_lambda_a: their lambda^A (complex).
      dominant_lambda_h: their lambda^H (complex).
      rank_a: dimension of the token span of the dominant modes.
      rank_h: dimension of the feature span of the dominant modes (the limit has rank <= min(rank_a,
        rank_h)).
      dc_dominant: the dominant token span is span{1}.
      spectrum: the `UpdateSpectrum` the prediction was read from.
    """

    regime: str
    rate: float
    mu_max: float
    dominant: np.ndarray
    dominant_mu: np.ndarray
    dominant_lambda_a: np.ndarray
    dominant_lambda_h: np.ndarray
    rank_a: int
    rank_h: int
    dc_dominant: bool
    spectrum: UpdateSpectrum

    def dominant_part(self, x0_NxD: Any, n_layers: int) -> np.ndarray:
        """P_L = Re sum_{k dominant} c_k (mu_k / |mu_1|)^L E_k, the predicted T^L(X_0) / |mu_1|^L.

        Args:
          x0_NxD: the input X_0 [n, d].
          n_layers: L.

        Returns:
          P_L, real [n, d].
        """
        return self.spectrum.evolve(x0_NxD, n_layers, self.dominant)


def _span_dim(vecs_NxK: np.ndarray, rtol: float) -> int:
    s = np.linalg.svd(vecs_NxK, compute_uv=False)
    return int(np.sum(s > rtol * s[0])) if s.size and s[0] > 0 else 0


def predict(a_NxN: Any, h_DxD: Any, tol: float = 1e-6) -> Prediction:
    """Classify the long-depth behaviour of X -> X + A X H (regime definitions: module docstring).

    Args:
      a_NxN: the attention matrix A (row-stochastic for a softmax).
      h_DxD: H = W_V W_O (or an `effective_update` matrix).
      tol: relative tolerance for ties in |mu|; subspace dimensions and the "v parallel to 1" test use
        sqrt(tol).

    Returns:
      Prediction.

    Example::

      >>> import numpy as np
      >>> from jaxsmooth import theory
      >>> a_NxN = np.full((4, 4), 0.25)  # uniform attention: only the DC token mode survives
      >>> theory.predict(a_NxN, 0.5 * np.eye(3)).regime
      'input_convergence'
    """
    spec = update_spectrum(a_NxN, h_DxD)
    mod = np.abs(spec.mu)
    m = float(mod[0])
    in_d = mod >= (1.0 - tol) * m
    dominant = np.flatnonzero(in_d)
    rest = mod[~in_d]
    rate = float(rest.max() / m) if rest.size and m > 0 else 0.0

    vtol = math.sqrt(tol)
    v_dom = spec.eigvecs_a[:, np.unique(spec.idx_a[dominant])]
    u_dom = spec.left_eigvecs_h[:, np.unique(spec.idx_h[dominant])]
    rank_a = _span_dim(v_dom, vtol)
    rank_h = _span_dim(u_dom, vtol)

    dc_dominant = False
    if rank_a == 1:
        # The span is one line; test whether it is the DC line span{1} (phase-invariant residual).
        v = v_dom[:, 0]
        dc_dominant = bool(np.linalg.norm(v - v.mean()) <= vtol * np.linalg.norm(v))
        regime = "input_convergence" if dc_dominant else "angle_convergence"
    elif rank_h == 1:
        # One feature direction u; the token coefficients are fixed iff every dominant mu is the same.
        spread = float(np.max(np.abs(spec.mu[dominant] - spec.mu[dominant[0]])))
        regime = "angle_convergence" if spread <= tol * max(m, 1e-300) else "rank_collapse"
    else:
        regime = "no_collapse"

    return Prediction(
        regime=regime,
        rate=rate,
        mu_max=m,
        dominant=dominant,
        dominant_mu=spec.mu[dominant],
        dominant_lambda_a=spec.lam_a[dominant],
        dominant_lambda_h=spec.lam_h[dominant],
        rank_a=rank_a,
        rank_h=rank_h,
        dc_dominant=dc_dominant,
        spectrum=spec,
    )


# ---------------------------------------------------------------------------------------------
# The map a transformer block really applies (docs/theory.md, "The effective map per residual type").

RESIDUALS: tuple[str, ...] = ("pre_ln", "post_ln", "deepnorm")
VALUE_NORMS: tuple[str, ...] = ("rms", "ln")


def effective_update(
    h_DxD: Any,
    ln_gain_D: Any = None,
    residual: str = "pre_ln",
    alpha: float = 1.0,
    *,
    value_norm: str = "ln",
) -> np.ndarray:
    """M_DxD: the matrix whose spectrum decides the one-step regime of a block's attention update.

    The linear theory above is about X -> X + A X M. What M is depends on where the block's LayerNorm sits
    (tokens are rows; G = diag(gain), C = I - 1 1^T / D the LayerNorm's centring over features):

    - pre_ln, value_norm="ln" (the standard pre-LN block, x <- x + Attn(LN_g(x))): the value path reads
      LN_g(x) = (x C / sigma(x)) G + b, so the update is A S X (C G H) + 1 (b^T H) with S = diag(1 / sigma)
      per token: M = C G H, up to the positive per-token scale 1 / sigma and a DC term from the LN bias.
      A negative gain flips the sign of the eigenvalues it touches. C adds one structural eigenvalue 0
      (left eigenvector 1: the feature-mean direction LayerNorm removes, which the branch cannot act on;
      it gives mu = 1 for every token mode, i.e. neither smoothing nor sharpening) and changes the others:
      the non-zero eigenvalues of C G H are those of the compression B^T G H B onto 1^perp (B an orthonormal
      basis of it). For constant G = g I and symmetric H, Cauchy interlacing keeps them inside
      g [min eig H, max eig H]; for positive but unequal gains it does not (docs/theory.md gives the
      measured violation rate), and for gains of either sign nothing is kept.
    - pre_ln, value_norm="rms" (jaxsmooth's default: the value path reads x / rms(x), no centring, no gain,
      no bias, while Q and K still read LN_g(x)): M = H, exactly, up to the positive per-token 1 / rms(x).
      The ln_gain is irrelevant.
    - post_ln (x <- LN_g(x + A x H)) and deepnorm (x <- LN_g(alpha x + A x H)): the gain multiplies skip
      and branch alike, so it does not fold into the branch: M = H / alpha; ln_gain is ignored. Exactly:
      the LayerNorm output is S (x + A x H / alpha) C G (S the positive per-token scale), so the
      linearised block is x -> (x + A x H / alpha) C G, which multiplies the skip path by C G too. For a
      uniform gain G = c I of either sign this is c (x + A x H / alpha) C: a global factor, which changes
      no |mu| ranking, times the centring, so M = H / alpha holds up to the centring (whose non-zero
      eigenvalues are those of the compression onto 1^perp, as for pre_ln). With unequal gains C G is
      not a multiple of I and the block is not of the form x + A x M for any M: H / alpha is then an
      approximation (it does not rotate the gain into H the way diag(g) H would, which is worse).
      `post_ln_smoothing` compares the DC and non-DC modes of the linearised block itself;
      tests/test_theory.py measures how often each agrees with `simulate_block`.

    Args:
      h_DxD: H = W_V W_O of the layer.
      ln_gain_D: the effective gain of the LayerNorm in front of the attention branch (after softplus for
        ln_gain="positive"). Needed only for pre_ln with value_norm="ln"; None means all ones.
      residual: "pre_ln" | "post_ln" | "deepnorm".
      alpha: DeepNorm's residual scale (1 for the other residual types).
      value_norm: "ln" | "rms": what the value path of a pre-LN block reads (ignored otherwise).
    Returns:
      M_DxD, float64.
    """
    h = _as_matrix(h_DxD, "H", square=True)
    d = h.shape[0]
    if residual not in RESIDUALS:
        raise ValueError(f"residual={residual!r} is not allowed; choose one of {', '.join(RESIDUALS)}")
    if value_norm not in VALUE_NORMS:
        raise ValueError(f"value_norm={value_norm!r} is not allowed; choose one of {', '.join(VALUE_NORMS)}")
    if not (np.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha={alpha} must be a finite number > 0")
    if residual == "pre_ln" and alpha != 1.0:
        raise ValueError(f"alpha={alpha}: only residual='deepnorm' scales the skip path (use alpha=1)")
    if residual != "pre_ln":
        return h / alpha
    if value_norm == "rms":
        return h
    g = np.ones(d) if ln_gain_D is None else np.asarray(ln_gain_D, np.float64)
    if g.shape != (d,):
        raise ValueError(f"ln_gain has shape {g.shape}; expected ({d},) for a {d}x{d} H")
    gh = g[:, None] * h  # G H
    return gh - np.mean(gh, axis=0, keepdims=True)  # C G H: subtract the column means (1 1^T / D) G H


def effective_eigenvalues(m_DxD: Any, residual: str = "pre_ln", *, value_norm: str = "ln") -> np.ndarray:
    """Eigenvalues of an `effective_update` matrix that the branch can act on, sorted by real part.

    For pre_ln with value_norm="ln" the structural zero of the centring (see `effective_update`) is left
    out: the result is the spectrum of the compression B^T M B onto the features orthogonal to 1 (D - 1
    values). Otherwise all D eigenvalues of M. Complex, float64.

    Args:
      m_DxD: the `effective_update` matrix M.
      residual: "pre_ln" | "post_ln" | "deepnorm", as given to `effective_update`.
      value_norm: "ln" | "rms", as given to `effective_update`.

    Returns:
      The eigenvalues, complex128, sorted by real part (then imaginary part), ascending.
    """
    m = _as_matrix(m_DxD, "M", square=True)
    if residual == "pre_ln" and value_norm == "ln":
        d = m.shape[0]
        # Orthonormal basis of 1^perp: the last D - 1 columns of Q from QR([1, e_1, ..., e_{D-1}]).
        q, _ = np.linalg.qr(np.concatenate([np.ones((d, 1)), np.eye(d)[:, : d - 1]], axis=1))
        b = q[:, 1:]
        m = b.T @ m @ b
    ev = np.linalg.eigvals(m).astype(np.complex128)
    return ev[np.lexsort((ev.imag, ev.real))]


@dataclasses.dataclass(frozen=True)
class DCCompetition:
    """DC versus non-DC token modes of a linearised block (see `post_ln_smoothing`).

    Attributes:
      dc_radius: the largest |mu| over the DC token mode(s) (A-eigenvector parallel to 1).
      non_dc_radius: the largest |mu| over the other token modes.
      hc_dc_rate: non_dc_radius / dc_radius (< 1: the high-frequency part shrinks relative to the DC
        part per layer, i.e. smoothing).
      dc_dominant: hc_dc_rate < 1.
    """

    dc_radius: float
    non_dc_radius: float
    hc_dc_rate: float
    dc_dominant: bool


def post_ln_smoothing(
    a_NxN: Any, h_DxD: Any, ln_gain_D: Any = None, alpha: float = 1.0, tol: float = 1e-6
) -> DCCompetition:
    """Smoothing verdict of the linearised post-LN / DeepNorm block x -> (x + A x H / alpha) C G.

    `effective_update` explains why this is the post-LN map (C = I - 1 1^T / D, G = diag(gain); the
    per-token scale of the LayerNorm is left out). Every token mode v_j of A (A v_j = lambda_j v_j) is
    kept, and the features of v_j u^T evolve by F_j = (I + lambda_j H / alpha) C G, so the modes of the
    block are mu = eig(F_j). Unlike `predict(A, H / alpha)` this keeps the gain on the skip path, which
    matters when the gains are unequal; for G = c I the two agree up to the centring. Only the DC versus
    non-DC competition is computed (no regime).

    Args:
      a_NxN: attention matrix (row-stochastic: its DC mode is lambda = 1 with eigenvector 1).
      h_DxD: H = W_V W_O.
      ln_gain_D: the gain of the LayerNorm that closes the block (None: ones).
      alpha: DeepNorm's skip scale (1 for post-LN).
      tol: eigenvectors within sqrt(tol) (relative) of span{1} count as DC, as in `predict`.
    Returns:
      DCCompetition.
    """
    a = _as_matrix(a_NxN, "A", square=True)
    h = _as_matrix(h_DxD, "H", square=True)
    d = h.shape[0]
    if not (np.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha={alpha} must be a finite number > 0")
    g = np.ones(d) if ln_gain_D is None else np.asarray(ln_gain_D, np.float64)
    if g.shape != (d,):
        raise ValueError(f"ln_gain has shape {g.shape}; expected ({d},) for a {d}x{d} H")
    lam_a, v_NxN = np.linalg.eig(a)
    resid = np.linalg.norm(v_NxN - v_NxN.mean(axis=0, keepdims=True), axis=0)
    is_dc = resid <= math.sqrt(tol) * np.linalg.norm(v_NxN, axis=0)
    cg_DxD = (np.eye(d) - 1.0 / d) * g[None, :]  # C G
    hcg_DxD = (h / alpha) @ cg_DxD
    radius = np.array([np.max(np.abs(np.linalg.eigvals(cg_DxD + lam * hcg_DxD))) for lam in lam_a])
    tiny = np.finfo(np.float64).tiny
    dc = float(radius[is_dc].max()) if is_dc.any() else 0.0
    other = float(radius[~is_dc].max()) if (~is_dc).any() else 0.0
    rate = other / max(dc, tiny)
    return DCCompetition(dc_radius=dc, non_dc_radius=other, hc_dc_rate=rate, dc_dominant=bool(rate < 1.0))


# ---------------------------------------------------------------------------------------------
# Simulation with float64 numpy metrics (same definitions as jaxsmooth.metrics, batched over layers).


@dataclasses.dataclass(frozen=True)
class Simulation:
    """Per-layer metrics of a simulated stack, each [n_layers + 1] (index 0 = the input X_0), or
    [n_layers + 1, *batch] for a batch of stacks (`simulate_block`); x_final is [*batch, n, d].

    The metrics have the definitions of `jaxsmooth.metrics` (float64, no padding).

    Attributes:
      token_cosine: mean pairwise cosine of distinct tokens.
      abs_cosine: mean pairwise |cosine| of distinct tokens.
      hfc_lfc: ||HC[X]||_F / ||DC[X]||_F.
      sv_ratio: sigma_2 / sigma_1.
      x_final: the last layer's X.
    """

    token_cosine: np.ndarray
    abs_cosine: np.ndarray
    hfc_lfc: np.ndarray
    sv_ratio: np.ndarray
    x_final: np.ndarray


def _np_metrics(x_LxNxD: np.ndarray) -> dict[str, np.ndarray]:
    """token_cosine, abs_cosine, hfc_lfc, sv_ratio for a stack of n x d matrices (float64).

    x_LxNxD may carry more leading axes ([L, ..., N, D]); every metric then has shape [L, ...].
    """
    n = x_LxNxD.shape[-2]
    tiny = np.finfo(np.float64).tiny
    norm_LxN = np.linalg.norm(x_LxNxD, axis=-1)
    u_LxNxD = x_LxNxD / np.where(norm_LxN > tiny, norm_LxN, np.inf)[..., None]
    gram_LxNxN = u_LxNxD @ np.swapaxes(u_LxNxD, -1, -2)
    offdiag_NxN = 1.0 - np.eye(n)
    pairs = max(n * (n - 1), 1)
    cos_L = np.sum(gram_LxNxN * offdiag_NxN, axis=(-1, -2)) / pairs
    abs_L = np.sum(np.abs(gram_LxNxN) * offdiag_NxN, axis=(-1, -2)) / pairs
    mean_LxD = x_LxNxD.mean(axis=-2)
    hc2_L = np.sum((x_LxNxD - mean_LxD[..., None, :]) ** 2, axis=(-1, -2))
    dc2_L = n * np.sum(mean_LxD**2, axis=-1)
    # Same relative guard as jaxsmooth.metrics: 1e6 cap when the mean is exactly 0, 0 for X = 0.
    hfc_L = np.sqrt(hc2_L / (dc2_L + 1e-12 * (hc2_L + dc2_L) + tiny))
    s_LxK = np.linalg.svd(x_LxNxD, compute_uv=False)
    if s_LxK.shape[-1] >= 2:
        sv_L = s_LxK[..., 1] / np.maximum(s_LxK[..., 0], tiny)
    else:
        sv_L = np.zeros(x_LxNxD.shape[:-2])
    return {"token_cosine": cos_L, "abs_cosine": abs_L, "hfc_lfc": hfc_L, "sv_ratio": sv_L}


def _layernorm(y_NxD: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """Parameter-free LayerNorm over features (per token): (y - mean) / sqrt(var + eps)."""
    centred = y_NxD - y_NxD.mean(axis=-1, keepdims=True)
    return centred / np.sqrt(np.mean(centred**2, axis=-1, keepdims=True) + eps)


def simulate(x0_NxD: Any, a_NxN: Any, h_DxD: Any, n_layers: int, layernorm: bool = False) -> Simulation:
    """Iterate X <- X + A X H for ``n_layers`` layers and measure every layer.

    Without LayerNorm each step is divided by its Frobenius norm: all reported metrics are scale
    free, and this keeps |mu|^L from overflowing or underflowing. With ``layernorm=True`` the step is
    X <- LN(X + A X H) with a parameter-free LayerNorm over features (which already fixes the scale).

    Args:
      x0_NxD: the input X_0 (tokens are rows).
      a_NxN: the attention matrix A.
      h_DxD: H = W_V W_O.
      n_layers: number of layers.
      layernorm: X <- LN(X + A X H) instead of the Frobenius-normalised step.

    Returns:
      Simulation with the metrics of X_0 .. X_{n_layers} ([n_layers + 1]) and the final X (normalised
      as above).
    """
    x = _as_matrix(x0_NxD, "x0")
    a = _as_matrix(a_NxN, "A", square=True)
    h = _as_matrix(h_DxD, "H", square=True)
    xs_LxNxD = np.empty((n_layers + 1,) + x.shape)
    xs_LxNxD[0] = x
    for layer in range(1, n_layers + 1):
        y = x + a @ x @ h
        if layernorm:
            x = _layernorm(y)
        else:
            norm = np.linalg.norm(y)
            x = y / norm if norm > 0 else y
        xs_LxNxD[layer] = x
    stats = _np_metrics(xs_LxNxD)
    return Simulation(x_final=x, **stats)


def _ln_affine(y_NxD: np.ndarray, gain_D: np.ndarray, bias_D: np.ndarray, eps: float) -> np.ndarray:
    """LayerNorm over features with gain and bias: (y - mean) / sqrt(var + eps) * gain + bias."""
    return _layernorm(y_NxD, eps) * gain_D[..., None, :] + bias_D[..., None, :]


def _batched(x: Any, name: str, core: int) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim < core:
        raise ValueError(f"{name} needs at least {core} axes, got shape {arr.shape}")
    return arr


def simulate_block(
    x0_NxD: Any,
    a_NxN: Any,
    h_DxD: Any,
    n_layers: int,
    residual: str = "post_ln",
    *,
    ln_gain_D: Any = None,
    ln_bias_D: Any = None,
    alpha: float = 1.0,
    value_norm: str = "ln",
    eps: float = 1e-6,
) -> Simulation:
    """Iterate ``n_layers`` identical LayerNorm residual attention blocks (A, H fixed) in float64.

    The attention sub-layer of each residual type, with the LayerNorm LN_{g,b}(y) = (y - mean(y)) /
    sqrt(var(y) + eps) * g + b over the features of each token (row):

    - pre_ln, value_norm="ln":  X <- X + A LN_{g,b}(X) H   (the standard pre-LN block's value path)
    - pre_ln, value_norm="rms": X <- X + A (X / rms(X)) H   (rms over features; g and b unused)
    - post_ln:                  X <- LN_{g,b}(X + A X H)
    - deepnorm:                 X <- LN_{g,b}(alpha X + A X H)

    There is no MLP, and A does not depend on X. The pre-LN stream is not renormalised (the branch reads
    a normalised X, so X grows at most linearly with depth and nothing overflows); the metrics are
    scale-free. `effective_update` gives the matrix M whose `predict(A, M)` these stacks are compared
    with; tests/test_theory.py measures how often the two agree.

    Every array may carry leading batch axes (broadcast against each other), which simulates many
    stacks at once: e.g. x0 [B, N, D], A [B, N, N], H [B, D, D], gains [B, D].

    Args:
      x0_NxD: the input X_0 [..., N, D] (tokens are rows).
      a_NxN: the attention matrix [..., N, N] (row-stochastic for a softmax; any matrix is accepted).
      h_DxD: H = W_V W_O [..., D, D].
      n_layers: number of blocks.
      residual: "pre_ln" | "post_ln" | "deepnorm".
      ln_gain_D, ln_bias_D: the LayerNorm's gain g [..., D] (None: ones) and bias b (None: zeros), any
        signs.
      alpha: DeepNorm's skip scale (must be 1 for the other residual types).
      value_norm: "ln" | "rms", what a pre-LN value path reads (ignored otherwise: post-LN and DeepNorm
        branches read the residual stream).
      eps: the LayerNorm / rms epsilon.
    Returns:
      Simulation with the metrics of X_0 .. X_{n_layers} ([n_layers + 1, *batch]) and the final X.
    """
    x = _batched(x0_NxD, "x0", 2)
    a = _batched(a_NxN, "A", 2)
    h = _batched(h_DxD, "H", 2)
    n, d = x.shape[-2:]
    if a.shape[-2:] != (n, n) or h.shape[-2:] != (d, d):
        raise ValueError(f"shapes do not chain: X_0 {x.shape}, A {a.shape}, H {h.shape}")
    if residual not in RESIDUALS:
        raise ValueError(f"residual={residual!r} is not allowed; choose one of {', '.join(RESIDUALS)}")
    if value_norm not in VALUE_NORMS:
        raise ValueError(f"value_norm={value_norm!r} is not allowed; choose one of {', '.join(VALUE_NORMS)}")
    if not (np.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha={alpha} must be a finite number > 0")
    if residual != "deepnorm" and alpha != 1.0:
        raise ValueError(f"alpha={alpha}: only residual='deepnorm' scales the skip path (use alpha=1)")
    g = np.ones(d) if ln_gain_D is None else _batched(ln_gain_D, "ln_gain", 1)
    b = np.zeros(d) if ln_bias_D is None else _batched(ln_bias_D, "ln_bias", 1)
    if g.shape[-1] != d or b.shape[-1] != d:
        raise ValueError(f"ln_gain {g.shape} and ln_bias {b.shape} must end in D={d}")
    batch = np.broadcast_shapes(x.shape[:-2], a.shape[:-2], h.shape[:-2], g.shape[:-1], b.shape[:-1])
    x = np.broadcast_to(x, batch + (n, d))
    xs_LxNxD = np.empty((n_layers + 1,) + x.shape)
    xs_LxNxD[0] = x
    for layer in range(1, n_layers + 1):
        if residual == "pre_ln":
            if value_norm == "ln":
                v_NxD = _ln_affine(x, g, b, eps)
            else:
                v_NxD = x / np.sqrt(np.mean(x**2, axis=-1, keepdims=True) + eps)
            x = x + a @ v_NxD @ h
        else:
            x = _ln_affine(alpha * x + a @ x @ h, g, b, eps)
        xs_LxNxD[layer] = x
    return Simulation(x_final=x, **_np_metrics(xs_LxNxD))
