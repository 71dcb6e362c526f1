"""Tests of jaxsmooth.audit (and audit_plots): MiniLM through the function, tiny jaxsmooth runs through the
CLI, and clear errors for unusable paths.

Run directories are built here exactly as `jaxsmooth train` lays them out (config.json from the packaged
config, an Orbax checkpoint of the state dict {"params", ...} through jaxsmooth.checkpoint), but with
random parameters: a real training run takes ~30 s to compile on 2 CPU cores, too slow here.
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

from jaxsmooth import audit, bert, cli, theory, train
from jaxsmooth import data as data_lib
from jaxsmooth.audit import plots as audit_plots
from jaxsmooth.checkpoint import Checkpoints
from jaxsmooth.config import ModelConfig

HAVE_MINILM = importlib.util.find_spec(bert.MINILM_MODULE) is not None
needs_minilm = pytest.mark.skipif(
    not HAVE_MINILM, reason=f"all-MiniLM-L6-v2 package absent; install it with: {bert.MINILM_INSTALL}"
)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
REQUIRED_LAYER_KEYS = {"layer", "dominant_eigenvalue", "predicted_regime", "token_cosine"}


# ----------------------------------------------------------------------------------------- helpers


def packaged_config(spec: str):
    """The ConfigDict of a packaged config (`digits:quick`), loaded as `jaxsmooth train` loads it."""
    path, _, args = cli.resolve_config(spec).partition(":")
    mod_spec = importlib.util.spec_from_file_location("_audit_test_config", path)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    return module.get_config(args or None)


def make_run(workdir: pathlib.Path, config, step: int = 3, seed: int = 0) -> pathlib.Path:
    """A run directory with config.json and one checkpoint of random params."""
    mcfg = ModelConfig.from_dict(config.model.to_dict())
    ds = data_lib.load(config.data.name, **config.data.kwargs.to_dict())
    make = lambda: train.build_model(mcfg, ds, config, nnx.Rngs(params=config.train.seed))
    # Arbitrary parameter values (the spectral constraint holds for any): random normal leaves of the
    # model's abstract shapes. Initialising the real model costs 5-10 s of compilation on 2 CPU cores.
    abstract = nnx.to_pure_dict(nnx.split(nnx.eval_shape(make), nnx.Param, ...)[1])
    rng = np.random.default_rng(seed)
    params = jax.tree.map(lambda a: jnp.asarray(rng.normal(0.0, 0.3, a.shape), a.dtype), abstract)
    workdir.mkdir(parents=True)
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2) + "\n")
    state = {"params": params, "step": jnp.int32(step), "bad_step": jnp.int32(-1)}
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
def test_minilm_folded_gain_is_the_previous_output_layernorm(minilm_result):
    """diag(gamma) H with gamma of the LN feeding the branch (embedding LN for layer 1)."""
    cfg, params = bert.load_bert()
    w_v, w_o = (np.asarray(a, np.float64) for a in bert.value_output_matrices(params, cfg))
    gamma = np.asarray(bert.ln_gains(params)["pre_attention"], np.float64)
    for l in (0, cfg.num_hidden_layers - 1):
        ref = largest_modulus(gamma[l][:, None] * (w_v[l] @ w_o[l]))
        got = complex(*minilm_result["layers"][l]["ln_folded"]["dominant_eigenvalue"])
        assert abs(got - complex(ref.real, abs(ref.imag))) <= 1e-8 * abs(ref)
    assert minilm_result["layers"][0]["ln_gain"]["source"] == "embeddings.LayerNorm"


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
    (entry,) = audit.spectral_audit(w_v, w_o, np.ones((L, D)), att)
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
