"""Variable types, so optimiser groups, weight-decay masks and spectrum logging select by type.

    EigBasis     parameters of the eigenvector matrix V (theta; QR makes them scale-invariant)
    EigVals      the free eigenvalue vector psi (lambda = f(psi), bounded by the Spectrum)
    BranchScale  AttnScale / FeatScale coefficients (Wang et al. 2022), init 0
    LNGain       LayerNorm gains (their sign can matter for smoothing, docs/theory.md section 2)
All subclass nnx.Param, so `nnx.Param` filters still see every trainable parameter.
"""

from flax import nnx


class EigBasis(nnx.Param):
    """Parameters of the eigenvector matrix V of H = W_V W_O (theta; QR makes them scale-invariant).

    Args:
      value: the array (or an initializer's `VariableMetadata`), as for `nnx.Param`.
      **metadata: Variable metadata (e.g. `out_sharding`), as for `nnx.Param`.

    Example::

      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from jaxsmooth.nnx import EigBasis
      >>> isinstance(EigBasis(jnp.eye(2)), nnx.Param)  # optimiser filters select by type
      True
    """


class EigVals(nnx.Param):
    """The free eigenvalue vector psi (lambda = f(psi), bounded by the `Spectrum`).

    Args:
      value: the array (or an initializer's `VariableMetadata`), as for `nnx.Param`.
      **metadata: Variable metadata (e.g. `out_sharding`, `weight_decay`), as for `nnx.Param`.
    """


class BranchScale(nnx.Param):
    """AttnScale / FeatScale coefficients (Wang et al. 2022), initialised to 0 (the identity).

    Args:
      value: the array (or an initializer's `VariableMetadata`), as for `nnx.Param`.
      **metadata: Variable metadata (e.g. `out_sharding`), as for `nnx.Param`.
    """


class LNGain(nnx.Param):
    """LayerNorm gains (their sign can matter for smoothing, docs/theory.md section 2).

    Args:
      value: the array (or an initializer's `VariableMetadata`), as for `nnx.Param`.
      **metadata: Variable metadata (e.g. `out_sharding`, `lr_scale`), as for `nnx.Param`.
    """
