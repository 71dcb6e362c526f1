"""jaxsmooth's attention is a drop-in for Flax's: a block written against nnx.MultiHeadAttention /
nn.MultiHeadDotProductAttention works with only the class swapped (plus spectrum=); with copied weights the
unconstrained layer gives Flax's outputs (masks, leading batch dims, cross-attention); dropout follows
.train()/.eval() and `deterministic`; sow_weights sows; the KV cache equals full recomputation."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxsmooth
from jaxsmooth import linen as jlinen
from jaxsmooth.nnx import Attention, CausalLM, SpectralAttention

D, N, T = 16, 4, 5
SPEC = jaxsmooth.Spectrum("sharpen")


class FlaxBlock(nnx.Module):
    """Written the way Flax users write a pre-LN block; only `attention_cls` (and `extra`) change."""

    def __init__(self, d, heads, *, attention_cls=nnx.MultiHeadAttention, rngs, **extra):
        self.ln = nnx.LayerNorm(d, rngs=rngs)
        self.attn = attention_cls(
            num_heads=heads, in_features=d, qkv_features=d, out_features=d, dropout_rate=0.2,
            broadcast_dropout=False, decode=False, rngs=rngs, **extra,
        )  # fmt: skip

    def __call__(self, x, mask=None):
        return x + self.attn(self.ln(x), mask=mask, sow_weights=True)


def _inputs():
    x = jax.random.normal(jax.random.key(1), (2, 3, T, D))  # two leading batch dims
    keep = jnp.ones((2, 3, T)).at[:, :, -2:].set(0)  # the last two tokens are padding
    return x, nnx.make_attention_mask(keep, keep)  # [2, 3, 1, T, T]


def _copy_flax_mha_into(ours: Attention, theirs: nnx.MultiHeadAttention) -> None:
    """Flax keeps [in, heads, head_dim] / [heads, head_dim, out] kernels; ours are [D, D] (same order)."""
    for a, b in (("w_q", "query"), ("w_k", "key"), ("w_v", "value")):
        getattr(ours, a)[...] = getattr(theirs, b).kernel[...].reshape(D, D)
        getattr(ours, "b" + a[1:])[...] = getattr(theirs, b).bias[...].reshape(D)
    ours.w_o[...] = theirs.out.kernel[...].reshape(D, D)
    ours.b_o[...] = theirs.out.bias[...]


@pytest.mark.parametrize("cls", ["flax", "attention", "spectral"])
def test_nnx_block_works_with_only_the_class_swapped(cls):
    extra = {"spectral": {"attention_cls": SpectralAttention, "spectrum": SPEC},
             "attention": {"attention_cls": Attention}, "flax": {}}[cls]  # fmt: skip
    block = FlaxBlock(D, N, rngs=nnx.Rngs(0), **extra)
    x, mask = _inputs()
    block.eval()
    y1, y2 = block(x, mask), block(x, mask)
    np.testing.assert_array_equal(y1, y2)  # eval: deterministic
    weights = nnx.pop(block, nnx.Intermediate)["attn"]["attention_weights"].get_value()[-1]
    chex.assert_shape(weights, (2, 3, N, T, T))
    chex.assert_trees_all_close(weights[..., :3, :].sum(-1), jnp.ones((2, 3, N, 3)), atol=1e-5)
    assert float(jnp.abs(weights[..., :3, 3:]).max()) == 0.0  # padded keys get no weight
    block.train()
    z1, z2 = block(x, mask), block(x, mask)
    assert np.all(np.isfinite(z1)) and float(jnp.abs(z1 - z2).max()) > 1e-3  # dropout on, fresh keys
    # An explicit deterministic=True overrides .train(), as in Flax.
    np.testing.assert_allclose(block.attn(x, mask=mask, deterministic=True),
                               block.attn(x, mask=mask, deterministic=True))  # fmt: skip
    if cls == "spectral":
        assert float(jnp.max(block.attn.eigenvalues())) < 0  # the constraint holds


def test_unconstrained_attention_with_flax_weights_gives_flax_outputs():
    theirs = nnx.MultiHeadAttention(N, D, decode=False, rngs=nnx.Rngs(0))
    ours = Attention(N, D, rngs=nnx.Rngs(1))
    _copy_flax_mha_into(ours, theirs)
    x, mask = _inputs()
    np.testing.assert_allclose(ours(x, mask=mask), theirs(x, mask=mask), atol=2e-5)
    kv = jax.random.normal(jax.random.key(2), (2, 3, T + 2, D))  # cross-attention, S != T
    np.testing.assert_allclose(ours(x, kv), theirs(x, kv), atol=2e-5)
    np.testing.assert_allclose(ours(x, kv, 2 * kv), theirs(x, kv, 2 * kv), atol=2e-5)
    causal = nnx.make_causal_mask(jnp.ones((2, 3, T)))
    np.testing.assert_allclose(ours(x, mask=causal), theirs(x, mask=causal), atol=2e-5)


class LinenBlock(nn.Module):
    attention_cls: type = nn.MultiHeadDotProductAttention
    extra: dict | None = None

    @nn.compact
    def __call__(self, x, mask=None, deterministic=True):
        attn = self.attention_cls(num_heads=N, qkv_features=D, dropout_rate=0.2, **(self.extra or {}))
        return x + attn(nn.LayerNorm()(x), mask=mask, deterministic=deterministic, sow_weights=True)


@pytest.mark.parametrize("cls", ["flax", "attention", "spectral"])
def test_linen_block_works_with_only_the_class_swapped(cls):
    kw = {"spectral": dict(attention_cls=jlinen.SpectralAttention, extra={"spectrum": SPEC}),
          "attention": dict(attention_cls=jlinen.Attention), "flax": {}}[cls]  # fmt: skip
    block = LinenBlock(**kw)
    x, mask = _inputs()
    variables = block.init(jax.random.key(0), x, mask)
    y, state = block.apply(variables, x, mask, mutable=["intermediates"])
    weights = jax.tree.leaves(state["intermediates"])[0]
    assert weights.shape == (2, 3, N, T, T)
    assert float(jnp.abs(weights[..., :3, 3:]).max()) == 0.0
    rng = {"dropout": jax.random.key(5)}
    z = block.apply(variables, x, mask, deterministic=False, rngs=rng)
    assert float(jnp.abs(z - y).max()) > 1e-3  # dropout active
    if cls == "attention":  # with Flax's weights, Flax's outputs
        theirs = LinenBlock().init(jax.random.key(0), x, mask)["params"]
        mha = theirs["MultiHeadDotProductAttention_0"]
        p = dict(variables["params"])
        ours = dict(p["Attention_0"])
        for a, b in (("w_q", "query"), ("w_k", "key"), ("w_v", "value")):
            ours[a], ours["b" + a[1:]] = mha[b]["kernel"].reshape(D, D), mha[b]["bias"].reshape(D)
        ours["w_o"], ours["b_o"] = mha["out"]["kernel"].reshape(D, D), mha["out"]["bias"]
        p["Attention_0"], p["LayerNorm_0"] = ours, theirs["LayerNorm_0"]
        np.testing.assert_allclose(
            block.apply({"params": p}, x, mask), LinenBlock().apply({"params": theirs}, x, mask), atol=2e-5
        )


@pytest.mark.parametrize("spectral", [False, True])
def test_kv_cache_decoding_equals_full_causal_recomputation(spectral):
    kw = {"spectrum": SPEC} if spectral else {}
    layer = (SpectralAttention if spectral else Attention)(N, D, rngs=nnx.Rngs(0), **kw)
    x = jax.random.normal(jax.random.key(3), (2, 7, D))
    full = layer(x, is_causal=True)
    layer.init_cache(x.shape)
    chunks = [x[:, :3], x[:, 3:4], x[:, 4:6], x[:, 6:]]  # a prompt, then 1 or 2 tokens at a time
    got = jnp.concatenate([layer(c, decode=True) for c in chunks], axis=1)
    chex.assert_trees_all_close(got, full, atol=2e-5)
    assert int(layer.cache_index[...]) == 7
    # Linen: init shapes the cache from the full-length input, then tokens are fed
    lin = jlinen.SpectralAttention(num_heads=N, spectrum=SPEC, decode=True)
    v = lin.init(jax.random.key(0), x)
    params = jlinen.nnx_to_linen_params(layer) if spectral else v["params"]
    cache = v["cache"]
    outs = []
    for c in chunks:
        y, mutated = lin.apply({"params": params, "cache": cache}, c, mutable=["cache"])
        cache = mutated["cache"]
        outs.append(y)
    ref = lin.clone(decode=False).apply({"params": params}, x, is_causal=True)
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), ref, atol=2e-5)


@pytest.mark.parametrize("residual", ["pre_ln", "deepnorm"])
def test_cached_greedy_generation_equals_full_recomputation_and_compiles_once(residual):
    cfg = jaxsmooth.ModelConfig(depth=2, d_model=D, num_heads=N, residual=residual, spectrum=SPEC)
    model = CausalLM(cfg, vocab_size=13, max_len=20, rngs=nnx.Rngs(0))
    model.head_w[...] = 3 * model.head_w[...]  # sharper logits: greedy picks are not near-ties
    prompt = jnp.asarray([[1, 2, 3, 4], [5, 6, 7, 8]])
    out = model.generate(prompt, 9, temperature=0.0)
    ids = prompt
    for _ in range(9):  # no cache: recompute the whole sequence for every token
        ids = jnp.concatenate([ids, jnp.argmax(model(ids)[:, -1], -1)[:, None]], axis=1)
    np.testing.assert_array_equal(out, ids)
    from jaxsmooth.nnx import models

    before = models._generate._cache_size()
    sampled = model.generate(prompt + 1, 9, temperature=0.7, top_k=5, rng=jax.random.key(0))
    model.generate(prompt + 2, 9, temperature=1.3, top_k=5, rng=jax.random.key(1))
    assert models._generate._cache_size() == before + 1  # new top_k: one compile; new temperature: none
    assert sampled.shape == (2, 13) and int(sampled.max()) < 13
    with pytest.raises(ValueError, match="max_len"):
        model.generate(prompt, 17)
    with pytest.raises(ValueError, match="rng"):
        model.generate(prompt, 2, temperature=1.0)
