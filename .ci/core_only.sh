#!/usr/bin/env bash
# The core installs and imports with only its own dependencies (jax, flax, optax, chex, numpy): a fresh
# venv, `pip install .` without extras, then the layers, spectral math, metrics and theory are used and
# the trainer's / audit's dependencies are checked to be absent.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
venv="$(mktemp -d)/core"
python -m venv "$venv"
"$venv/bin/python" -m pip install --disable-pip-version-check -q -c .ci/constraints.txt .
cd "$(mktemp -d)"  # away from the source tree, so the installed package is what is imported
"$venv/bin/python" - <<'PY'
import importlib.util
import jax.numpy as jnp
from flax import nnx
import jaxsmooth

# (orbax-checkpoint is absent from this list: flax itself depends on it.)
for extra in ("matplotlib", "sklearn", "tokenizers", "safetensors", "ml_collections", "tensorboardX"):
    assert importlib.util.find_spec(extra) is None, f"{extra} is installed in the core-only venv"
layer = jaxsmooth.nnx.SpectralAttention(2, 8, spectrum=jaxsmooth.Spectrum("sharpen"), rngs=nnx.Rngs(0))
y = layer(jnp.ones((1, 3, 8)))
cfg = jaxsmooth.ModelConfig(depth=2, d_model=8, num_heads=2, spectrum=jaxsmooth.Spectrum("smooth"))
out = jaxsmooth.nnx.Transformer(cfg, rngs=nnx.Rngs(0)).forward(jnp.ones((1, 3, 8)), stats="logged")
assert float(layer.eigenvalues().max()) < 0 and out.stats["token_cosine"].shape == (2,)
jaxsmooth.theory.predict(jnp.eye(3), jnp.eye(8))
jaxsmooth.linen.SpectralAttention(num_heads=2, spectrum=jaxsmooth.Spectrum()).init(
    jax.random.key(0) if (jax := __import__("jax")) else None, jnp.ones((1, 3, 8)))
print("core-only install OK: jaxsmooth", jaxsmooth.__version__)
PY
