"""Oversmoothing metrics on token batches (docs/theory.md section 4).

Every metric takes ``x_BxTxD`` (B examples, T token slots, D features; tokens are rows, as in
X in R^{n x d} of docs/theory.md) and an optional ``mask_BxT`` (nonzero = real token, 0 = padding) and
returns one value per example, shape [B]; callers average. Padding tokens are excluded from every
statistic: below, n is the number of real tokens of an example and sum_i runs over real tokens only.

Notation (one example): rows x_i, token mean m = (1/n) sum_i x_i, normalised tokens
u_i = x_i / ||x_i|| (u_i = 0 for an all-zero token, whose cosine with anything is taken as 0), and
the DC / HC split of Wang et al. (2022):

    DC[X] = (1/n) 1 1^T X = 1 m^T,      HC[X] = X - DC[X],
    ||X||_F^2 = ||DC[X]||_F^2 + ||HC[X]||_F^2                 (the split is orthogonal),
    ||DC[X]||_F^2 = n ||m||^2,           ||HC[X]||_F^2 = sum_i ||x_i - m||^2.

Metrics (all but ``singular_values`` are scale free: invariant under X -> c X, c != 0):

    token_cosine     = 1/(n(n-1)) sum_{i != j} u_i.u_j
                     = (||sum_i u_i||^2 - sum_i ||u_i||^2) / (n(n-1))                O(nd)
    token_abs_cosine = 1/(n(n-1)) sum_{i != j} |u_i.u_j|           (Gram matrix,   O(n^2 d))
    hfc_lfc          = ||HC[X]||_F / ||DC[X]||_F                   (Wang et al. 2022, O(nd))
    res_norm         = min_x ||X - 1 x^T||_F / ||X||_F = ||HC[X]||_F / ||X||_F  in [0, 1]
                       (Dong et al. 2021 residual; the minimiser is x = m; we use the Frobenius norm
                       and divide by ||X||_F so the value is scale free, 0 = all tokens equal)
    dirichlet        = [1/(2 n^2) sum_{i,j} ||x_i - x_j||^2] / [(1/n) sum_i ||x_i||^2]
                       (complete-graph Dirichlet energy with uniform weights 1/n, normalised by the
                       mean squared token norm). O(nd) identity:
                       1/(2n) sum_{i,j} ||x_i - x_j||^2 = sum_i ||x_i - m||^2, so
                       dirichlet = ||HC[X]||_F^2 / ||X||_F^2 = res_norm^2  in [0, 1].
    singular_values  = sigma_1 >= sigma_2 >= ... of X (padding rows are zeroed, adding only zeros)
    sv_ratio         = sigma_2 / sigma_1
    effective_rank   = exp(-sum_k p_k log p_k),  p_k = sigma_k / sum_l sigma_l  (Roy & Vetterli 2007)

The public functions are wrapped in jax.jit (``full`` of ``layer_stats`` is static), so eager calls
compile once per shape; inside a caller's jit or scan they are simply inlined.

Numerics: inputs are computed in at least float32 (bf16 is upcast). Each example is first divided by
its largest |entry| over real tokens: the metrics are scale free, so this changes nothing
mathematically but keeps squared norms far from float32 overflow and underflow. Denominators are
guarded so an all-zero example gives 0 for every metric (effective_rank 0 too) and never NaN.
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp

from jaxsmooth import linalg

# Keys of ``layer_stats`` (batch-averaged scalars), stable so per-layer [L] arrays keep their names:
#   token_cosine   mean pairwise cosine of distinct real tokens (1 = all tokens parallel)
#   hfc_lfc        ||HC[X]||_F / ||DC[X]||_F (0 = all tokens equal, grows when sharpening)
#   res_norm       ||X - 1 m^T||_F / ||X||_F (Dong et al. residual, relative; 0 = all tokens equal)
#   dirichlet      normalised complete-graph Dirichlet energy (= res_norm^2)
LAYER_STAT_KEYS: tuple[str, ...] = ("token_cosine", "hfc_lfc", "res_norm", "dirichlet")
# Extra keys of ``layer_stats(..., full=True)``; they need an SVD per example:
#   sv_ratio       sigma_2 / sigma_1 (0 = rank one)
#   effective_rank exp(entropy of sigma / sum(sigma))
FULL_LAYER_STAT_KEYS: tuple[str, ...] = LAYER_STAT_KEYS + ("sv_ratio", "effective_rank")

# Relative floor for the HFC/LFC denominator: caps the ratio at 1/sqrt(_REL_EPS) = 1e6 when the DC
# component vanishes (a scale-free guard, so scale invariance is kept).
_REL_EPS = 1e-12


def _prepare(
    x_BxTxD: jax.Array, mask_BxT: jax.Array | None
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Upcast, zero the padding, rescale each example to max |entry| = 1.

    Returns (x_BxTxD, m_BxT in {0, 1}, n_B real-token counts, scale_B with x_in = scale * x_out).
    """
    x_BxTxD = jnp.asarray(x_BxTxD)
    # The public boundary: a [B, T, D] float batch and a [B, T] mask (chex names the bad input).
    chex.assert_rank(x_BxTxD, 3)
    chex.assert_type(x_BxTxD, float)
    if mask_BxT is not None:
        chex.assert_shape(mask_BxT, x_BxTxD.shape[:2])
    dtype = jnp.promote_types(x_BxTxD.dtype, jnp.float32)
    x_BxTxD = x_BxTxD.astype(dtype)
    if mask_BxT is None:
        m_BxT = jnp.ones(x_BxTxD.shape[:2], dtype)
    else:
        m_BxT = (jnp.asarray(mask_BxT) != 0).astype(dtype)
    # where (not multiply) so garbage in padding slots, even inf/NaN, cannot leak in.
    x_BxTxD = jnp.where(m_BxT[:, :, None] > 0, x_BxTxD, 0)
    scale_B = jnp.max(jnp.abs(x_BxTxD), axis=(1, 2))
    scale_B = jnp.where(scale_B > 0, scale_B, 1)
    x_BxTxD = x_BxTxD / scale_B[:, None, None]
    n_B = jnp.sum(m_BxT, axis=1)
    return x_BxTxD, m_BxT, n_B, scale_B


def _tiny(x: jax.Array) -> jax.Array:
    return jnp.asarray(jnp.finfo(x.dtype).tiny, x.dtype)


def _unit_tokens(x_BxTxD: jax.Array) -> jax.Array:
    """u_i = x_i / ||x_i||, and u_i = 0 for (numerically) zero tokens so no NaN appears."""
    sq_BxT = jnp.sum(jnp.square(x_BxTxD), axis=-1)
    tiny = _tiny(x_BxTxD)
    inv_BxT = jnp.where(sq_BxT > tiny, jax.lax.rsqrt(jnp.maximum(sq_BxT, tiny)), 0)
    return x_BxTxD * inv_BxT[:, :, None]


def _hc_dc(x_BxTxD: jax.Array, m_BxT: jax.Array, n_B: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(||HC[X]||_F^2, ||DC[X]||_F^2) per example, over real tokens.

    ||HC||^2 is summed directly as sum_i ||x_i - m||^2 rather than ||X||^2 - n||m||^2: the latter
    cancels catastrophically in float32 exactly when tokens are nearly equal, the regime of interest.
    """
    mean_BxD = jnp.sum(x_BxTxD, axis=1) / jnp.maximum(n_B, 1)[:, None]
    dev_BxT = jnp.sum(jnp.square(x_BxTxD - mean_BxD[:, None, :]), axis=-1)
    hc2_B = jnp.sum(dev_BxT * m_BxT, axis=1)
    dc2_B = n_B * jnp.sum(jnp.square(mean_BxD), axis=-1)
    return hc2_B, dc2_B


def _pair_count(n_B: jax.Array) -> jax.Array:
    """n(n-1), the number of ordered pairs i != j; 1 when n < 2 so the mean is 0, not NaN."""
    pairs_B = n_B * (n_B - 1)
    return jnp.where(pairs_B > 0, pairs_B, 1)


def _cosine_from_unit(u_BxTxD: jax.Array, n_B: jax.Array) -> jax.Array:
    # sum_{i != j} u_i.u_j = ||sum_i u_i||^2 - sum_i ||u_i||^2 (the diagonal of the Gram matrix);
    # using sum ||u_i||^2 instead of n keeps zero tokens exactly at cosine 0.
    sum_BxD = jnp.sum(u_BxTxD, axis=1)
    diag_B = jnp.sum(jnp.square(u_BxTxD), axis=(1, 2))
    return (jnp.sum(jnp.square(sum_BxD), axis=-1) - diag_B) / _pair_count(n_B)


@jax.jit
def token_cosine(x_BxTxD: jax.Array, mask_BxT: jax.Array | None = None) -> jax.Array:
    """Mean cosine similarity over ordered pairs of distinct real tokens, [B]; O(T D).

    An all-zero token has cosine 0 with every other token; fewer than two real tokens give 0.

    Args:
      x_BxTxD: B examples of T tokens with D features, any float dtype (computed in at least float32).
      mask_BxT: nonzero = real token, 0 = padding (excluded); None: every token is real.

    Returns:
      token_cosine [B], in [-1, 1] (1 = all tokens parallel).
    """
    x_BxTxD, _, n_B, _ = _prepare(x_BxTxD, mask_BxT)
    return _cosine_from_unit(_unit_tokens(x_BxTxD), n_B)


@jax.jit
def token_abs_cosine(x_BxTxD: jax.Array, mask_BxT: jax.Array | None = None) -> jax.Array:
    """Mean |cosine| over ordered pairs of distinct real tokens, [B]; O(T^2 D) (needs the Gram).

    Args:
      x_BxTxD: B examples of T tokens with D features, any float dtype (computed in at least float32).
      mask_BxT: nonzero = real token, 0 = padding (excluded); None: every token is real.

    Returns:
      token_abs_cosine [B], in [0, 1].
    """
    x_BxTxD, _, n_B, _ = _prepare(x_BxTxD, mask_BxT)
    u_BxTxD = _unit_tokens(x_BxTxD)
    gram_BxTxT = jnp.einsum("btd,bsd->bts", u_BxTxD, u_BxTxD)
    t = x_BxTxD.shape[1]
    # Padding rows of u are zero, so only the diagonal needs removing.
    offdiag_TxT = 1 - jnp.eye(t, dtype=gram_BxTxT.dtype)
    total_B = jnp.sum(jnp.abs(gram_BxTxT) * offdiag_TxT[None], axis=(1, 2))
    return total_B / _pair_count(n_B)


def _hfc_lfc_from(hc2_B: jax.Array, dc2_B: jax.Array) -> jax.Array:
    # Relative floor: an all-zero example gives 0/tiny = 0, a zero-mean one gives 1/sqrt(_REL_EPS).
    den_B = dc2_B + _REL_EPS * (hc2_B + dc2_B) + _tiny(hc2_B)
    return jnp.sqrt(hc2_B / den_B)


def _dirichlet_from(hc2_B: jax.Array, dc2_B: jax.Array) -> jax.Array:
    # ||X||_F^2 = ||HC||^2 + ||DC||^2 (orthogonal split), so the ratio is in [0, 1] by construction.
    return hc2_B / (hc2_B + dc2_B + _tiny(hc2_B))


@jax.jit
def hfc_lfc(x_BxTxD: jax.Array, mask_BxT: jax.Array | None = None) -> jax.Array:
    """||HC[X]||_F / ||DC[X]||_F with DC[X] = 1 m^T the real-token mean (Wang et al. 2022), [B].

    Capped at 1e6 (relative guard) when the token mean is exactly zero; 0 for an all-zero example.

    Args:
      x_BxTxD: B examples of T tokens with D features, any float dtype (computed in at least float32).
      mask_BxT: nonzero = real token, 0 = padding (excluded); None: every token is real.

    Returns:
      hfc_lfc [B] (0 = all tokens equal, grows when sharpening).
    """
    x_BxTxD, m_BxT, n_B, _ = _prepare(x_BxTxD, mask_BxT)
    return _hfc_lfc_from(*_hc_dc(x_BxTxD, m_BxT, n_B))


@jax.jit
def res_norm(x_BxTxD: jax.Array, mask_BxT: jax.Array | None = None) -> jax.Array:
    """Relative Dong et al. (2021) residual min_x ||X - 1 x^T||_F / ||X||_F, [B], in [0, 1].

    The minimiser is the token mean m, so this is ||HC[X]||_F / ||X||_F. Normalisation (our choice):
    Frobenius norm (Dong et al. use a composite l1/l_inf norm) divided by ||X||_F for scale freedom.

    Args:
      x_BxTxD: B examples of T tokens with D features, any float dtype (computed in at least float32).
      mask_BxT: nonzero = real token, 0 = padding (excluded); None: every token is real.

    Returns:
      res_norm [B], in [0, 1] (0 = all tokens equal).
    """
    x_BxTxD, m_BxT, n_B, _ = _prepare(x_BxTxD, mask_BxT)
    return jnp.sqrt(_dirichlet_from(*_hc_dc(x_BxTxD, m_BxT, n_B)))


@jax.jit
def dirichlet_energy(x_BxTxD: jax.Array, mask_BxT: jax.Array | None = None) -> jax.Array:
    """Normalised complete-graph Dirichlet energy, [B], in [0, 1].

    E = [1/(2 n^2) sum_{i,j} ||x_i - x_j||^2] / [(1/n) ||X||_F^2] = sum_i ||x_i - m||^2 / ||X||_F^2,
    computed in O(T D) through the token mean (equals res_norm^2).

    Args:
      x_BxTxD: B examples of T tokens with D features, any float dtype (computed in at least float32).
      mask_BxT: nonzero = real token, 0 = padding (excluded); None: every token is real.

    Returns:
      dirichlet energy [B], in [0, 1].
    """
    x_BxTxD, m_BxT, n_B, _ = _prepare(x_BxTxD, mask_BxT)
    return _dirichlet_from(*_hc_dc(x_BxTxD, m_BxT, n_B))


def _svals(x_BxTxD: jax.Array) -> jax.Array:
    return linalg.svdvals(x_BxTxD)  # deadlock-free on multi-device CPU (jaxsmooth/linalg.py)


@jax.jit
def singular_values(x_BxTxD: jax.Array, mask_BxT: jax.Array | None = None) -> jax.Array:
    """Singular values of each example's real-token matrix, descending, [B, min(T, D)].

    Padding rows are zeroed, which only appends zero singular values. The one metric here that is not
    scale free: the values are those of the input X.

    Args:
      x_BxTxD: B examples of T tokens with D features, any float dtype (computed in at least float32).
      mask_BxT: nonzero = real token, 0 = padding (excluded); None: every token is real.

    Returns:
      [B, min(T, D)] singular values, descending.
    """
    x_BxTxD, _, _, scale_B = _prepare(x_BxTxD, mask_BxT)
    return _svals(x_BxTxD) * scale_B[:, None]


def _sv_ratio_from(s_BxK: jax.Array) -> jax.Array:
    if s_BxK.shape[1] < 2:
        return jnp.zeros(s_BxK.shape[:1], s_BxK.dtype)
    return s_BxK[:, 1] / jnp.maximum(s_BxK[:, 0], _tiny(s_BxK))


def _effective_rank_from(s_BxK: jax.Array) -> jax.Array:
    total_B = jnp.sum(s_BxK, axis=1)
    p_BxK = s_BxK / jnp.maximum(total_B, _tiny(s_BxK))[:, None]
    # p log p -> 0 as p -> 0; the inner where keeps log (and its gradient) away from 0.
    plogp_BxK = jnp.where(p_BxK > 0, p_BxK * jnp.log(jnp.where(p_BxK > 0, p_BxK, 1)), 0)
    erank_B = jnp.exp(-jnp.sum(plogp_BxK, axis=1))
    # The zero matrix has rank 0 (exp(0) = 1 would claim one direction).
    return jnp.where(total_B > 0, erank_B, 0)


@jax.jit
def sv_ratio(x_BxTxD: jax.Array, mask_BxT: jax.Array | None = None) -> jax.Array:
    """sigma_2 / sigma_1 per example, [B] (0 for rank <= 1 and when min(T, D) < 2).

    Args:
      x_BxTxD: B examples of T tokens with D features, any float dtype (computed in at least float32).
      mask_BxT: nonzero = real token, 0 = padding (excluded); None: every token is real.

    Returns:
      sv_ratio [B], in [0, 1] (0 = rank one).
    """
    x_BxTxD, _, _, _ = _prepare(x_BxTxD, mask_BxT)
    return _sv_ratio_from(_svals(x_BxTxD))


@jax.jit
def effective_rank(x_BxTxD: jax.Array, mask_BxT: jax.Array | None = None) -> jax.Array:
    """Roy & Vetterli (2007) effective rank exp(H(sigma / sum sigma)), [B]; 0 for a zero example.

    Args:
      x_BxTxD: B examples of T tokens with D features, any float dtype (computed in at least float32).
      mask_BxT: nonzero = real token, 0 = padding (excluded); None: every token is real.

    Returns:
      effective_rank [B], in [0, min(T, D)] (1 for a rank-one example).
    """
    x_BxTxD, _, _, _ = _prepare(x_BxTxD, mask_BxT)
    return _effective_rank_from(_svals(x_BxTxD))


@functools.partial(jax.jit, static_argnames="full")
def layer_stats(
    x_BxTxD: jax.Array, mask_BxT: jax.Array | None = None, *, full: bool = False
) -> dict[str, jax.Array]:
    """Batch-averaged smoothing statistics of one layer's residual stream (scalars).

    Returns the keys ``LAYER_STAT_KEYS`` (all O(T D)), plus ``sv_ratio`` and ``effective_rank`` when
    ``full`` (one SVD per example), i.e. ``FULL_LAYER_STAT_KEYS``. Shared pieces (unit tokens,
    HC/DC norms) are computed once, so this is cheap enough to run inside a model's layer scan.

    Args:
      x_BxTxD: B examples of T tokens with D features, any float dtype (computed in at least float32).
      mask_BxT: nonzero = real token, 0 = padding (excluded); None: every token is real.
      full: also compute ``sv_ratio`` and ``effective_rank`` (one SVD per example). A Python bool
        (static under jit).

    Returns:
      Dict from each key of ``LAYER_STAT_KEYS`` (``FULL_LAYER_STAT_KEYS`` with ``full``) to the metric's
      mean over the batch, a scalar.

    Example::

      >>> import jax, jax.numpy as jnp
      >>> from jaxsmooth import metrics
      >>> x_BxTxD = jax.random.normal(jax.random.key(0), (2, 8, 16))
      >>> stats = metrics.layer_stats(x_BxTxD, full=True)
      >>> sorted(stats) == sorted(metrics.FULL_LAYER_STAT_KEYS)
      True
      >>> same_BxTxD = jnp.ones((2, 8, 16))  # every token equal: fully smoothed
      >>> {k: round(float(v), 4) for k, v in metrics.layer_stats(same_BxTxD).items()}
      {'dirichlet': 0.0, 'hfc_lfc': 0.0, 'res_norm': 0.0, 'token_cosine': 1.0}
    """
    x_BxTxD, m_BxT, n_B, _ = _prepare(x_BxTxD, mask_BxT)
    hc2_B, dc2_B = _hc_dc(x_BxTxD, m_BxT, n_B)
    dirichlet_B = _dirichlet_from(hc2_B, dc2_B)
    per_example = {
        "token_cosine": _cosine_from_unit(_unit_tokens(x_BxTxD), n_B),
        "hfc_lfc": _hfc_lfc_from(hc2_B, dc2_B),
        "res_norm": jnp.sqrt(dirichlet_B),
        "dirichlet": dirichlet_B,
    }
    if full:
        s_BxK = _svals(x_BxTxD)
        per_example["sv_ratio"] = _sv_ratio_from(s_BxK)
        per_example["effective_rank"] = _effective_rank_from(s_BxK)
    return {k: jnp.mean(v) for k, v in per_example.items()}
