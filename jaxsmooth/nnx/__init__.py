"""Flax NNX modules of jaxsmooth (thin wrappers over `jaxsmooth.attention` and `jaxsmooth.spectral`).

Shape letters, used in tensor names (`x_BxTxD`) and einsum strings throughout `jaxsmooth.nnx` and
`jaxsmooth.linen`:

    B  batch (all leading batch dimensions, flattened)     L  layers (the leading axis of the block stack)
    T  tokens (query positions; a ViT's patches, plus      G  layers in one remat group
       [CLS] in the stack)                                  V  vocabulary
    S  key / value positions (S = T in self-attention,     C  classes
       more with a KV cache)                                F  patch features (patch_size^2 channels)
    D  width (d_model); E a second axis of size D          P  prompt length (`CausalLM.generate`)
    N  attention heads                                      R  tokens generated (`max_new_tokens`)
    K  head dimension (D = N K)
    M  MLP width

Images are [B, height, width, channels]: those three are spelled out, never lettered. H is not a shape
letter: it is the matrix H = W_V W_O of a layer (tensor names `h_DxD`, `h_LxDxD`), as in docs/theory.md.

The models share one calling convention (`jaxsmooth.nnx.models`): `model(x)` returns the logits array
(deterministic unless `rngs` is given), `model.forward(x, stats=..., attention=...)` a `ModelOutput`.
"""

from jaxsmooth.nnx.layers import MLP, Attention, LayerNorm, SpectralAttention
from jaxsmooth.nnx.models import CausalLM, ModelOutput, ViT
from jaxsmooth.nnx.transformer import Block, LayerInputs, StackOutput, Transformer
from jaxsmooth.nnx.variables import BranchScale, EigBasis, EigVals, LNGain

__all__ = [
    "Attention", "Block", "BranchScale", "CausalLM", "EigBasis", "EigVals", "LNGain", "LayerInputs",
    "LayerNorm", "MLP", "ModelOutput", "SpectralAttention", "StackOutput", "Transformer", "ViT",
]  # fmt: skip
