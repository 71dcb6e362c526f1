"""Properties of jaxsmooth.metrics: fixed points, brute-force float64 oracles, invariances, numerics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsmooth import metrics

PER_EXAMPLE = {
    "token_cosine": metrics.token_cosine,
    "token_abs_cosine": metrics.token_abs_cosine,
    "hfc_lfc": metrics.hfc_lfc,
    "res_norm": metrics.res_norm,
    "dirichlet": metrics.dirichlet_energy,
    "sv_ratio": metrics.sv_ratio,
    "effective_rank": metrics.effective_rank,
}


@jax.jit
def _all_metrics(x_BxTxD, mask_BxT=None):
    """Every per-example metric in one compiled call (one compile per shape keeps the file fast)."""
    return {name: fn(x_BxTxD, mask_BxT) for name, fn in PER_EXAMPLE.items()}


# ---------------------------------------------------------------------------------------------
# Brute-force float64 oracles, O(n^2 d), written from the definitions (pairs, explicit DC matrix).


def _bf_cosines(x_NxD: np.ndarray) -> tuple[float, float]:
    n = x_NxD.shape[0]
    cos, acos = [], []
    for i in range(n):
        for j in range(n):
            if i == j:
                continue
            c = x_NxD[i] @ x_NxD[j] / (np.linalg.norm(x_NxD[i]) * np.linalg.norm(x_NxD[j]))
            cos.append(c)
            acos.append(abs(c))
    return float(np.mean(cos)), float(np.mean(acos))


def _bf_stats(x_NxD: np.ndarray) -> dict[str, float]:
    n = x_NxD.shape[0]
    dc_NxD = np.ones((n, n)) @ x_NxD / n
    hc_NxD = x_NxD - dc_NxD
    pair_sq = sum(np.sum((x_NxD[i] - x_NxD[j]) ** 2) for i in range(n) for j in range(n))
    dirichlet = (pair_sq / (2 * n**2)) / (np.sum(x_NxD**2) / n)
    s = np.linalg.svd(x_NxD, compute_uv=False)
    p = s / s.sum()
    cos, acos = _bf_cosines(x_NxD)
    return {
        "token_cosine": cos,
        "token_abs_cosine": acos,
        "hfc_lfc": np.linalg.norm(hc_NxD) / np.linalg.norm(dc_NxD),
        "res_norm": np.linalg.norm(hc_NxD) / np.linalg.norm(x_NxD),
        "dirichlet": dirichlet,
        "sv_ratio": s[1] / s[0],
        "effective_rank": float(np.exp(-np.sum(p * np.log(p)))),
    }


def _random_batch(seed: int, b: int = 3, t: int = 7, d: int = 5) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # A shared offset makes the tokens correlated so the metrics sit away from their trivial values.
    return rng.normal(size=(b, t, d)) + rng.normal(size=(b, 1, d))


@pytest.mark.parametrize("name", sorted(PER_EXAMPLE))
def test_matches_bruteforce_float64(name):
    x_BxTxD = _random_batch(0)
    got_B = np.asarray(PER_EXAMPLE[name](jnp.asarray(x_BxTxD, jnp.float32)))
    want_B = np.array([_bf_stats(x)[name] for x in x_BxTxD])
    np.testing.assert_allclose(got_B, want_B, rtol=2e-5, atol=2e-6)


def test_res_norm_mean_is_the_minimiser():
    # min_x ||X - 1 x^T||_F is attained at the token mean: any perturbation of it does worse.
    x_NxD = _random_batch(1)[0]
    rng = np.random.default_rng(1)
    best = np.linalg.norm(x_NxD - x_NxD.mean(0))
    for _ in range(20):
        other = x_NxD.mean(0) + 0.1 * rng.normal(size=x_NxD.shape[1])
        assert np.linalg.norm(x_NxD - other) > best
    got = float(metrics.res_norm(jnp.asarray(x_NxD[None], jnp.float32))[0])
    np.testing.assert_allclose(got, best / np.linalg.norm(x_NxD), rtol=1e-5)


def test_dirichlet_is_res_norm_squared():
    x_BxTxD = jnp.asarray(_random_batch(2), jnp.float32)
    np.testing.assert_allclose(metrics.dirichlet_energy(x_BxTxD), metrics.res_norm(x_BxTxD) ** 2, rtol=1e-5)


def test_identical_tokens_are_fully_smoothed():
    row_BxD = np.random.default_rng(3).normal(size=(2, 6))
    x_BxTxD = jnp.asarray(np.repeat(row_BxD[:, None, :], 5, axis=1), jnp.float32)
    np.testing.assert_allclose(metrics.token_cosine(x_BxTxD), 1.0, atol=1e-6)
    np.testing.assert_allclose(metrics.token_abs_cosine(x_BxTxD), 1.0, atol=1e-6)
    np.testing.assert_allclose(metrics.hfc_lfc(x_BxTxD), 0.0, atol=1e-6)
    np.testing.assert_allclose(metrics.res_norm(x_BxTxD), 0.0, atol=1e-6)
    np.testing.assert_allclose(metrics.dirichlet_energy(x_BxTxD), 0.0, atol=1e-12)
    np.testing.assert_allclose(metrics.sv_ratio(x_BxTxD), 0.0, atol=1e-6)
    np.testing.assert_allclose(metrics.effective_rank(x_BxTxD), 1.0, atol=1e-5)


def test_orthonormal_tokens_have_zero_cosine():
    q_DxD, _ = np.linalg.qr(np.random.default_rng(4).normal(size=(6, 6)))
    x_BxTxD = jnp.asarray(q_DxD.T[None, :4], jnp.float32)  # 4 orthonormal tokens in R^6
    np.testing.assert_allclose(metrics.token_cosine(x_BxTxD), 0.0, atol=1e-6)
    np.testing.assert_allclose(metrics.token_abs_cosine(x_BxTxD), 0.0, atol=1e-6)
    np.testing.assert_allclose(metrics.effective_rank(x_BxTxD), 4.0, atol=1e-4)


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_effective_rank_of_equal_singular_values(k):
    rng = np.random.default_rng(k)
    u_TxK, _ = np.linalg.qr(rng.normal(size=(8, k)))
    v_DxK, _ = np.linalg.qr(rng.normal(size=(6, k)))
    x_BxTxD = jnp.asarray((3.0 * u_TxK @ v_DxK.T)[None], jnp.float32)
    np.testing.assert_allclose(metrics.effective_rank(x_BxTxD), float(k), rtol=1e-4)
    s_BxK = metrics.singular_values(x_BxTxD)
    assert s_BxK.shape == (1, 6)
    np.testing.assert_allclose(s_BxK[0, :k], 3.0, rtol=1e-5)


def test_padding_is_ignored():
    x_BxTxD = _random_batch(5, t=6)
    mask_BxT = np.ones((3, 6))
    mask_BxT[1, 4:] = 0  # ragged: the second example has 4 real tokens
    # Appending padding full of garbage (huge values, even inf) must not change any metric.
    junk_BxPxD = np.full((3, 3, 5), 1e30)
    junk_BxPxD[0, 0, 0] = np.inf
    x_pad = jnp.asarray(np.concatenate([x_BxTxD, junk_BxPxD], axis=1), jnp.float32)
    mask_pad = jnp.asarray(np.concatenate([mask_BxT, np.zeros((3, 3))], axis=1))
    x_BxTxD, mask_BxT = jnp.asarray(x_BxTxD, jnp.float32), jnp.asarray(mask_BxT)
    padded, unpadded = _all_metrics(x_pad, mask_pad), _all_metrics(x_BxTxD, mask_BxT)
    for name in PER_EXAMPLE:
        np.testing.assert_allclose(padded[name], unpadded[name], rtol=1e-5, atol=1e-6, err_msg=name)
    np.testing.assert_allclose(
        metrics.singular_values(x_pad, mask_pad), metrics.singular_values(x_BxTxD, mask_BxT), rtol=1e-5
    )
    # The masked example equals the same tokens without padding at all.
    alone = _all_metrics(x_BxTxD[1:2, :4])
    for name in PER_EXAMPLE:
        np.testing.assert_allclose(unpadded[name][1], alone[name][0], rtol=1e-5, err_msg=name)


@pytest.mark.parametrize("scale", [1e-20, 1e-3, -2.0, 1e20])
def test_scale_invariance(scale):
    x_BxTxD = _random_batch(6)
    base = _all_metrics(jnp.asarray(x_BxTxD, jnp.float32))
    scaled = _all_metrics(jnp.asarray(scale * x_BxTxD, jnp.float32))
    for name in PER_EXAMPLE:
        np.testing.assert_allclose(scaled[name], base[name], rtol=1e-5, atol=1e-6, err_msg=name)


def test_layer_stats_keys_and_values():
    x_BxTxD = jnp.asarray(_random_batch(7), jnp.float32)
    mask_BxT = jnp.ones(x_BxTxD.shape[:2]).at[0, -2:].set(0)
    cheap = metrics.layer_stats(x_BxTxD, mask_BxT)
    full = metrics.layer_stats(x_BxTxD, mask_BxT, full=True)
    # Sets, not tuples: dicts returned through jit come back with sorted keys.
    assert set(cheap) == set(metrics.LAYER_STAT_KEYS)
    assert set(full) == set(metrics.FULL_LAYER_STAT_KEYS)
    fns = {**PER_EXAMPLE, "dirichlet": metrics.dirichlet_energy}
    for key, value in full.items():
        assert value.shape == ()
        np.testing.assert_allclose(value, jnp.mean(fns[key](x_BxTxD, mask_BxT)), rtol=1e-5)


def test_jit_matches_eager():
    x_BxTxD = jnp.asarray(_random_batch(8), jnp.float32)
    mask_BxT = jnp.ones(x_BxTxD.shape[:2]).at[2, :3].set(0)
    for name, fn in PER_EXAMPLE.items():
        np.testing.assert_allclose(
            jax.jit(fn)(x_BxTxD, mask_BxT), fn(x_BxTxD, mask_BxT), rtol=1e-6, err_msg=name
        )
    jitted = jax.jit(metrics.layer_stats, static_argnames="full")(x_BxTxD, mask_BxT, full=True)
    eager = metrics.layer_stats(x_BxTxD, mask_BxT, full=True)
    for key in metrics.FULL_LAYER_STAT_KEYS:
        np.testing.assert_allclose(jitted[key], eager[key], rtol=1e-6)


def test_bf16_input_is_computed_in_float32():
    x_BxTxD = _random_batch(9)
    x_bf16 = jnp.asarray(x_BxTxD, jnp.bfloat16)
    x_f32 = x_bf16.astype(jnp.float32)  # same (rounded) values, so results must agree closely
    got, want = _all_metrics(x_bf16), _all_metrics(x_f32)
    for name in PER_EXAMPLE:
        assert got[name].dtype == jnp.float32, name
        assert bool(jnp.all(jnp.isfinite(got[name]))), name
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6, err_msg=name)
    # Nearly identical bf16 tokens: the direct HC sum keeps the answer tiny rather than noisy.
    same = jnp.asarray(np.repeat(x_BxTxD[:, :1], 7, axis=1), jnp.bfloat16)
    assert float(jnp.max(metrics.hfc_lfc(same))) < 1e-6


def test_degenerate_inputs_give_no_nan():
    zeros_BxTxD = jnp.zeros((2, 5, 4), jnp.float32)
    one_token = jnp.ones((2, 1, 4), jnp.float32)
    for x_BxTxD in (zeros_BxTxD, one_token, zeros_BxTxD.astype(jnp.bfloat16)):
        for name, got in _all_metrics(x_BxTxD).items():
            assert bool(jnp.all(jnp.isfinite(got))), name
        stats = metrics.layer_stats(x_BxTxD, full=True)
        assert all(bool(jnp.isfinite(v)) for v in stats.values())
    for name, got in _all_metrics(zeros_BxTxD).items():
        np.testing.assert_allclose(got, 0.0, err_msg=name)
    # A single zero token among real ones counts as cosine 0 with the others, without NaN.
    x_BxTxD = jnp.asarray(_random_batch(10), jnp.float32).at[:, 0].set(0.0)
    want = [_bf_cosines(np.asarray(x[1:], np.float64))[0] * 6 * 5 / (7 * 6) for x in x_BxTxD]
    np.testing.assert_allclose(metrics.token_cosine(x_BxTxD), want, rtol=1e-5)
    # An entirely masked example is finite too.
    mask_BxT = jnp.ones(x_BxTxD.shape[:2]).at[0].set(0)
    for name, got in _all_metrics(x_BxTxD, mask_BxT).items():
        assert bool(jnp.all(jnp.isfinite(got))), name
