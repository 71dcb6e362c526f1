"""Typed, hashable model configuration: the spectral constraint, the model shape and DeepNet constants.

Everything here is a frozen dataclass, so a config can be a static argument of `jax.jit` and two equal
configs hash equally. Validation happens in `__post_init__`: a bad value fails at construction, before
any parameter is allocated, with a `ValueError` naming the field and the allowed values.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

MODES = ("smooth", "sharpen", "neutral", "free")
BASES = ("orthogonal", "general")
BOUNDS = ("clip", "smooth")
INITS = ("uniform", "matched")
PARAM_SCALES = ("width", "unit")
RESIDUALS = ("pre_ln", "post_ln", "deepnorm")
LN_GAINS = ("free", "positive")
VALUE_NORMS = ("rms", "ln")
LN_LRS = ("depth", "none")
REMATS = ("none", "full", "nested")
DTYPES = ("float32", "bfloat16", "float16")
ARCHS = ("encoder", "decoder", "encoder_decoder")
BRANCH_SCALES = ("none", "attnscale", "featscale")

# Default eigenvalue interval of each mode, stated for the *effective* update (see Spectrum docstring).
# smooth: (0, 1] is our choice (the paper states no bound for "ViT plus"); sharpen: [-1, 0) is the paper's
# sufficient condition against oversmoothing; neutral: [-1, 1] lets each eigenvalue pick its sign.
_DEFAULT_RANGE = {"smooth": (0.0, 1.0), "sharpen": (-1.0, 0.0), "neutral": (-1.0, 1.0)}


def _check_choice(field: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{field}={value!r} is not allowed; choose one of {', '.join(allowed)}")


@dataclasses.dataclass(frozen=True)
class Spectrum:
    """The constraint on the eigenvalues of H = W_V W_O, and how they are parameterised (docs/theory.md).

    Ranges refer to the effective update of a residual branch. With DeepNorm the skip path is scaled by
    alpha, LN(alpha x + f(x)) = LN(x + f(x)/alpha), so the library composes H with eigenvalues in
    [alpha lo, alpha hi] and H/alpha satisfies the stated range (docs/theory.md, our choice).

    Construction validates every field (a `ValueError` names the bad one) and resolves lo/hi to the
    mode's interval, so `Spectrum(mode=m).lo` / `.hi` expose the defaults and two specs meaning the same
    interval compare (and hash) equal.

    Attributes:
      mode: "smooth"  eigenvalues in (0, hi]   -> the DC (all-tokens-equal) mode dominates: smoothing.
            "sharpen" eigenvalues in [lo, 0)   -> the paper's sufficient condition against oversmoothing.
            "neutral" eigenvalues in [lo, hi]  (both signs, bounded).
            "free"    eigenvalues unconstrained, H still built as V diag(lambda) V^-1.
      basis: "orthogonal" V = Q of QR(Theta), V^-1 = V^T, H symmetric (the paper).
             "general"    V = Q1 diag(s) Q2^T with s in [kappa^-1/2, kappa^1/2], so cond(V) <= max_cond and
                          V^-1 = Q2 diag(1/s) Q1^T is exact: any diagonalisable H with real eigenvalues
                          whose eigenvector matrix has condition number <= max_cond.
      bound: "clip"   lambda = clip(+-psi^2, lo, hi) (the paper; zero gradient when saturated).
             "smooth" lambda = lo + (hi - lo) sigmoid(psi): differentiable everywhere, same interval; not
                      allowed with mode="free", which has no bounded interval.
      lo: lower end of the interval; None: the mode's default. The defaults: smooth (0, 1] (our choice;
        the paper states no bound for "ViT plus"), sharpen [-1, 0) (the paper's sufficient condition
        against oversmoothing), neutral [-1, 1] (each eigenvalue picks its sign). mode="free" takes
        None (stored as -inf / inf). Must be finite and < hi; smooth needs lo >= 0.
      hi: upper end of the interval; None: the mode's default (see lo). sharpen needs hi <= 0.
      max_cond: kappa, the bound on cond(V) of the "general" basis; a finite number >= 1.
      margin: keeps the open ends (lo for smooth, hi for sharpen) open, as a fraction of hi - lo, so an
        eigenvalue never reaches the excluded end point; in [0, 0.5). It is tiny (1e-6) because
        DeepNorm's init puts eigenvalues at ~beta^2/alpha ~ 1e-3 of the range, and a clipped eigenvalue
        has no gradient.
      init: "uniform" eigenvalues uniform over the central 90% of the interval (none starts on a clip end).
            "matched" |lambda| distributed as |Re mu|, mu the unconstrained baseline's eigenvalues at init
                      (xavier W_V, W_O: |mu| ~ Uniform(0, 1) with a uniform phase; times DeepNorm's
                      beta^2), with the mode's sign (random signs for neutral / free), clipped into the
                      interval (`spectral.init`).
      init_scale: multiplies the initial eigenvalues (before clipping into the interval); a finite
        number > 0. The default, "matched" x 0.5, starts a depth-24 smooth stack no more collapsed than
        the baseline (token cosine after layer 24: 0.96 vs 0.97; "uniform" x 1: 1.00), see
        docs/design.md.
      param_scale: "width" every spectral parameter has the entry scale of the baseline matrices it
                           replaces: theta ~ N(0, 1/D) and lambda = f(sqrt(D) psi), so one Adam step of
                           size lr moves H at about the baseline's relative rate (measured:
                           experiments/dynamics.py).
                   "unit"  theta ~ N(0, 1), lambda = f(psi) (the paper authors' parameterisation).

    Example::

      >>> from jaxsmooth import Spectrum
      >>> sharpen = Spectrum("sharpen")  # the default interval [-1, 0)
      >>> sharpen.lo, sharpen.hi
      (-1.0, 0.0)
      >>> sharpen.closed_interval()  # the open end 0 pulled in by margin
      (-1.0, -1e-06)
      >>> sharpen == Spectrum("sharpen", lo=-1.0)
      True
      >>> Spectrum("smooth", hi=0.5, basis="general", max_cond=4.0).closed_interval(alpha=2.0)
      (1e-06, 1.0)
    """

    mode: Literal["smooth", "sharpen", "neutral", "free"] = "sharpen"
    basis: Literal["orthogonal", "general"] = "orthogonal"
    bound: Literal["clip", "smooth"] = "clip"
    lo: float | None = None
    hi: float | None = None
    max_cond: float = 10.0
    margin: float = 1e-6
    init: Literal["uniform", "matched"] = "matched"
    init_scale: float = 0.5
    param_scale: Literal["width", "unit"] = "width"

    def __post_init__(self):
        _check_choice("spectrum.mode", self.mode, MODES)
        _check_choice("spectrum.basis", self.basis, BASES)
        _check_choice("spectrum.bound", self.bound, BOUNDS)
        _check_choice("spectrum.init", self.init, INITS)
        _check_choice("spectrum.param_scale", self.param_scale, PARAM_SCALES)
        if not (isinstance(self.init_scale, int | float) and math.isfinite(self.init_scale)
                and self.init_scale > 0):  # fmt: skip
            raise ValueError(f"spectrum.init_scale={self.init_scale!r} must be a finite number > 0")
        object.__setattr__(self, "init_scale", float(self.init_scale))
        if self.mode == "free":
            if self.lo not in (None, -math.inf) or self.hi not in (None, math.inf):
                raise ValueError(
                    "spectrum.lo/hi must be None for mode='free' (its eigenvalues are unbounded)"
                )
            object.__setattr__(self, "lo", -math.inf)
            object.__setattr__(self, "hi", math.inf)
            if self.bound != "clip":
                raise ValueError("spectrum.bound='smooth' needs a bounded interval; mode='free' has none")
        else:
            dlo, dhi = _DEFAULT_RANGE[self.mode]
            # Resolve the defaults into the fields, so Spectrum(mode=m).lo/.hi expose them and two specs
            # meaning the same interval compare (and hash) equal.
            object.__setattr__(self, "lo", dlo if self.lo is None else float(self.lo))
            object.__setattr__(self, "hi", dhi if self.hi is None else float(self.hi))
            lo, hi = self.lo, self.hi
            for name, v in (("spectrum.lo", lo), ("spectrum.hi", hi)):
                if not math.isfinite(v):
                    raise ValueError(f"{name}={v} must be finite")
            if not lo < hi:
                raise ValueError(f"spectrum.lo={lo} must be < spectrum.hi={hi}")
            if self.mode == "smooth" and lo < 0:
                raise ValueError(f"spectrum.lo={lo} must be >= 0 for mode='smooth' (eigenvalues in (lo, hi])")
            if self.mode == "sharpen" and hi > 0:
                raise ValueError(
                    f"spectrum.hi={hi} must be <= 0 for mode='sharpen' (eigenvalues in [lo, hi))"
                )
        if not (math.isfinite(self.max_cond) and self.max_cond >= 1.0):
            raise ValueError(f"spectrum.max_cond={self.max_cond} must be a finite number >= 1")
        if not 0.0 <= self.margin < 0.5:
            raise ValueError(f"spectrum.margin={self.margin} must be in [0, 0.5)")

    def closed_interval(self, alpha: float = 1.0) -> tuple[float, float]:
        """[a, b] that every composed eigenvalue lies in, open ends pulled in by `margin`, scaled by alpha.

        Args:
          alpha: DeepNorm's residual scale (1 otherwise): the composed H has eigenvalues in
            alpha * [lo, hi] (see the class docstring).

        Returns:
          (a, b); (-inf, inf) for mode="free".
        """
        if self.mode == "free":
            return (-math.inf, math.inf)
        lo, hi = self.lo, self.hi
        eps = self.margin * (hi - lo)
        a = lo + eps if self.mode == "smooth" else lo  # smooth: (lo, hi]
        b = hi - eps if self.mode == "sharpen" else hi  # sharpen: [lo, hi)
        return alpha * a, alpha * b


def deepnorm(arch: str, n_layers: int, m_layers: int | None = None):
    """DeepNet residual scale alpha and init scale beta (Wang et al. 2022, arXiv 2203.00555, Table 1).

    x_{l+1} = LN(alpha x_l + G_l(x_l)); W_V, W_O and both FFN matrices are scaled by beta at init.
      "encoder":          n_layers = N.  alpha = (2N)^(1/4),  beta = (8N)^(-1/4)
      "decoder":          n_layers = M.  alpha = (2M)^(1/4),  beta = (8M)^(-1/4)
      "encoder_decoder":  N encoder and M = m_layers decoder layers; returns ((alpha_e, beta_e), (alpha_d,
                          beta_d)) with alpha_e = 0.81 (N^4 M)^(1/16), beta_e = 0.87 (N^4 M)^(-1/16),
                          alpha_d = (3M)^(1/4), beta_d = (12M)^(-1/4).
    We follow the paper where torchscale differs (its encoder beta in encoder-decoder models is 1.15x).

    Args:
      arch: "encoder" | "decoder" | "encoder_decoder".
      n_layers: N (encoder) or M (decoder) for the one-stack archs; N, the encoder's layers, for
        "encoder_decoder". A positive integer.
      m_layers: M, the decoder's layers; a positive integer for "encoder_decoder", None for the others.

    Returns:
      (alpha, beta) as floats, or ((alpha_e, beta_e), (alpha_d, beta_d)) for "encoder_decoder".

    Example::

      >>> from jaxsmooth import deepnorm
      >>> alpha, beta = deepnorm("encoder", 18)  # (2 N)^(1/4), (8 N)^(-1/4)
      >>> round(alpha, 4), round(beta, 4)
      (2.4495, 0.2887)
    """
    _check_choice("arch", arch, ARCHS)
    if not (isinstance(n_layers, int) and n_layers >= 1):
        raise ValueError(f"n_layers={n_layers!r} must be a positive integer")
    if arch == "encoder_decoder":
        if not (isinstance(m_layers, int) and m_layers >= 1):
            raise ValueError(f"m_layers={m_layers!r} must be a positive integer for arch='encoder_decoder'")
        nm = float(n_layers) ** 4 * m_layers
        enc = (0.81 * nm ** (1 / 16), 0.87 * nm ** (-1 / 16))
        dec = ((3.0 * m_layers) ** 0.25, (12.0 * m_layers) ** -0.25)
        return enc, dec
    if m_layers is not None:
        raise ValueError(f"m_layers is only used with arch='encoder_decoder', got arch={arch!r}")
    return (2.0 * n_layers) ** 0.25, (8.0 * n_layers) ** -0.25


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and options of a `Transformer` stack (and the ViT / CausalLM built on it).

    Hashable, so it is a static argument of jit. Build it from an ml_collections ConfigDict with
    `ModelConfig.from_dict(cfg.to_dict())`. Construction checks the fields: a bad value raises a
    `ValueError` naming it (`model.<field>`). The comments on the fields give the reasons behind the
    defaults.

    Attributes:
      depth: number of blocks L; a positive integer.
      d_model: width D; a positive integer.
      num_heads: heads H; a positive integer with D % H == 0.
      mlp_ratio: MLP hidden width = mlp_ratio * D; > 0.
      spectrum: the spectral constraint on H = W_V W_O; None: unconstrained W_V, W_O (the baseline).
      residual: "pre_ln" | "post_ln" | "deepnorm".
      deepnorm_arch: "encoder" | "decoder": which DeepNet formula sets alpha, beta (`deepnorm`).
      ln_gain: "free" | "positive" (gamma = softplus(g) > 0).
      value_norm: what the attention's value path reads, residual="pre_ln" only: "rms" x / rms(x) (no
        centring, gain or bias; the branch applies H itself, so the spectral promise holds for any LN
        parameters and any basis; Q and K still read LN1(x)), or "ln" LN1(x), the standard pre-LN block,
        whose map is C diag(gain) H (docs/theory.md), where LN gains can flip the eigenvalue signs.
      remat: "none" | "full" | "nested".
      remat_group: nested remat: layers per checkpointed group, in [1, depth]; None = round(sqrt(depth)).
      scan: False runs a Python loop over layers (a test oracle; compile time grows with depth).
      dropout: rate on attention probabilities and both branch outputs; in [0, 1).
      drop_path: stochastic depth (Huang et al. 2016, DeiT's recipe): each branch output of layer l is
        dropped for a whole example with probability drop_path * l / (depth - 1) (timm's linear rule),
        kept ones / (1 - p); in [0, 1).
      dtype: compute dtype, "float32" | "bfloat16" | "float16"; params stay float32.
      qkv_bias: biases on the Q and K projections.
      vo_bias: biases on the V and O projections, for every variant alike; off by default because a bias
        adds the same vector to every token, a DC term outside the spectral constraint (docs/design.md).
      branch_scale: "none" | "attnscale" | "featscale" (the Wang et al. 2022 baselines).
      ln_eps: the LayerNorm epsilon; > 0.
      ln_lr: DeepNorm only, how fast the blocks' LayerNorm gains and biases learn: "depth" scales their
        updates by 1 / (2L) (`ln_lr_scale`), "none" leaves the optimiser's lr unscaled.
      fast_backward: projections and MLP use `jaxsmooth.attention.dense` (a backward pass laid out for
        XLA:CPU, reverse mode only); False for forward-mode autodiff (jax.jvp, jax.jacfwd).

    Example::

      >>> from jaxsmooth import ModelConfig, Spectrum
      >>> cfg = ModelConfig(depth=12, d_model=192, num_heads=3, spectrum=Spectrum("sharpen"))
      >>> cfg.head_dim, cfg.mlp_dim
      (64, 768)
      >>> cfg == ModelConfig.from_dict({"depth": 12, "d_model": 192, "num_heads": 3,
      ...                               "spectrum": {"mode": "sharpen"}})
      True
      >>> alpha, beta = ModelConfig(depth=1000, residual="deepnorm").alpha_beta  # (2L)^(1/4), (8L)^(-1/4)
      >>> round(alpha, 3), round(beta, 4)
      (6.687, 0.1057)
    """

    depth: int = 6  # number of blocks L
    d_model: int = 64  # width D
    num_heads: int = 4  # heads H; D % H == 0
    mlp_ratio: float = 4.0  # MLP hidden width = mlp_ratio * D
    spectrum: Spectrum | None = None  # None: unconstrained W_V, W_O (the baseline)
    residual: Literal["pre_ln", "post_ln", "deepnorm"] = "pre_ln"
    deepnorm_arch: Literal["encoder", "decoder"] = "encoder"  # which DeepNet formula sets alpha, beta
    ln_gain: Literal["free", "positive"] = "free"  # positive: gamma = softplus(g) > 0
    # pre_ln only: what the attention's value path reads. "rms": x / rms(x) (no centring, gain or bias), so
    # the map the branch applies is H itself and the spectral promise holds for any LN parameters and any
    # basis; Q and K still read LN1(x). "ln": LN1(x), the standard pre-LN block, whose map is
    # C diag(gain) H (docs/theory.md): LN gains can flip the eigenvalue signs there.
    value_norm: Literal["rms", "ln"] = "rms"
    remat: Literal["none", "full", "nested"] = "none"
    remat_group: int | None = None  # nested: layers per checkpointed group; None = round(sqrt(depth))
    scan: bool = True  # False: a Python loop over layers (a test oracle; compile time grows with depth)
    dropout: float = 0.0  # on attention probabilities and both branch outputs
    # Stochastic depth (Huang et al. 2016, DeiT's recipe): each branch output of layer l is dropped for a
    # whole example with probability drop_path * l / (depth - 1) (timm's linear rule), kept ones / (1 - p).
    drop_path: float = 0.0
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # compute dtype; params stay float32
    qkv_bias: bool = True  # biases on the Q and K projections
    # Biases on the V and O projections, for every variant alike: a bias adds the same vector to every
    # token (a DC term outside the spectral constraint), so they are off by default (docs/design.md).
    vo_bias: bool = False
    branch_scale: Literal["none", "attnscale", "featscale"] = "none"  # Wang et al. 2022 baselines
    ln_eps: float = 1e-6
    # DeepNorm only: how fast the blocks' LayerNorm gains and biases learn. All 2L LayerNorms sit on the
    # main path (x_{l+1} = LN(alpha x_l + G(x_l))), so their changes are not damped by alpha and beta like
    # the branch matrices': with Adam (~lr per parameter per step) they moved a 1000-layer stack's output
    # by ~2L lr per step and collapsed it to an input-independent output within ~120 steps at lr 1e-3
    # (experiments/results/deep/README.md). "depth": their updates are scaled by 1 / (2L), bounding that
    # change by O(lr) as DeepNet's beta does for the matrices; "none": the optimiser's lr, unscaled.
    ln_lr: Literal["depth", "none"] = "depth"
    # Projections and MLP use `jaxsmooth.attention.dense`, whose backward pass is laid out for XLA:CPU
    # (same values as autodiff, ~6% faster ViT-Tiny step). It is reverse-mode only: set False to use
    # forward-mode autodiff (jax.jvp, jax.jacfwd) through the model.
    fast_backward: bool = True

    def __post_init__(self):
        for name in ("depth", "d_model", "num_heads"):
            v = getattr(self, name)
            if not (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
                raise ValueError(f"model.{name}={v!r} must be a positive integer")
        if self.d_model % self.num_heads:
            raise ValueError(f"model.num_heads={self.num_heads} must divide model.d_model={self.d_model}")
        if not (self.mlp_ratio > 0 and math.isfinite(self.mlp_ratio)):
            raise ValueError(f"model.mlp_ratio={self.mlp_ratio} must be > 0")
        if self.spectrum is not None and not isinstance(self.spectrum, Spectrum):
            raise ValueError(f"model.spectrum must be a Spectrum or None, got {type(self.spectrum).__name__}")
        _check_choice("model.residual", self.residual, RESIDUALS)
        _check_choice("model.deepnorm_arch", self.deepnorm_arch, ("encoder", "decoder"))
        _check_choice("model.ln_gain", self.ln_gain, LN_GAINS)
        _check_choice("model.value_norm", self.value_norm, VALUE_NORMS)
        if self.value_norm == "ln" and self.residual != "pre_ln":
            raise ValueError(
                f"model.value_norm='ln' applies to residual='pre_ln' only (a {self.residual} branch reads"
                " the residual stream directly); leave it at 'rms'"
            )
        _check_choice("model.remat", self.remat, REMATS)
        _check_choice("model.dtype", self.dtype, DTYPES)
        _check_choice("model.branch_scale", self.branch_scale, BRANCH_SCALES)
        if self.remat_group is not None and not (1 <= self.remat_group <= self.depth):
            raise ValueError(f"model.remat_group={self.remat_group} must be in [1, depth={self.depth}]")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout={self.dropout} must be in [0, 1)")
        if not 0.0 <= self.drop_path < 1.0:
            raise ValueError(f"model.drop_path={self.drop_path} must be in [0, 1)")
        if not isinstance(self.fast_backward, bool):
            raise ValueError(f"model.fast_backward={self.fast_backward!r} must be True or False")
        if not self.ln_eps > 0:
            raise ValueError(f"model.ln_eps={self.ln_eps} must be > 0")
        _check_choice("model.ln_lr", self.ln_lr, LN_LRS)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    @property
    def mlp_dim(self) -> int:
        return max(1, int(round(self.mlp_ratio * self.d_model)))

    @property
    def alpha_beta(self) -> tuple[float, float]:
        """(alpha, beta): DeepNet constants for residual='deepnorm', else (1, 1). Computed once per config."""
        if self.residual != "deepnorm":
            return 1.0, 1.0
        return deepnorm(self.deepnorm_arch, self.depth)

    @property
    def ln_lr_scale(self) -> float:
        """Factor on the learning rate of the blocks' LayerNorm gains and biases: 1 / (2 depth) for
        residual="deepnorm" with ln_lr="depth" (see the field), else 1."""
        if self.residual != "deepnorm" or self.ln_lr == "none":
            return 1.0
        return 1.0 / (2 * self.depth)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        """From a plain dict (e.g. ConfigDict.to_dict()); `spectrum` may be a dict, or None / {} / "none".

        Args:
          d: field name -> value. `spectrum` may be a `Spectrum`, a dict of its fields (a missing or
            "none" mode means no constraint), or None / "" / "none".

        Returns:
          The validated ModelConfig. Unknown model or spectrum fields raise a ValueError listing the
          known ones.
        """
        d = dict(d)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown model config field(s) {unknown}; known fields: {sorted(known)}")
        spec = d.get("spectrum")
        if isinstance(spec, dict):
            spec = dict(spec)
            if spec.get("mode") in (None, "none"):
                spec = None
            else:
                sknown = {f.name for f in dataclasses.fields(Spectrum)}
                bad = sorted(set(spec) - sknown)
                if bad:
                    raise ValueError(f"unknown spectrum field(s) {bad}; known fields: {sorted(sknown)}")
                spec = Spectrum(**spec)
        elif spec in ("none", ""):
            spec = None
        d["spectrum"] = spec
        return cls(**d)
