"""Loading what the audit needs: jaxsmooth runs (config.json + Orbax checkpoints, through the one run loader
`jaxsmooth.train.load_run`), Hugging Face BERT directories, the installed all-MiniLM-L6-v2, and their
inputs (texts, images, character windows).

Every loader returns a `LoadedModel`; unusable paths, checkpoints and inputs raise `AuditError` with a
message naming the problem.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

MINILM = "minilm"

# Varied English sentences (questions, lists, numbers, quotes, technical and plain prose), each long
# enough that truncation to the shortest one for the attention average keeps most of every sentence.
DEFAULT_SENTENCES: tuple[str, ...] = (
    "The quick brown fox jumps over the lazy dog while the farmer watches from the porch.",
    "Transformers stack attention layers, and deep stacks may make all token representations alike.",
    "Could you tell me how to get to the railway station before the last train leaves tonight?",
    "In 1969, two astronauts walked on the Moon while a third orbited above them in the command module.",
    "She bought apples, pears, two loaves of bread and a jar of honey at the Saturday market.",
    "The committee postponed its decision because several members had not read the final report.",
    "Photosynthesis converts light energy into chemical energy stored in glucose molecules.",
    "After the storm passed, the children ran outside to splash in the puddles along the street.",
    '"I will be back in ten minutes," he said, but nobody saw him again until the next morning.',
    "The recipe calls for three eggs, a cup of flour, and a pinch of salt mixed in a large bowl.",
    "Stock markets fell sharply on Monday after the central bank raised interest rates again.",
    "My grandmother tells wonderful stories about growing up on a small island in the north.",
    "To install the package, run the setup script and then restart your terminal session.",
    "The orchestra rehearsed the symphony for weeks before its premiere in the old concert hall.",
    "Rain is expected tomorrow afternoon, so the football match may be moved to Sunday.",
    "Why do cats always seem to find the one sunny spot in the house on a cold winter day?",
)

# Default number of inputs per kind of model (--num-inputs overrides).
DEFAULT_NUM_INPUTS = {"bert": len(DEFAULT_SENTENCES), "vit": 64, "causal_lm": 16}
DEFAULT_MAX_LEN = 128  # BERT: tokens per input (longer texts are truncated)

_RUN_HINT = (
    "expected a jaxsmooth run directory (config.json + checkpoints/), its checkpoints/ or checkpoints/<step> "
    "directory, a Hugging Face BERT directory (config.json, model.safetensors, tokenizer.json), or "
    f"'{MINILM}' for the installed all-MiniLM-L6-v2"
)


class AuditError(ValueError):
    """The path, checkpoint, tokenizer or inputs cannot be audited; the message names the problem."""


# =========================================================================================== models


@dataclasses.dataclass
class LoadedModel:
    """What the audit needs from any model, whatever its origin.

    ``measure(inputs) -> (stats {name: [L+1]}, att [L, H, T, T] batch-averaged, info dict)``. The BERT
    loader builds ``inputs`` before reading any weights, so bad inputs fail fast; a run's are built from
    the model `jaxsmooth.train.load_run` restores (its weights are small).
    """

    kind: str  # "bert" | "vit" | "causal_lm"
    info: dict
    w_v_LxDxD: np.ndarray
    w_o_LxDxD: np.ndarray
    gain_LxD: np.ndarray  # the LN gain preceding each attention branch (ones where there is none)
    gain_sources: list[str]
    other_gains: list[dict]  # per layer: {name: gain_D} of the other LayerNorms of the layer
    num_heads: int
    alpha: float
    residual: str  # "pre_ln" | "post_ln" | "deepnorm": selects the effective map (theory.effective_update)
    value_norm: str  # pre-LN: what the value path reads ("ln" | "rms"); ignored otherwise
    inputs: Any
    measure: Callable[..., tuple[dict, np.ndarray, dict]]
    exact_eigs_LxD: np.ndarray | None = None  # spectral models: eigenvalues exact by construction


def _read_json(path: pathlib.Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            out = json.load(f)
    except (OSError, ValueError) as e:
        raise AuditError(f"cannot read {path}: {e}") from e
    if not isinstance(out, dict):
        raise AuditError(f"{path} is not a JSON object")
    return out


def _is_bert_config(cfg: dict) -> bool:
    return "hidden_size" in cfg and "num_hidden_layers" in cfg


def _is_run_config(cfg: dict) -> bool:
    return isinstance(cfg.get("model"), dict) and isinstance(cfg.get("data"), dict)


def load_model(
    path: str | pathlib.Path,
    step: int | None = None,
    max_len: int = DEFAULT_MAX_LEN,
    texts: Sequence[str] | None = None,
    data: str | None = None,
    num_inputs: int | None = None,
) -> LoadedModel:
    """Dispatch on what ``path`` is (module docstring) and prepare the inputs (arguments as in `audit`).

    Raises AuditError naming the problem.
    """
    want = (texts, data, num_inputs)
    if str(path) == MINILM:
        from jaxsmooth.tools import bert

        try:
            directory = bert.find_minilm()
        except FileNotFoundError as e:
            raise AuditError(str(e)) from e
        return _load_bert(directory, max_len, want, name=MINILM)
    p = pathlib.Path(path)
    if not p.exists():
        raise AuditError(f"{p}: no such file or directory; {_RUN_HINT}")
    if not p.is_dir():
        raise AuditError(f"{p} is a file, not a directory; {_RUN_HINT}")
    # checkpoints/<step> and checkpoints/ point into a run directory.
    if p.parent.name == "checkpoints" and p.name.isdigit():
        if step is not None and step != int(p.name):
            raise AuditError(f"{p} is step {p.name}, but step={step} was requested")
        return _load_run(p.parent.parent, int(p.name), want)
    if p.name == "checkpoints" and (p.parent / "config.json").is_file():
        return _load_run(p.parent, step, want)
    cfg_path = p / "config.json"
    if (p / "checkpoints").is_dir():
        if not cfg_path.is_file():
            raise AuditError(f"{p} has checkpoints/ but no config.json, so the model cannot be rebuilt")
        return _load_run(p, step, want)
    if not cfg_path.is_file():
        raise AuditError(f"{p} has no config.json; {_RUN_HINT}")
    cfg = _read_json(cfg_path)
    if _is_run_config(cfg):
        raise AuditError(f"{p} holds a jaxsmooth config.json but no checkpoints/ (the run saved nothing yet)")
    if _is_bert_config(cfg):
        return _load_bert(p, max_len, want)
    raise AuditError(f"{cfg_path} is neither a jaxsmooth run config nor a BERT config; {_RUN_HINT}")


# ------------------------------------------------------------------------------------------- BERT


def _load_bert(directory: pathlib.Path, max_len: int, want: tuple, name: str | None = None) -> LoadedModel:
    from jaxsmooth.tools import bert

    directory = pathlib.Path(directory)
    weights = directory / bert.WEIGHTS_FILE
    if not weights.is_file():
        raise AuditError(f"{directory} has a BERT config.json but no {bert.WEIGHTS_FILE}")
    # Checked before the (slow) weight loading: without the tokenizer no text can be audited.
    if not (directory / bert.TOKENIZER_FILE).is_file():
        raise AuditError(
            f"{directory} has no {bert.TOKENIZER_FILE}: the audit tokenises text with it; put the model's "
            f"{bert.TOKENIZER_FILE} next to its config.json"
        )
    inputs = _bert_inputs(*want)
    cfg, params, tokenizer = _read_bert(directory)
    w_v, w_o = bert.value_output_matrices(params, cfg)
    gains = {k: np.asarray(v, np.float64) for k, v in bert.ln_gains(params).items()}
    n_layers = cfg.num_hidden_layers
    sources = ["embeddings.LayerNorm"] + [f"layer {l} output.LayerNorm" for l in range(1, n_layers)]
    other = [
        {"attention.output.LayerNorm": gains["attn"][l], "output.LayerNorm": gains["ffn"][l]}
        for l in range(n_layers)
    ]
    max_len = min(max_len, cfg.max_position_embeddings)
    info = {
        "kind": "bert",
        "name": name or directory.name,
        "path": str(directory),
        "residual": "post_ln",
        "num_layers": n_layers,
        "d_model": cfg.hidden_size,
        "num_heads": cfg.num_attention_heads,
        "mlp_dim": cfg.intermediate_size,
        "hidden_act": cfg.hidden_act,
        "alpha": 1.0,
        "value_norm": None,
    }
    return LoadedModel(
        kind="bert",
        info=info,
        w_v_LxDxD=np.asarray(w_v, np.float64),
        w_o_LxDxD=np.asarray(w_o, np.float64),
        gain_LxD=gains["pre_attention"],
        gain_sources=sources,
        other_gains=other,
        num_heads=cfg.num_attention_heads,
        alpha=1.0,
        residual="post_ln",
        value_norm="rms",  # ignored for post-LN: the branch reads the residual stream itself
        inputs=inputs,
        measure=_bert_measure(params, cfg, tokenizer, max_len),
    )


def _read_bert(directory: pathlib.Path) -> tuple[Any, dict, Any]:
    """(BertConfig, params, tokenizer) of a BERT directory; a bad config, damaged weights or tokenizer as
    AuditError naming the file."""
    from jaxsmooth.tools import bert

    try:
        cfg, params = bert.load_bert(directory)
    except (ValueError, FileNotFoundError) as e:  # BertCheckpointError, bad config
        raise AuditError(f"cannot load the BERT model in {directory}: {e}") from e
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error type on a damaged file
        raise AuditError(
            f"cannot read {directory / bert.WEIGHTS_FILE} (damaged or not a safetensors file?): {e}"
        ) from e
    try:
        tokenizer = bert.load_tokenizer(directory)
    except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception on a bad file
        raise AuditError(f"cannot read {directory / bert.TOKENIZER_FILE}: {e}") from e
    return cfg, params, tokenizer


def _bert_measure(params: dict, cfg: Any, tokenizer: Any, max_len: int) -> Callable:
    """`LoadedModel.measure` of a BERT model: texts -> (per-layer stats, attention, info)."""
    from jaxsmooth import metrics
    from jaxsmooth.tools import bert

    stats_fn = jax.jit(jax.vmap(lambda h, m: metrics.layer_stats(h, m, full=True), in_axes=(0, None)))

    def measure(texts):
        enc = bert.encode(tokenizer, texts, max_len=max_len)
        ids, mask, types = enc["input_ids"], enc["attention_mask"], enc["token_type_ids"]
        out = bert.bert_forward_jit(params, cfg, ids, mask, types)
        stats = {
            k: np.asarray(v, np.float64) for k, v in stats_fn(out["hidden_states"], jnp.asarray(mask)).items()
        }
        lengths = mask.sum(axis=1)
        t_min = int(lengths.min())
        info = {
            "kind": "text",
            "num_inputs": len(texts),
            "texts": list(texts),
            "lengths": [int(n) for n in lengths],
            "max_len": max_len,
            "padded_to": int(ids.shape[1]),
        }
        if int(lengths.max()) == t_min:
            att = out["attentions"]
            pred_info = {"seq_len": t_min, "truncated": False}
        else:
            # Every input truncated to the shortest one's length (no padding): the attention rows are
            # real softmax rows over real tokens, so their average is a row-stochastic T x T matrix.
            enc2 = bert.encode(tokenizer, texts, max_len=t_min)
            out2 = bert.bert_forward_jit(
                params, cfg, enc2["input_ids"], enc2["attention_mask"], enc2["token_type_ids"]
            )
            att = out2["attentions"]
            ones = jnp.ones(enc2["input_ids"].shape, jnp.int32)
            cos2 = stats_fn(out2["hidden_states"], ones)["token_cosine"]
            pred_info = {"seq_len": t_min, "truncated": True, "token_cosine": np.asarray(cos2).tolist()}
        att_LxHxTxT = np.asarray(jnp.mean(att, axis=1), np.float64)
        return stats, att_LxHxTxT, {"inputs": info, "prediction_inputs": pred_info}

    return measure


def _bert_inputs(texts, data, num_inputs) -> list[str]:
    if data is not None:
        texts = list(texts or []) + _read_text_lines(data)
    texts = list(DEFAULT_SENTENCES) if not texts else list(texts)
    texts = texts[: num_inputs or len(texts)]
    if any(not t.strip() for t in texts):
        raise AuditError("empty text given; every --text needs some words")
    return texts


def _read_text_lines(data: str) -> list[str]:
    p = pathlib.Path(data)
    if not p.is_file():
        raise AuditError(f"--data {data!r}: no such text file (for text models, one input per line)")
    try:
        lines = [s.strip() for s in p.read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as e:
        raise AuditError(f"cannot read {p}: {e}") from e
    lines = [s for s in lines if s]
    if not lines:
        raise AuditError(f"{p} has no non-empty lines")
    return lines


# ------------------------------------------------------------------------------------------- runs


def restore_params(run_dir: pathlib.Path, abstract_params: Any, step: int | None = None) -> tuple[int, Any]:
    """(step, params) of a run, read-only (`jaxsmooth.train.checkpoint.restore_params`); errors as
    AuditError."""
    from jaxsmooth.train import checkpoint

    try:
        return checkpoint.restore_params(run_dir, abstract_params, step)
    except checkpoint.CheckpointError as e:
        raise AuditError(f"{e} (pass --step to audit another step)") from e


def _load_run(run_dir: pathlib.Path, step: int | None, want: tuple) -> LoadedModel:
    cfg_path = run_dir / "config.json"
    if not cfg_path.is_file():
        raise AuditError(f"{run_dir} has no config.json, so the model cannot be rebuilt")
    raw = _read_json(cfg_path)
    if not _is_run_config(raw):
        raise AuditError(f"{cfg_path} is not a jaxsmooth run config (no 'model' and 'data' sections)")
    # A pre-LN run written before ModelConfig.value_norm existed read LN1(x) in its value path: load_run
    # rebuilds it so (jaxsmooth.train.migrate) and says so in its migration notes.
    run = _restore_run(run_dir, step, raw)
    mcfg, model = run.model_config, run.model
    kind = "causal_lm" if run.dataset.kind == "text" else "vit"
    inputs = _run_inputs(*want, kind=kind, ds=run.dataset, run_data=run.config.data, model=model)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    # One compiled program instead of many eager ops (eager QR under vmap alone took seconds).
    spectral = mcfg.spectrum is not None
    wts = jax.tree.map(lambda a: np.asarray(a, np.float64), _run_weights(graphdef, spectral, params, rest))
    gain_LxD, sources, other = attention_gains(wts["gains"], mcfg.residual)

    def measure(inputs):
        x, info = inputs
        out = _run_forward(graphdef, params, rest, jnp.asarray(x))
        per_layer, first = out.stats, out.stats["input"]  # [L] each; the stack's input
        stats = {k: np.concatenate([[float(first[k])], np.asarray(per_layer[k], np.float64)]) for k in first}
        att = np.asarray(out.attention, np.float64)  # [L, H, T, T], batch-averaged by the model
        return (
            stats,
            att,
            {"inputs": info, "prediction_inputs": {"seq_len": int(x.shape[1]), "truncated": False}},
        )

    info = _run_info(run, run_dir, kind)
    notes = [n for n in run.migration_notes if "value_norm" in n]
    if notes:
        info["value_norm_note"] = "; ".join(notes)
    return LoadedModel(
        kind=kind,
        info=info,
        w_v_LxDxD=wts["w_v"],
        w_o_LxDxD=wts["w_o"],
        gain_LxD=gain_LxD,
        gain_sources=sources,
        other_gains=other,
        num_heads=mcfg.num_heads,
        alpha=info["alpha"],
        residual=mcfg.residual,
        value_norm=mcfg.value_norm,
        inputs=inputs,
        measure=measure,
        exact_eigs_LxD=wts.get("eigs"),
    )


def _restore_run(run_dir: pathlib.Path, step: int | None, raw: dict):
    """`jaxsmooth.train.load_run` (the model rebuilt from the config saved with the checkpoint, its
    parameters restored), with every failure as an AuditError naming the problem. `raw`: the run's
    config.json, checked here first so that a bad model section is named as such."""
    from jaxsmooth import data as data_lib
    from jaxsmooth.config import ModelConfig
    from jaxsmooth.train import checkpoint, load_run

    try:
        ModelConfig.from_dict(raw["model"])
    except (ValueError, TypeError) as e:
        raise AuditError(f"{run_dir / 'config.json'}: bad model config: {e}") from e
    try:
        return load_run(run_dir, step)
    except checkpoint.CheckpointError as e:
        raise AuditError(f"{e} (pass --step to audit another step)") from e
    except data_lib.DataNotFoundError as e:
        name = raw["data"].get("name")
        raise AuditError(f"the run's dataset {name!r} is needed to rebuild the model: {e}") from e
    except (ValueError, TypeError, KeyError, AttributeError, FileNotFoundError) as e:  # a damaged config
        raise AuditError(f"cannot rebuild the model of {run_dir}: {type(e).__name__}: {e}") from e


def attention_gains(gains_Lx2xD: np.ndarray, residual: str) -> tuple[np.ndarray, list[str], list[dict]]:
    """The LayerNorm gain each attention branch reads, what it comes from, and every layer's gains.

    Args:
      gains_Lx2xD: the effective (ln1, ln2) gains of every block.
      residual: "pre_ln" | "post_ln" | "deepnorm".
    Returns:
      (gain_LxD, sources, other): pre-LN, x + Attn(LN1(x)): V reads LN1(x) (value_norm "ln", gain folded)
      or x / rms(x) ("rms": only Q, K read LN1, and the gain is not folded), so LN1's gain; post-LN and
      DeepNorm: the branch reads the previous block's LN2 output (the raw embedding first, gain ones);
      other: per layer {"ln1": gain_D, "ln2": gain_D}.
    """
    n_layers, _, width = gains_Lx2xD.shape
    if residual == "pre_ln":
        gain_LxD = gains_Lx2xD[:, 0]
        sources = [f"layer {l + 1} ln1" for l in range(n_layers)]
    else:
        gain_LxD = np.concatenate([np.ones((1, width)), gains_Lx2xD[:-1, 1]], axis=0)
        sources = ["none (embedding)"] + [f"layer {l} ln2" for l in range(1, n_layers)]
    other = [{"ln1": gains_Lx2xD[l, 0], "ln2": gains_Lx2xD[l, 1]} for l in range(n_layers)]
    return gain_LxD, sources, other


def _run_info(run, run_dir: pathlib.Path, kind: str) -> dict:
    """`LoadedModel.info` of a jaxsmooth run."""
    mcfg = run.model_config
    spectral = mcfg.spectrum is not None
    alpha = float(mcfg.alpha_beta[0])
    return {
        "kind": kind,
        "name": run.config.get("name", run_dir.name),
        "path": str(run_dir),
        "step": run.step,
        "dataset": run.config.data.name,
        "residual": mcfg.residual,
        "num_layers": mcfg.depth,
        "d_model": mcfg.d_model,
        "num_heads": mcfg.num_heads,
        "mlp_dim": mcfg.mlp_dim,
        "spectrum": dataclasses.asdict(mcfg.spectrum) if spectral else None,
        "constraint_interval": list(mcfg.spectrum.closed_interval(alpha)) if spectral else None,
        "ln_gain": mcfg.ln_gain,
        "branch_scale": mcfg.branch_scale,
        "alpha": alpha,
        "value_norm": mcfg.value_norm if mcfg.residual == "pre_ln" else None,
    }


def _run_inputs(texts, data, num_inputs, *, kind: str, ds, run_data, model) -> tuple[np.ndarray, dict]:
    """(x, info) the audit feeds a run's model: test images of the run's (or --data's) dataset for a
    ViT; for a character LM --text strings, a text file's lines or windows of a text dataset."""
    n = num_inputs or DEFAULT_NUM_INPUTS[kind]
    if kind == "vit":
        if texts:
            raise AuditError("this run is a ViT: it audits images (--data NAME), not --text")
        src = ds if data is None else _dataset(data, run_data, "image")
        x = np.asarray(src.x_test[:n], np.float32)
        if x.shape[1:] != tuple(model.image_shape):
            raise AuditError(
                f"--data {data}: images of shape {x.shape[1:]}, the model takes {model.image_shape}"
            )
        return x, {
            "kind": "images",
            "source": f"{src.name} test split, first {len(x)}",
            "num_inputs": int(len(x)),
            "seq_len": int(model.num_patches + 1),
        }
    texts = list(texts or [])
    if data is not None:
        if pathlib.Path(data).is_file():
            texts += _read_text_lines(data)
        else:
            src = _dataset(data, run_data, "text")
            if src.vocab != ds.vocab:
                raise AuditError(f"--data {data}: its vocabulary differs from the run's {ds.name!r}")
            return _windows(src, n, model.max_len)
    if not texts:
        return _windows(ds, n, model.max_len)
    return _text_inputs(texts[:n], ds, model.max_len)


def _text_inputs(texts: list[str], ds, max_len: int) -> tuple[np.ndarray, dict]:
    """--text strings as character ids, each truncated to the shortest (and to max_len)."""
    try:
        ids = [ds.encode(t)[:max_len] for t in texts]
    except ValueError as e:
        raise AuditError(f"--text: {e}") from e
    t = min(len(i) for i in ids)
    if t < 2:
        raise AuditError("every --text needs at least 2 characters")
    x = np.stack([i[:t] for i in ids]).astype(np.int32)
    return x, {
        "kind": "characters",
        "source": "--text (each truncated to the shortest)",
        "texts": texts,
        "num_inputs": len(texts),
        "seq_len": t,
    }


# Module-level jits with the (hashable) GraphDef static: auditing the same kind of model again reuses the
# compiled programs.
@functools.partial(jax.jit, static_argnums=(0, 1))
def _run_weights(graphdef, spectral: bool, params, rest) -> dict:
    """W_V, W_O [L, D, D] of every layer (through each block's attention module, spectral or not), the
    effective LN gains [L, 2, D] and, for spectral attention, the exact eigenvalues [L, D]."""
    stack = nnx.merge(graphdef, params, rest).transformer
    blocks_def, blocks_state = nnx.split(stack.blocks)
    w_v, w_o = jax.vmap(lambda s: nnx.merge(blocks_def, s).attn.value_output()[:2])(blocks_state)
    out = {"w_v": w_v, "w_o": w_o, "gains": stack.ln_gains()}
    if spectral:
        out["eigs"] = stack.eigenvalues()
    return out


@functools.partial(jax.jit, static_argnums=0)
def _run_forward(graphdef, params, rest, x):
    """The model's `ModelOutput`: per-layer stats ([L] each, "input" for the embedding) and attention
    [L, N, T, T]."""
    return nnx.merge(graphdef, params, rest).forward(x, stats="logged", attention=True, deterministic=True)


def _dataset(name: str, run_data, kind: str):
    """Load data set `name` for the audit (with the run's data kwargs if it is the run's own data set),
    refusing one of the wrong kind ("image" for a ViT run, "text" for a character LM)."""
    from jaxsmooth import data as data_lib

    kwargs = run_data.kwargs.to_dict() if name == run_data.name else {}
    try:
        ds = data_lib.load(name, **kwargs)
    except (ValueError, data_lib.DataNotFoundError) as e:
        raise AuditError(f"--data {name}: {e}") from e
    if ds.kind != kind:
        what, model = ("a text", "a ViT") if kind == "image" else ("an image", "a character LM")
        raise AuditError(f"--data {name} is {what} dataset; this run is {model}")
    return ds


def _windows(ds, n: int, seq_len: int):
    """The first n consecutive seq_len-character windows of the test split."""
    n_win = min(n, len(ds.x_test) // seq_len)
    if n_win < 1:
        raise AuditError(f"the {ds.name!r} test split is shorter than one {seq_len}-character window")
    x = ds.x_test[: n_win * seq_len].reshape(n_win, seq_len).astype(np.int32)
    return x, {
        "kind": "characters",
        "source": f"{ds.name} test split, first {n_win} windows",
        "num_inputs": n_win,
        "seq_len": seq_len,
    }
