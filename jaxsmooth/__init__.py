"""jaxsmooth: controllable transformer oversmoothing in JAX/Flax.

jaxsmooth.Spectrum, ModelConfig, deepnorm     typed configuration (jaxsmooth.config)
jaxsmooth.spectral                            H = V diag(lambda) V^-1 as pure functions
jaxsmooth.attention                           attention / LN / MLP math as pure functions
jaxsmooth.nnx                                 Flax NNX modules (SpectralAttention, Transformer, ViT, ...)
jaxsmooth.linen                               Linen interop for the constrained layers
jaxsmooth.metrics, jaxsmooth.theory           measuring and predicting oversmoothing
"""

from jaxsmooth.config import ModelConfig, Spectrum, deepnorm

__version__ = "0.1.0"
__all__ = ["ModelConfig", "Spectrum", "deepnorm", "__version__"]
