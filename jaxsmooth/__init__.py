"""jaxsmooth: controllable transformer oversmoothing in JAX/Flax.

jaxsmooth.Spectrum, ModelConfig, deepnorm     typed configuration (jaxsmooth.config)
jaxsmooth.spectral                            H = V diag(lambda) V^-1 as pure functions
jaxsmooth.attention                           attention / LN / MLP math as pure functions
jaxsmooth.nnx                                 Flax NNX modules (SpectralAttention, Transformer, ViT, ...)
jaxsmooth.linen                               Linen interop for the constrained layers
jaxsmooth.metrics, jaxsmooth.theory           measuring and predicting oversmoothing
jaxsmooth.convert                             unconstrained attention weights -> spectral ones

Submodules are imported on first use (`import jaxsmooth; jaxsmooth.nnx.Transformer` works), so importing
the package stays cheap.
"""

import importlib

from jaxsmooth.config import ModelConfig, Spectrum, deepnorm

__version__ = "0.1.0"
_SUBMODULES = ("attention", "convert", "linen", "metrics", "nnx", "parallel", "spectral", "theory")
__all__ = ["ModelConfig", "Spectrum", "deepnorm", "__version__", *_SUBMODULES]


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"jaxsmooth.{name}")
    raise AttributeError(f"module 'jaxsmooth' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_SUBMODULES))
