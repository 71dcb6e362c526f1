"""jaxsmooth.tools.convert: the projection onto a spectral constraint is exact for an H already inside it and
Frobenius-nearest otherwise (no random in-constraint H is nearer; the error splits into the skew part and
the clipped eigenvalues); the head assignment is the best of all partitions; converted layers attend
exactly as their source and keep (or drop) the biases' DC term as asked; converting a layer or model that
already satisfies the constraint changes none of its outputs; whole-model and BERT conversion keep every
other parameter; the command line writes directories that load back."""

import itertools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
from flax import nnx
from test_bert import TINY, tiny_tensors, write_tiny

from jaxsmooth import Spectrum, spectral
from jaxsmooth.config import ModelConfig
from jaxsmooth.nnx import Attention, CausalLM, SpectralAttention, ViT
from jaxsmooth.tools import bert, convert

D, HEADS = 8, 2


def _orth(rng, d=D):
    q, r = np.linalg.qr(rng.normal(size=(d, d)))
    return q * np.sign(np.diag(r))[None, :]


def _inside(rng, spectrum, d=D, alpha=1.0):
    """Eigenvalues strictly inside the spectrum's interval (away from the ends by 5% of its width)."""
    a, b = spectrum.closed_interval(alpha) if spectrum.mode != "free" else (-2.0, 2.0)
    pad = 0.05 * (b - a)
    return rng.uniform(a + pad, b - pad, d)


SPECTRA = [
    Spectrum("sharpen"),
    Spectrum("smooth", hi=2.5),
    Spectrum("neutral", lo=-0.5, hi=3.0, bound="smooth"),
    Spectrum("free", param_scale="unit"),
    Spectrum("sharpen", basis="general"),
]


@pytest.mark.parametrize("spectrum", SPECTRA, ids=lambda s: f"{s.mode}-{s.bound}-{s.basis}-{s.param_scale}")
def test_projection_is_exact_for_h_inside_the_constraint(spectrum):
    rng = np.random.default_rng(0)
    q, lam = _orth(rng), _inside(rng, spectrum)
    h = (q * lam) @ q.T
    theta, psi, info = convert.nearest_spectral(h, spectrum)
    assert info["rel_error"] < 1e-13 and info["frac_clipped"] == 0.0  # the float64 projection is H
    assert info["skew_floor"] < 1e-15
    np.testing.assert_allclose(spectral.compose(theta, psi, spectrum), h, atol=2e-6)  # float32 params
    np.testing.assert_allclose(np.sort(spectral.eigenvalues(psi, spectrum)), np.sort(lam), atol=2e-6)
    u = theta if spectrum.basis == "orthogonal" else theta["u"]
    # QR of an orthogonal matrix is (Q, I): orthogonal(theta) is theta's own direction, exactly.
    scale = np.abs(np.asarray(u)).max() / np.abs(spectral.orthogonal(u)).max()
    np.testing.assert_allclose(spectral.orthogonal(u) * scale, u, atol=1e-6)
    assert np.isclose(scale, 1.0 if spectrum.param_scale == "width" else np.sqrt(D))


@pytest.mark.parametrize("spectrum", SPECTRA[:3], ids=lambda s: s.mode)
def test_projection_is_frobenius_nearest(spectrum):
    rng = np.random.default_rng(1)
    a, b = spectrum.closed_interval()
    for trial in range(4):
        h = rng.normal(size=(D, D)) * (trial + 1) / 2  # non-symmetric, eigenvalues on both sides
        theta, psi, info = convert.nearest_spectral(h, spectrum)
        w_v, w_o = spectral.value_projection(theta, psi, spectrum)
        h_spec = np.asarray(w_v @ w_o, np.float64)
        best = np.linalg.norm(h - h_spec)
        assert np.isclose(best / np.linalg.norm(h), info["rel_error"], rtol=1e-5)
        # Pythagoras: the skew part plus the clipped part of the symmetric part's eigenvalues, exactly.
        mu = np.linalg.eigvalsh((h + h.T) / 2)
        want = np.sqrt(np.linalg.norm((h - h.T) / 2) ** 2 + np.sum((mu - np.clip(mu, a, b)) ** 2))
        assert np.isclose(info["rel_error"] * np.linalg.norm(h), want, rtol=1e-12)
        assert info["rel_error"] >= info["skew_floor"] and info["frac_clipped"] > 0
        # No point of the constraint is nearer: random ones, and small moves away from the projection.
        q_s, lam_s = np.linalg.eigh(h_spec)
        for _ in range(200):
            x = (lambda q, lam: (q * lam) @ q.T)(_orth(rng), rng.uniform(a, b, D))
            assert np.linalg.norm(h - x) >= best - 1e-6
            k = rng.normal(size=(D, D)) * 1e-2
            q_near = q_s @ scipy.linalg.expm(k - k.T)
            lam_near = np.clip(lam_s + rng.normal(size=D) * 1e-2, a, b)
            x = (q_near * lam_near) @ q_near.T
            assert np.linalg.norm(h - x) >= best - 1e-6


def test_general_basis_refinement_never_increases_the_error():
    rng = np.random.default_rng(2)
    spec = Spectrum("neutral", lo=-2.0, hi=2.0, basis="general", max_cond=4.0)
    # A non-normal H with real eigenvalues that the general basis holds exactly (cond(V) = 3 <= 4).
    v = _orth(rng) @ np.diag(np.linspace(1.0, 3.0, D)) @ _orth(rng).T
    h_general = v @ np.diag(_inside(rng, spec)) @ np.linalg.inv(v)
    h_sym = (lambda q: (q * _inside(rng, spec)) @ q.T)(_orth(rng))  # the symmetric start is optimal here
    for h in (h_general, h_sym, rng.normal(size=(D, D))):
        _, _, start = convert.nearest_spectral(h, spec)
        _, psi, info = convert.nearest_spectral(h, spec, refine_steps=300, refine_lr=1e-2)
        assert info["rel_error"] <= start["rel_error"] + 1e-6
        assert spec.lo <= float(jnp.min(spectral.eigenvalues(psi, spec)))
        assert float(jnp.max(spectral.eigenvalues(psi, spec))) <= spec.hi
    # Where the symmetric projection is far off, the refinement gets most of the way.
    _, _, start = convert.nearest_spectral(h_general, spec)
    _, _, info = convert.nearest_spectral(h_general, spec, refine_steps=300, refine_lr=1e-2)
    assert start["rel_error"] > 0.1 and info["rel_error"] < 0.5 * start["rel_error"]


def _head_error(q, lam, maps, order):
    """sum_h ||H_h - sum_{j in head h} lam_j q_j q_j^T||^2 for the eigenpairs in `order`, head-major."""
    heads, d = maps.shape[0], q.shape[0]
    blocks = np.asarray(order).reshape(heads, d // heads)
    return sum(np.linalg.norm(maps[h] - (q[:, b] * lam[b]) @ q[:, b].T) ** 2 for h, b in enumerate(blocks))


def test_head_assignment_is_the_best_partition():
    rng = np.random.default_rng(3)
    d, heads = 6, 3
    for _ in range(3):
        maps = rng.normal(size=(heads, d, d))
        q, lam = _orth(rng, d), rng.normal(size=d)
        perm = convert.assign_heads(q, lam, maps)
        assert sorted(perm) == list(range(d))
        every = [_head_error(q, lam, maps, o) for o in itertools.permutations(range(d))]
        assert np.isclose(_head_error(q, lam, maps, perm), min(every))
        assert min(every) < max(every) - 1e-3  # the choice matters


def _layer_pair(kind):
    if kind == "flax":
        src = nnx.MultiHeadAttention(HEADS, D, decode=False, rngs=nnx.Rngs(0))
        src.query.bias[...] = jax.random.normal(jax.random.key(7), src.query.bias.shape)
        src.value.bias[...] = jax.random.normal(jax.random.key(8), src.value.bias.shape)
        src.out.bias[...] = jax.random.normal(jax.random.key(9), src.out.bias.shape)
        return src
    src = Attention(HEADS, D, value_bias=True, rngs=nnx.Rngs(0))
    for name in ("b_q", "b_k", "b_v", "b_o"):
        getattr(src, name)[...] = jax.random.normal(jax.random.key(len(name) + ord(name[-1])), (D,))
    return src


@pytest.mark.parametrize("kind", ["flax", "attention"])
@pytest.mark.parametrize("value_bias", [False, True])
def test_converted_layer_attends_like_its_source(kind, value_bias):
    src = _layer_pair(kind)
    spec = Spectrum("sharpen", lo=-2.0)
    new, info = convert.from_attention(src, spec, rngs=nnx.Rngs(1), value_bias=value_bias, return_info=True)
    assert isinstance(new, SpectralAttention)
    x = jax.random.normal(jax.random.key(2), (3, 5, D))
    mask = nnx.make_attention_mask(jnp.ones((3, 5)), jnp.ones((3, 5)).at[:, -1].set(0))
    src(x, mask=mask, sow_weights=True)
    new(x, mask=mask, sow_weights=True)
    weights = lambda m: nnx.pop(m, nnx.Intermediate)["attention_weights"].get_value()[-1]
    np.testing.assert_allclose(weights(new), weights(src), atol=1e-6)  # Q/K and their biases copied
    lam = np.asarray(new.eigenvalues())
    a, b = spec.closed_interval()
    assert lam.min() >= a and lam.max() <= b
    w_v = src.value.kernel[...].reshape(D, D) if kind == "flax" else src.w_v[...]
    w_o = src.out.kernel[...].reshape(D, D) if kind == "flax" else src.w_o[...]
    h = np.asarray(w_v, np.float64) @ np.asarray(w_o, np.float64)
    got = np.linalg.norm(np.asarray(new.effective_h(), np.float64) - h) / np.linalg.norm(h)
    assert np.isclose(got, info["rel_error"], rtol=1e-4) and info["frac_clipped"] > 0
    # All-zero tokens: the output is the DC term b_V W_O + b_O alone, kept exactly or dropped.
    zero = jnp.zeros((1, 4, D))
    want = np.asarray(src(zero)) if value_bias else np.zeros((1, 4, D))
    np.testing.assert_allclose(new(zero), want, atol=1e-5)
    assert info["dc_norm"] > 0.1 and info["value_bias"] == ("folded into b_o" if value_bias else "dropped")


def test_converting_a_layer_inside_the_constraint_changes_nothing_thanks_to_head_assignment():
    spec = Spectrum("smooth")
    src = SpectralAttention(4, 16, spectrum=spec, rngs=nnx.Rngs(0))
    # Distinct eigenvalues (gaps of 0.06), in a random order over the heads: each eigenvector, hence
    # each head's map, is then determined by H.
    lam = np.random.default_rng(4).permutation(np.linspace(0.05, 0.95, 16))
    src.psi[...] = spectral.eigenvalues_inverse(jnp.asarray(lam, jnp.float32), spec)
    x = jax.random.normal(jax.random.key(1), (2, 6, 16))
    same, info = convert.from_attention(src, spec, rngs=nnx.Rngs(5), return_info=True)
    assert info["rel_error"] < 1e-6 and info["head_rel_error"] < 1e-5
    np.testing.assert_allclose(same(x), src(x), atol=1e-5)
    # Without the assignment H is the same but the heads get other eigenvectors: other outputs.
    other = convert.from_attention(src, spec, rngs=nnx.Rngs(5), assign=False)
    np.testing.assert_allclose(other.effective_h(), src.effective_h(), atol=1e-5)
    assert float(jnp.abs(other(x) - src(x)).max()) > 1e-2


def test_refused_sources_name_the_problem():
    with pytest.raises(ValueError, match="normalize_qk"):
        mha = nnx.MultiHeadAttention(HEADS, D, normalize_qk=True, rngs=nnx.Rngs(0))
        convert.from_attention(mha, Spectrum("sharpen"), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="square"):
        mha = nnx.MultiHeadAttention(HEADS, D, qkv_features=2 * D, rngs=nnx.Rngs(0))
        convert.from_attention(mha, Spectrum("sharpen"), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="has none"):
        convert.from_attention(Attention(HEADS, D, value_bias=False, rngs=nnx.Rngs(0)), Spectrum("sharpen"),
                               rngs=nnx.Rngs(0), value_bias=True)  # fmt: skip
    with pytest.raises(ValueError, match="square"):
        convert.nearest_spectral(np.ones((3, 4)), Spectrum("sharpen"))
    with pytest.raises(ValueError, match="basis='general' only"):
        convert.nearest_spectral(np.eye(3), Spectrum("sharpen"), refine_steps=5)
    with pytest.raises(ValueError, match="ViT, CausalLM or Transformer"):
        convert.convert_model(Attention(HEADS, D, rngs=nnx.Rngs(0)), Spectrum("sharpen"))


def _flat(model):
    return {"/".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model))}


@pytest.mark.parametrize(
    "cfg, spectrum",
    [
        (ModelConfig(depth=2, d_model=16, num_heads=4, branch_scale="featscale", vo_bias=True),
         Spectrum("sharpen", lo=-3.0)),
        (ModelConfig(depth=2, d_model=16, num_heads=2, residual="deepnorm", branch_scale="attnscale"),
         Spectrum("smooth", basis="general")),
    ],
)  # fmt: skip
def test_whole_model_conversion_keeps_every_other_parameter(cfg, spectrum):
    vit = ViT(cfg, 10, (8, 8, 1), 4, rngs=nnx.Rngs(0))
    new, info = convert.convert_model(vit, spectrum)
    assert new.transformer.config.spectrum == spectrum and not new.transformer.config.vo_bias
    before, after = _flat(vit), _flat(new)
    value_vars = {"w_v", "w_o", "b_v", "b_o"}
    kept = [k for k in before if k.split("/")[-1] not in value_vars]
    assert kept and sorted(kept) == sorted(info["copied"])
    for k in kept:
        np.testing.assert_array_equal(after[k], before[k], err_msg=k)
    assert {k.split("/")[-1] for k in after if k not in before} <= {"theta", "theta_w", "theta_s", "psi"}
    # Per layer, the converted H is the projection of the source's H, inside alpha * [lo, hi].
    alpha = cfg.alpha_beta[0]
    h_src, h_new = (np.asarray(m.transformer.effective_h(), np.float64) for m in (vit, new))
    for i, layer in enumerate(info["layers"]):
        err = np.linalg.norm(h_new[i] - h_src[i]) / np.linalg.norm(h_src[i])
        assert np.isclose(err, layer["rel_error_composed"], rtol=1e-4)
    lam = np.asarray(new.transformer.eigenvalues())
    a, b = spectrum.closed_interval(alpha)
    assert lam.min() >= a and lam.max() <= b
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 1))
    assert np.all(np.isfinite(new(x)))


def test_converting_a_spectral_model_to_its_own_constraint_keeps_its_outputs():
    spec = Spectrum("neutral", lo=-2.0, hi=2.0, init="uniform")  # distinct eigenvalues (see above)
    lm = CausalLM(ModelConfig(depth=2, d_model=16, num_heads=4, spectrum=spec), 11, 8, rngs=nnx.Rngs(3))
    same, info = convert.convert_model(lm, spec)
    assert max(layer["rel_error"] for layer in info["layers"]) < 1e-5
    ids = jax.random.randint(jax.random.key(1), (2, 8), 0, 11)
    np.testing.assert_allclose(same(ids), lm(ids), atol=1e-4)


def _tiny_bert(tmp_path):
    directory = write_tiny(tmp_path / "tiny", tiny_tensors(TINY))
    return directory, *bert.load_bert(directory)


def test_bert_conversion_composes_the_projection_and_keeps_the_rest(tmp_path):
    _, cfg, params = _tiny_bert(tmp_path)
    spec = Spectrum("sharpen", lo=-1.0)
    new, infos = convert.convert_bert(params, cfg, spec)
    for name in ("query", "key", "attn_ln", "ffn_in", "ffn_out", "ffn_ln"):
        jax.tree.map(np.testing.assert_array_equal, new["layers"][name], params["layers"][name])
    jax.tree.map(np.testing.assert_array_equal, new["embeddings"], params["embeddings"])
    w_v, w_o = bert.value_output_matrices(params)
    nv, no = bert.value_output_matrices(new)
    lay, nlay = params["layers"], new["layers"]
    for i, info in enumerate(infos):
        h = np.asarray(w_v[i] @ w_o[i], np.float64)
        h_new = np.asarray(nv[i], np.float64) @ np.asarray(no[i], np.float64)
        np.testing.assert_allclose(np.asarray(no[i]) @ np.asarray(no[i]).T, np.eye(16), atol=1e-5)  # V^T
        assert np.isclose(np.linalg.norm(h - h_new) / np.linalg.norm(h), info["rel_error"], rtol=1e-4)
        np.testing.assert_allclose(h_new, h_new.T, atol=1e-6)
        lam = np.linalg.eigvalsh(h_new)
        assert lam.min() > -1 - 1e-5 and lam.max() < 1e-5  # sharpening: inside [-1, 0)
        dc = np.asarray(lay["value"]["bias"][i] @ w_o[i] + lay["attn_out"]["bias"][i])
        np.testing.assert_allclose(nlay["attn_out"]["bias"][i], dc, atol=1e-6)  # the DC term kept
        np.testing.assert_array_equal(nlay["value"]["bias"][i], 0.0)
    # The first layer reads the same embeddings with the same Q/K: the same attention.
    ids = np.array([[1, 5, 7, 9, 2], [1, 4, 2, 0, 0]])
    mask = (ids > 0).astype(np.int32)
    out_old, out_new = (bert.bert_forward(p, cfg, ids, mask) for p in (params, new))
    np.testing.assert_allclose(out_new["attentions"][0], out_old["attentions"][0], atol=1e-6)
    assert float(jnp.abs(out_new["hidden_states"][1] - out_old["hidden_states"][1]).max()) > 1e-2


def test_command_line_writes_a_bert_directory_that_loads_back(tmp_path, capsys):
    directory, cfg, params = _tiny_bert(tmp_path)
    out = tmp_path / "out"
    assert (
        convert.main([str(directory), str(out), "--mode", "smooth", "--json", str(tmp_path / "r.json")]) == 0
    )
    _, loaded = bert.load_bert(out)
    want, infos = convert.convert_bert(params, cfg, Spectrum("smooth"))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), loaded, want)
    report = json.loads((tmp_path / "r.json").read_text())
    assert [layer["rel_error"] for layer in report["layers"]] == [i["rel_error"] for i in infos]
    assert "converted 2 layers" in capsys.readouterr().out
    assert convert.main([str(directory), str(out), "--mode", "smooth"]) == 1  # OUT not empty
    assert "not empty" in capsys.readouterr().err
    assert convert.main([str(directory), str(tmp_path / "o2"), "--mode", "sharp"]) == 2
    assert "invalid choice" in capsys.readouterr().err
    assert convert.main([str(directory), str(tmp_path / "o3"), "--mode", "smooth", "--lo", "-1"]) == 2
    assert "must be >= 0" in capsys.readouterr().err


def test_command_line_converts_a_run_directory(tmp_path):
    from jaxsmooth import data as data_lib
    from jaxsmooth import train
    from jaxsmooth.tools import cli
    from jaxsmooth.train import checkpoint, optim
    from jaxsmooth.train.state import new_state

    args = ["--config", "digits:quick,mode=none", "--config.model.depth=2", "--config.model.d_model=16",
            "--config.model.num_heads=2"]  # fmt: skip
    config, _, _ = cli.parse_train_args(args)
    mcfg = train.check_config(config)
    ds = data_lib.load(config.data.name, **config.data.kwargs.to_dict())
    model = train.build_model(mcfg, ds, config, nnx.Rngs(params=0))
    tx = optim.make_optimizer(config.opt, nnx.state(model, nnx.Param))
    state = new_state(nnx.to_pure_dict(nnx.state(model, nnx.Param)), tx, seed=config.train.seed, step=7)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.json").write_text(config.to_json_best_effort())
    ckpt = checkpoint.Checkpoints(run_dir, 1)
    ckpt.save(7, state)
    ckpt.close()
    out = tmp_path / "out"
    assert convert.main([str(run_dir), str(out), "--mode", "sharpen", "--lo", "-2"]) == 0
    loaded = train.load_run(out)
    assert loaded.step == 7 and loaded.model_config.spectrum == Spectrum("sharpen", lo=-2.0)
    want, _ = convert.convert_model(model, Spectrum("sharpen", lo=-2.0))
    got, ref = _flat(loaded.model), _flat(want)
    assert sorted(got) == sorted(ref)
    for k in got:
        np.testing.assert_allclose(got[k], ref[k], atol=1e-6, err_msg=k)
    # The checkpoint is a whole trainer state (fresh optimiser moments), so training can resume from it.
    want_params = nnx.state(want, nnx.Param)
    target = new_state(nnx.to_pure_dict(want_params), optim.make_optimizer(config.opt, want_params), seed=0)
    full = checkpoint.Checkpoints(out, 1).restore_latest(target)
    assert full is not None and full[0] == 7 and int(full[1]["bad_step"]) == -1
