"""Eigenvalue summaries for the audit: sorting, dominant eigenvalue and real-part range, LayerNorm gain
sign counts, row-stochastic renormalisation of averaged attention."""

from __future__ import annotations

import contextlib

import numpy as np


def complex_pair(z: complex) -> list[float]:
    """[real, imaginary] of a complex number, as JSON holds it."""
    return [float(np.real(z)), float(np.imag(z))]


def sort_by_modulus(ev: np.ndarray) -> np.ndarray:
    """Eigenvalues sorted by modulus, then real part, then imaginary part (all descending), so the first
    one is the dominant eigenvalue and, of a conjugate pair, the one with imag >= 0 comes first."""
    ev = np.asarray(ev, np.complex128)
    return ev[np.lexsort((-ev.imag, -ev.real, -np.abs(ev)))]


def eig_summary(ev: np.ndarray, with_values: bool = True) -> dict:
    """Dominant eigenvalue [re, im], modulus, real-part range and fraction with negative real part."""
    ev = sort_by_modulus(ev)
    out = {
        "dominant_eigenvalue": complex_pair(ev[0]),
        "eig_abs_max": float(np.abs(ev[0])),
        "eig_real_min": float(ev.real.min()),
        "eig_real_max": float(ev.real.max()),
        "frac_negative_real": float(np.mean(ev.real < 0)),
    }
    if with_values:
        out["eigenvalues"] = [complex_pair(z) for z in ev]
    return out


def gain_counts(gain_D: np.ndarray, source: str) -> dict:
    """Sign counts and range of one LayerNorm gain vector (its sign flips the folded eigenvalues)."""
    g = np.asarray(gain_D, np.float64)
    return {
        "source": source,
        "negative": int(np.sum(g < 0)),
        "zero": int(np.sum(g == 0)),
        "positive": int(np.sum(g > 0)),
        "min": float(g.min()),
        "max": float(g.max()),
    }


def row_stochastic(a_NxN: np.ndarray) -> np.ndarray:
    """float64 copy with every row divided by its sum (float32 softmax rows sum to 1 only to ~1e-7)."""
    a = np.asarray(a_NxN, np.float64)
    s_N = a.sum(axis=-1, keepdims=True)
    return a / np.where(np.abs(s_N) > 0, s_N, 1.0)


def one_blas_thread():
    """Single-threaded BLAS/LAPACK for the eigen-analysis: the matrices are small (D <= ~1k), and threaded
    OpenBLAS on a busy machine (the JAX runtime, parallel tests) ran np.linalg.eig ~8x slower here."""
    try:
        from threadpoolctl import threadpool_limits  # ships with scikit-learn, a jaxsmooth dependency
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")
