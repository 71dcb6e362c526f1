"""Flax NNX modules of jaxsmooth (thin wrappers over `jaxsmooth.attention` and `jaxsmooth.spectral`)."""

from jaxsmooth.nnx.layers import MLP, Attention, LayerNorm, SpectralAttention
from jaxsmooth.nnx.models import CausalLM, ViT
from jaxsmooth.nnx.transformer import Block, Transformer
from jaxsmooth.nnx.variables import BranchScale, EigBasis, EigVals, LNGain

__all__ = [
    "Attention", "Block", "BranchScale", "CausalLM", "EigBasis", "EigVals", "LNGain", "LayerNorm", "MLP",
    "SpectralAttention", "Transformer", "ViT",
]  # fmt: skip
