"""The spectral promise holds on the map the block really applies (docs/theory.md): for every packaged
config, whatever the LayerNorm parameters (huge, negative, zero gains; huge biases) and the spectral
parameters, the effective map's eigenvalues stay on the mode's side of zero; the block's branch applies
exactly that map; and the standard pre-LN value path (value_norm="ln") breaks the promise under the same
gains, so the test can fail."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxsmooth
from jaxsmooth import configs, theory
from jaxsmooth.config import ModelConfig
from jaxsmooth.tools import cli


def _packaged_model_config(name: str, mode: str, basis: str | None = None) -> ModelConfig:
    model = configs.load(f"{name}:quick,mode={mode}").model.to_dict()
    if basis:
        model["spectrum"]["basis"] = basis
    # The promise is per layer: two layers of the packaged block (its residual type, value path, LN gain
    # type, basis and bound), at the quick width.
    return ModelConfig.from_dict({**model, "depth": 2, "remat": "none"})


def _adversarial(model: nnx.Module, seed: int) -> None:
    """LN gains of both signs from 1e-3 to 1e3 and exact zeros, huge LN biases, huge spectral params."""
    rng = np.random.default_rng(seed)
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        shape = var.get_value().shape
        name = path[-1]
        if name == "gain":
            v = rng.choice([-1.0, 1.0], shape) * 10.0 ** rng.uniform(-3, 3, shape)
            v[..., ::5] = 0.0
        elif name == "bias":
            v = rng.normal(0, 100.0, shape)
        elif name in ("psi", "theta", "theta_w", "theta_s"):
            v = rng.normal(0, 1.0, shape) * 10.0 ** rng.uniform(-4, 4, shape)
        else:
            continue
        var.set_value(jnp.asarray(v, jnp.float32))


MODES = {"sharpen": lambda re: re < 0, "smooth": lambda re: re > 0}


CASES = [(n, None) for n in cli.config_names()] + [("digits", "general"), ("deep1000", "general")]


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("name, basis", CASES)
def test_effective_map_keeps_the_sign_under_adversarial_parameters(name, basis, mode):
    """Every packaged config (its default orthogonal basis), and the general (non-symmetric) basis too:
    with value_norm="rms" (pre-LN) or post-LN/DeepNorm the effective map is H / alpha for any basis."""
    mcfg = _packaged_model_config(name, mode, basis)
    assert mcfg.spectrum is not None and mcfg.spectrum.mode == mode
    stack = jaxsmooth.nnx.Transformer(mcfg, rngs=nnx.Rngs(0))
    for seed in range(3):
        _adversarial(stack, seed)
        m_LxDxD = np.asarray(stack.effective_update(), np.float64)
        ref = stack.config.value_norm  # the jit-able map equals the theory's, layer by layer
        for layer, m in enumerate(m_LxDxD):
            h = np.asarray(stack.effective_h()[layer], np.float64)
            g = np.asarray(stack.ln_gains()[layer, 0], np.float64)
            want = theory.effective_update(h, g, mcfg.residual, mcfg.alpha_beta[0], value_norm=ref)
            np.testing.assert_allclose(m, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
            ev = theory.effective_eigenvalues(m, mcfg.residual, value_norm=ref)
            assert np.all(MODES[mode](ev.real)), (name, seed, layer, ev.real.min(), ev.real.max())
        exact = np.sort(np.asarray(stack.exact_effective_eigenvalues()), axis=1)
        host = [theory.effective_eigenvalues(m, mcfg.residual, value_norm=ref).real for m in m_LxDxD]
        np.testing.assert_allclose(exact, np.sort(host, axis=1), rtol=1e-3, atol=1e-4)


def test_standard_pre_ln_value_path_breaks_the_promise_under_the_same_gains():
    """The negative control: with value_norm="ln" (V reads LN1(x)) the same adversarial gains put
    eigenvalues of the effective map C diag(g) H on the wrong side, while H itself stays in range."""
    mcfg = _packaged_model_config("digits", "sharpen")
    mcfg = ModelConfig.from_dict({**mcfg.__dict__, "spectrum": mcfg.spectrum.__dict__, "value_norm": "ln"})
    stack = jaxsmooth.nnx.Transformer(mcfg, rngs=nnx.Rngs(0))
    _adversarial(stack, 0)
    assert float(jnp.max(stack.eigenvalues())) < 0  # H keeps its promise ...
    ev = [
        theory.effective_eigenvalues(m, "pre_ln", value_norm="ln")
        for m in np.asarray(stack.effective_update())
    ]
    assert max(float(e.real.max()) for e in ev) > 0  # ... the map the block applies does not
    assert stack.exact_effective_eigenvalues() is None


@pytest.mark.parametrize("value_norm", ["rms", "ln"])
def test_the_pre_ln_block_applies_exactly_the_effective_map(value_norm):
    """One token (attention = 1) and the MLP switched off: the block adds LN-affine-free branch output
    a with sigma(x) (a - b H) = x M (value_norm="ln") or rms(x) a = x M ("rms"), M = effective_update."""
    d = 16
    mcfg = ModelConfig(depth=1, d_model=d, num_heads=4, spectrum=jaxsmooth.Spectrum("sharpen"),
                       value_norm=value_norm, ln_eps=1e-12)  # fmt: skip
    stack = jaxsmooth.nnx.Transformer(mcfg, rngs=nnx.Rngs(0))
    _adversarial(stack, 1)
    stack.blocks.mlp.w2.set_value(jnp.zeros_like(stack.blocks.mlp.w2.get_value()))
    stack.blocks.mlp.b2.set_value(jnp.zeros_like(stack.blocks.mlp.b2.get_value()))
    x_Bx1xD = jax.random.normal(jax.random.key(2), (8, 1, d)) * 3.0 + 1.0
    graphdef, state = nnx.split(stack.blocks)
    block = nnx.merge(graphdef, jax.tree.map(lambda a: a[0], state))
    a = np.asarray(block(x_Bx1xD)[0] - x_Bx1xD, np.float64)[:, 0]
    x = np.asarray(x_Bx1xD, np.float64)[:, 0]
    m = np.asarray(stack.effective_update()[0], np.float64)
    h = np.asarray(stack.effective_h()[0], np.float64)
    if value_norm == "rms":
        scale = np.sqrt(np.mean(x**2, axis=1, keepdims=True))
        got = scale * a
    else:
        b = np.asarray(block.ln1.bias.get_value(), np.float64)
        sigma = np.std(x, axis=1, keepdims=True)
        got = sigma * (a - b @ h)
    np.testing.assert_allclose(got, x @ m, rtol=1e-3, atol=1e-3 * np.abs(x @ m).max())
