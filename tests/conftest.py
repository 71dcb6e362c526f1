"""Test-wide JAX settings: strict rank promotion so silent broadcasting bugs fail loudly; the persistent XLA
compilation cache shared by the trainer tests (test_train.py, test_parallel.py) and their subprocesses."""

import os
import tempfile

import jax
import pytest

jax.config.update("jax_numpy_rank_promotion", "raise")

# The trainer tests compile the same tiny programs again and again (in-process and in subprocesses, which
# get these variables in their environment); a persistent cache makes every compile after the first a read.
XLA_CACHE_ENV = {
    "JAX_COMPILATION_CACHE_DIR": os.path.join(
        tempfile.gettempdir(), f"jaxsmooth-test-xla-cache-{os.getuid()}"
    ),
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
}


@pytest.fixture(scope="module")
def xla_cache():
    """Turn the persistent compilation cache on for one test module (jax.config), restore it after."""
    keys = {k.lower(): v for k, v in XLA_CACHE_ENV.items()}
    old = {k: jax.config.values[k] for k in keys}
    for k, v in keys.items():
        jax.config.update(k, v if k.endswith("dir") else int(v))
    yield
    for k, v in old.items():
        jax.config.update(k, v)
