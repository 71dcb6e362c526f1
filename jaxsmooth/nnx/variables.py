"""Variable types, so optimiser groups, weight-decay masks and spectrum logging select by type.

    EigBasis     parameters of the eigenvector matrix V (theta; QR makes them scale-invariant)
    EigVals      the free eigenvalue vector psi (lambda = f(psi), bounded by the Spectrum)
    BranchScale  AttnScale / FeatScale coefficients (Wang et al. 2022), init 0
    LNGain       LayerNorm gains (their sign can matter for smoothing, docs/theory.md section 2)
All subclass nnx.Param, so `nnx.Param` filters still see every trainable parameter.
"""

from flax import nnx


class EigBasis(nnx.Param):
    pass


class EigVals(nnx.Param):
    pass


class BranchScale(nnx.Param):
    pass


class LNGain(nnx.Param):
    pass
