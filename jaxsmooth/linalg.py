"""The dense linear algebra the spectral layers and metrics need (QR, a triangular solve, singular values),
safe on XLA:CPU with any number of devices.

Why not `jnp.linalg` on CPU: jaxlib 0.10's CPU LAPACK kernels (`lapack_sgeqrf_ffi`, `lapack_strsm_ffi`,
`lapack_sgesdd_ffi`, ...) hand their batch to XLA's intra-op thread pool (`jax::ParallelBatchMap`) and
block the calling thread until those tasks finish. That calling thread is itself one of the pool's
threads. When every pool thread is inside such a call at once (4 CPU devices each running the same train
step's QR, or several independent QRs of one program scheduled side by side), the tasks they queued can
never run: the process sits at 0% CPU forever (native stacks: `lapack_sgeqrf_ffi` -> `QrFactorization`
-> `ParallelBatchMap` -> `BlockingCounter::Wait` on every pool thread; docs/design.md, "CPU linear
algebra"). jaxlib 0.11 compiles this parallel path out; 0.10 is what we support.

What we do on CPU: the same LAPACK / BLAS routines (`sgeqrf` + `sorgqr`, `strsm`, `sgesdd`) are called
from scipy, whose LAPACK jaxlib's kernels call too, through `jax.pure_callback`: the routine runs on the
thread that reaches it and queues nothing, so it cannot wait for itself. The results are bit-identical to
`jnp.linalg` (tests/test_linalg.py), so runs recorded before this change reproduce exactly. Under a
multi-device jit a callback runs once, on the first device, and XLA sends its result to the others (what
`jax.pure_callback` does by default); it is a D x D factorisation next to the step's B x T x D matmuls.

When: with more than one CPU device in the process (JAXSMOOTH_CPU_LINALG=auto, the default). With one
device, jaxlib's kernels are kept: the spectral stack makes one LAPACK call at a time, which a pool of two
or more threads always completes, and JAX's persistent compilation cache never stores a program that
holds a host callback, so single-device runs (every study cell) keep their cached compiles. `host` forces
the callbacks everywhere, `xla` forces jaxlib's kernels (it brings the deadlock back with several devices).
On GPU / TPU the native kernels (cuSOLVER, XLA's own) are always used: `jax.lax.platform_dependent` picks
per backend at lowering time.

float32 and float64 keep their dtype (LAPACK's s- and d- routines); anything else is computed in
float32. Any leading batch dimensions.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

ENV = "JAXSMOOTH_CPU_LINALG"


def _use_host() -> bool:
    """Whether this trace routes CPU linear algebra through the host (see the module docstring)."""
    choice = os.environ.get(ENV, "auto")
    if choice not in ("auto", "host", "xla"):
        raise ValueError(
            f"{ENV}={choice!r}: use 'auto' (the default), 'host' (always deadlock-free) or 'xla' "
            "(jaxlib's kernels)"
        )
    if choice == "auto":
        # One device runs one LAPACK call at a time here (the spectral stack composes its layers one by
        # one), so a blocked pool thread always has another to run its tasks: jaxlib's kernels are safe,
        # and a program without host callbacks can be kept in JAX's persistent compilation cache (one with
        # callbacks never is). Several devices run the same call at once: the host path.
        return _cpu_device_count() > 1
    return choice == "host"


def _cpu_device_count() -> int:
    try:
        return jax.local_device_count("cpu")
    except RuntimeError:  # no CPU backend
        return 0


@functools.cache
def limit_lapack_threads(n: int = 1) -> bool:
    """Cap the BLAS thread pool under jax's CPU LAPACK kernels (QR, triangular solve) at `n` threads.

    On CPU, jnp.linalg.qr and lax.linalg.triangular_solve are custom calls into scipy's LAPACK, which runs
    on scipy's OpenBLAS thread pool: a second pool beside XLA's, which already occupies every core. Each
    192 x 192 QR then splits across threads that have to wait for a core, and OpenBLAS's worker threads
    keep spinning after every call, taking a core from XLA's matmuls. Measured on 2 cores (ViT-Tiny train
    step, experiments/benchmarks/README.md): the spectral model took 2.4x the unconstrained one with the
    default pool and about 1.0x with one thread. The spectral layers call this once, when first traced.

    Only OpenBLAS libraries that belong to scipy are capped (numpy's own copy, which user code calls,
    keeps its threads); where scipy shares one BLAS with numpy (e.g. conda) that one is left alone too.
    Set JAXSMOOTH_LAPACK_THREADS=0 to leave every pool untouched. Cached (`functools.cache`): each n caps
    the pools once per process.

    Args:
      n: the number of threads to leave each of scipy's OpenBLAS pools.

    Returns:
      Whether a pool was capped (False when disabled by the variable, when scipy or threadpoolctl is
      missing, or when scipy has no OpenBLAS of its own).
    """
    if os.environ.get("JAXSMOOTH_LAPACK_THREADS", "1") == "0":
        return False
    try:
        import scipy
        import scipy.linalg.cython_lapack  # noqa: F401  (loads the LAPACK jaxlib's kernels call)
        from threadpoolctl import ThreadpoolController
    except ImportError:
        return False
    scipy_dir = os.path.dirname(os.path.abspath(scipy.__file__))
    controller = ThreadpoolController()
    mine = [
        lib
        for lib in controller.lib_controllers
        if lib.internal_api == "openblas"
        and (lib.filepath.startswith(scipy_dir) or f"{os.sep}scipy.libs{os.sep}" in lib.filepath)
    ]
    for lib in mine:
        lib.set_num_threads(n)
    return bool(mine)


@functools.cache
def _lapack():
    """scipy's LAPACK / BLAS wrappers, with its BLAS thread pool capped (see `limit_lapack_threads`)."""
    from scipy.linalg import blas, lapack

    limit_lapack_threads()
    return lapack, blas


def _dtype(x) -> jnp.dtype:
    """The dtype we compute in: float64 stays float64, everything else is float32."""
    return jnp.dtype(jnp.float64) if jnp.asarray(x).dtype == jnp.float64 else jnp.dtype(jnp.float32)


def _routine(module, name: str, dtype):
    """LAPACK / BLAS routine `name` ("geqrf", ...) for dtype: s (float32) or d (float64)."""
    return getattr(module, ("d" if np.dtype(dtype) == np.float64 else "s") + name)


@functools.cache
def _qr_workspace(m: int, n: int, dtype: str) -> tuple[int, int]:
    """The optimal workspace sizes of ?geqrf and ?orgqr, queried as jaxlib queries them (the blocked
    algorithm is chosen by the workspace, so the same size gives the same rounding)."""
    lapack, _ = _lapack()
    a = np.zeros((m, n), dtype, order="F")
    work = _routine(lapack, "geqrf", dtype)(a, lwork=-1)[2]
    work_q = _routine(lapack, "orgqr", dtype)(a, np.zeros(min(m, n), dtype), lwork=-1)[1]
    return int(work[0]), int(work_q[0])


def _batched(fn, *arrays):
    """Apply fn to each matrix of the (broadcast) leading batch of `arrays`; fn returns a tuple."""
    dtype = np.result_type(*arrays)
    arrays = [np.asarray(a, dtype) for a in arrays]
    batch = np.broadcast_shapes(*(a.shape[:-2] for a in arrays))
    arrays = [np.broadcast_to(a, batch + a.shape[-2:]) for a in arrays]
    outs = None
    for idx in np.ndindex(*batch):
        res = fn(*(np.asfortranarray(a[idx]) for a in arrays))
        if outs is None:
            outs = [np.empty(batch + r.shape, dtype) for r in res]
        for o, r in zip(outs, res, strict=True):
            o[idx] = r
    return tuple(outs)


def _host_qr(x):
    m, n = x.shape[-2:]
    lapack, _ = _lapack()
    dtype = x.dtype
    lwork, lwork_q = _qr_workspace(m, n, dtype.name)
    geqrf, orgqr = _routine(lapack, "geqrf", dtype), _routine(lapack, "orgqr", dtype)

    def one(a):
        qr, tau, _, info = geqrf(a, lwork=lwork, overwrite_a=1)
        r = np.triu(qr[: min(m, n)])
        q = orgqr(qr[:, : min(m, n)], tau, lwork=lwork_q, overwrite_a=1)[0]
        return q, r

    if x.size == 0:
        k = min(m, n)
        return np.zeros(x.shape[:-1] + (k,), x.dtype), np.zeros(x.shape[:-2] + (k, n), x.dtype)
    return _batched(one, x)


@jax.custom_jvp
def qr(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Reduced QR, as `jnp.linalg.qr(x)` (LAPACK's signs: diag(R) may be negative).

    Args:
      x: [..., M, N] float32 or float64 (other dtypes are computed in float32).
    Returns:
      (q [..., M, K], r [..., K, N]) with K = min(M, N); not differentiable (the spectral layers define
      their own derivative, `spectral.orthogonal`).
    """
    x = jnp.asarray(x, _dtype(x))
    if not _use_host():
        return tuple(jnp.linalg.qr(x))
    m, n = x.shape[-2:]
    k = min(m, n)
    out = (
        jax.ShapeDtypeStruct(x.shape[:-1] + (k,), x.dtype),
        jax.ShapeDtypeStruct(x.shape[:-2] + (k, n), x.dtype),
    )
    host = lambda a: tuple(jax.pure_callback(_host_qr, out, a, vmap_method="broadcast_all"))
    return jax.lax.platform_dependent(x, cpu=host, default=lambda a: tuple(jnp.linalg.qr(a)))


@qr.defjvp
def _qr_jvp(primals, tangents):
    # A callback has no derivative. The spectral layers never reach this (`spectral.orthogonal` has its
    # own rule); a user differentiating `qr` itself, or a second derivative, gets JAX's own rule, on
    # jaxlib's kernels (a CPU deadlock needs several of them at once; derivatives of derivatives are rare).
    x = jnp.asarray(primals[0], _dtype(primals[0]))
    return jax.jvp(lambda a: tuple(jnp.linalg.qr(a)), (x,), (jnp.asarray(tangents[0], x.dtype),))


def _host_trsm(trans: bool):
    def solve(r, b):
        _, blas = _lapack()
        # x r = b (trans: x r^T = b), r upper triangular: BLAS strsm from the right, as jaxlib calls it.
        trsm = _routine(blas, "trsm", np.result_type(r, b))
        return _batched(lambda r1, b1: (trsm(1.0, r1, b1, side=1, lower=0, trans_a=int(trans)),), r, b)[0]

    return solve


def _trsm(r, b, trans: bool):
    native = lambda r, b: jax.lax.linalg.triangular_solve(
        r, b, left_side=False, lower=False, transpose_a=trans
    )
    if not _use_host():
        return native(r, b)
    out = jax.ShapeDtypeStruct(jnp.broadcast_shapes(r.shape[:-2], b.shape[:-2]) + b.shape[-2:], b.dtype)
    host = lambda r, b: jax.pure_callback(_host_trsm(trans), out, r, b, vmap_method="broadcast_all")
    return jax.lax.platform_dependent(r, b, cpu=host, default=native)


def solve_upper_right(r: jax.Array, b: jax.Array) -> jax.Array:
    """x = b r^-1 for upper-triangular r (as `lax.linalg.triangular_solve(r, b, left_side=False,
    lower=False)`): linear in b, and transposable, so reverse-mode differentiation through it works (the
    transpose solves x r^T = b with the same routine, as JAX's own transpose rule does).

    Args:
      r: [..., N, N], upper triangular with a nonzero diagonal (only the upper triangle is read).
      b: [..., M, N]; float64 if r or b is, else float32.
    Returns:
      x: [..., M, N] with x r = b.
    """
    dtype = jnp.promote_types(_dtype(r), _dtype(b))
    r = jnp.asarray(r, dtype)
    b = jnp.asarray(b, dtype)
    return jax.lax.custom_linear_solve(
        lambda x: x @ jnp.triu(r),
        b,
        solve=lambda _, rhs: _trsm(r, rhs, trans=False),
        transpose_solve=lambda _, rhs: _trsm(r, rhs, trans=True),
    )


def _host_svdvals(x):
    lapack, _ = _lapack()
    m, n = x.shape[-2:]
    k = min(m, n)
    if x.size == 0:
        return np.zeros(x.shape[:-2] + (k,), x.dtype)
    lwork = int(_routine(lapack, "gesdd_lwork", x.dtype)(m, n, compute_uv=0, full_matrices=0)[0])
    gesdd = _routine(lapack, "gesdd", x.dtype)

    def one(a):
        _, s, _, info = gesdd(a, compute_uv=0, full_matrices=0, lwork=lwork, overwrite_a=1)
        # LAPACK returns NaN-free values or info > 0 (did not converge); jnp gives NaN there: match it.
        return (s if info == 0 else np.full(k, np.nan, x.dtype),)

    return _batched(one, x)[0]


@jax.custom_jvp
def svdvals(x: jax.Array) -> jax.Array:
    """Singular values, descending, as `jnp.linalg.svd(x, compute_uv=False)`.

    Args:
      x: [..., M, N] float32 or float64 (other dtypes are computed in float32).
    Returns:
      [..., min(M, N)], x's dtype.
    """
    x = jnp.asarray(x, _dtype(x))
    native = lambda a: jnp.linalg.svd(a, compute_uv=False)
    if not _use_host():
        return native(x)
    out = jax.ShapeDtypeStruct(x.shape[:-2] + (min(x.shape[-2:]),), x.dtype)
    host = lambda a: jax.pure_callback(_host_svdvals, out, a, vmap_method="broadcast_all")
    return jax.lax.platform_dependent(x, cpu=host, default=native)


@svdvals.defjvp
def _svdvals_jvp(primals, tangents):
    # As for `qr`: the values stay on the callback, the derivative (rarely wanted) is JAX's own.
    x = jnp.asarray(primals[0], _dtype(primals[0]))
    _, ds = jax.jvp(lambda a: jnp.linalg.svd(a, compute_uv=False), (x,), tangents)
    return svdvals(x), ds
