"""Audit a trained transformer for oversmoothing: spectra of W_V W_O, the regime the eigen-theory predicts,
and the smoothing measured on real inputs (PAPER.md sections 1 and 3).

    jaxsmooth audit PATH [--text T ...] [--data NAME] [--num-inputs N] [--json OUT] [--plots DIR]

PATH is one of
  - a jaxsmooth run directory (config.json + checkpoints/, as written by `jaxsmooth train`), its
    checkpoints/ directory, or one step checkpoints/<step> (default: the newest step);
  - a Hugging Face BERT-family directory (config.json, model.safetensors, tokenizer.json);
  - the literal ``minilm``: the installed all-MiniLM-L6-v2 package (`jaxsmooth.bert.MINILM_INSTALL`).

What is measured, per layer l = 1..L (tokens are rows; the x @ W convention, so H_l = W_V W_O):
  - eigenvalues of H_l: the dominant one (largest modulus; of a complex-conjugate pair the one with
    imag >= 0), min / max real part, the fraction with negative real part;
  - the same for diag(gamma) H_l, the preceding LayerNorm gain folded in (the branch reads LN(x), whose
    gain multiplies channels, PAPER.md section 1). Which LN precedes the attention branch: pre-LN
    jaxsmooth models: the block's ln1; post-LN / DeepNorm jaxsmooth models: the previous block's ln2
    (none for layer 1: gain 1); BERT (post-LN): the previous layer's output LN, the embedding LN for
    layer 1 (`jaxsmooth.bert.ln_gains`). Sign counts of that gain are reported too;
  - the regime `theory.predict(A_l, H_l / alpha)` gives, where A_l is the measured attention averaged
    over the inputs and the heads (alpha: DeepNorm's skip scale, 1 otherwise; LN(alpha x + f(x)) =
    LN(x + f(x) / alpha)); also with diag(gamma) H_l;
  - per head h (k = D / heads channels): the map H_lh = W_V[:, h] W_O[h, :] has rank <= k; its nonzero
    eigenvalues are those of the k x k matrix M_lh = W_O[h, :] W_V[:, h], and they are what is reported.
    The per-head regime is `theory.predict(A_lh, M_lh / alpha)`: the head alone maps X -> X + A_lh X H_lh,
    and its value coordinates Z = X W_V[:, h] then follow Z -> Z + A_lh Z M_lh exactly, while the other
    D - k directions are left unchanged (mu = 1). So ``mu_max`` < 1 means the head shrinks its own
    subspace relative to the untouched directions;
  - measured smoothing on the inputs: `metrics.layer_stats` of the residual stream at the embedding output
    and after every layer (mean pairwise token cosine, HFC/LFC, ...), averaged over inputs.

The prediction is a guide, not a theorem, for real models: the theory is about X + A X H with A fixed,
while a trained block also has LayerNorm (which rescales every token), value/output biases (a DC term),
an MLP, input-dependent attention and a finite depth. See docs/audit_minilm.md for how it fares on BERT.

Inputs and the attention average (our choice). The theory needs one n x n attention matrix per layer, so
attention is averaged over inputs of one common length. Images (ViT) and corpus windows (CausalLM) all
have the same length. Text for BERT usually does not: the smoothing metrics are measured on the full
inputs (padded to the longest with the attention mask; padding is excluded from every statistic), and
the attention for the prediction comes from a second forward pass on the same inputs truncated to the
shortest one's token count ([CLS] ... [SEP] kept), so every averaged row is a real softmax row over real
tokens. The JSON records that length ("prediction_inputs") and the token cosine of that pass. Text for a
CausalLM (it has no padding mask) is truncated to the shortest text. A_l is renormalised to exact row sums
of 1 in float64 before the eigen-analysis.

JSON layout (``SCHEMA_VERSION``; scripts read it, so keys are only ever added):
  "token_cosine"   [L+1] mean pairwise cosine over all non-padding tokens of each input (special tokens
                   included), averaged over inputs; index 0 = embedding output, index l = after layer l.
  "hfc_lfc", "res_norm", "dirichlet" (+ "sv_ratio", "effective_rank" for BERT)   [L+1], same indexing.
  "layers"         L objects; "layer" = l is 1-based, so result["token_cosine"][l] ==
                   layers[l-1]["token_cosine"]. Keys:
      layer, dominant_eigenvalue [re, im] (of W_V W_O), predicted_regime (theory.REGIMES), token_cosine;
      eig_abs_max, eig_real_min, eig_real_max, frac_negative_real, eigenvalues [[re, im], ...] (all D,
          by modulus); predicted_effect ("smooth": DC mode dominant, else "sharpen");
      prediction {regime, rate, hc_dc_rate, mu_max, rank_a, rank_h, dc_dominant, second_abs_lambda_a,
          dominant_mu / _lambda_a / _lambda_h (<= 8 pairs, [re, im] each), runner_up, ...};
      ln_folded {the eigenvalue keys, predicted_regime, predicted_effect, prediction} for diag(gamma) H;
      ln_gain {source, negative, zero, positive, min, max} of that gamma; ln_gains_other {name: same};
      heads [{head, the eigenvalue keys without "eigenvalues", predicted_regime, predicted_effect,
          prediction, ln_folded}] (unless heads=False);
      the per-layer metrics (hfc_lfc, ...), delta_token_cosine, measured_effect (sign of the cosine
          change), measured_effect_hfc, hfc_lfc_factor (after / before), agrees (predicted_effect ==
          measured_effect); constrained_eigenvalue_range [min, max] for spectral jaxsmooth models.
  "model"          kind ("bert" | "vit" | "causal_lm"), name, path, residual, num_layers, d_model,
                   num_heads, alpha, and for runs step, dataset, spectrum, constraint_interval, ...
  "inputs", "prediction_inputs" (the length A was averaged at; "truncated"), "notes", "schema_version".
Non-finite numbers are written as null.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import math
import pathlib
import sys
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxsmooth import theory

SCHEMA_VERSION = 1
REGIMES = theory.REGIMES
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


# =========================================================================================== spectra


def _c(z: complex) -> list[float]:
    return [float(np.real(z)), float(np.imag(z))]


def sort_by_modulus(ev: np.ndarray) -> np.ndarray:
    """Eigenvalues sorted by modulus, then real part, then imaginary part (all descending), so the first
    one is the dominant eigenvalue and, of a conjugate pair, the one with imag >= 0 comes first."""
    ev = np.asarray(ev, np.complex128)
    return ev[np.lexsort((-ev.imag, -ev.real, -np.abs(ev)))]


def eig_summary(ev: np.ndarray, with_values: bool = True) -> dict:
    """Dominant eigenvalue [re, im], modulus, real-part range and fraction with negative real part."""
    ev = sort_by_modulus(ev)
    out = {
        "dominant_eigenvalue": _c(ev[0]),
        "eig_abs_max": float(np.abs(ev[0])),
        "eig_real_min": float(ev.real.min()),
        "eig_real_max": float(ev.real.max()),
        "frac_negative_real": float(np.mean(ev.real < 0)),
    }
    if with_values:
        out["eigenvalues"] = [_c(z) for z in ev]
    return out


def gain_counts(gain_D: np.ndarray, source: str) -> dict:
    """Sign counts and range of one LayerNorm gain vector (its sign flips the folded eigenvalues)."""
    g = np.asarray(gain_D, np.float64)
    return {
        "source": source,
        "negative": int(np.sum(g < 0)),
        "zero": int(np.sum(g == 0)),
        "positive": int(np.sum(g > 0)),
        "min": float(g.min()),
        "max": float(g.max()),
    }


def dc_modes(spec: theory.UpdateSpectrum, tol: float = 1e-6) -> np.ndarray:
    """Boolean [n*d]: which pairs of ``spec`` are DC modes, i.e. their A-eigenvector is parallel to 1.

    Same test as `theory.predict` (relative residual from the mean <= sqrt(tol)). For a row-stochastic A
    these are the pairs with lambda_A = 1: mu = 1 + lambda_H, every token moved by the same vector.
    """
    v_NxN = spec.eigvecs_a
    resid_N = np.linalg.norm(v_NxN - v_NxN.mean(axis=0, keepdims=True), axis=0)
    is_dc_N = resid_N <= math.sqrt(tol) * np.linalg.norm(v_NxN, axis=0)
    return is_dc_N[spec.idx_a]


def _prediction(pred: theory.Prediction, tol: float = 1e-6) -> dict:
    """JSON-able summary of a theory.Prediction: regime, the dominant modes, the runner-up, and

    hc_dc_rate = max |mu| over the non-DC pairs / max |mu| over the DC pairs: per application of the
    linear layer X + A X H, the high-frequency part (all non-DC token modes) shrinks (< 1) or grows (> 1)
    relative to the DC part by about this factor, once the leading modes of each part dominate. It is
    < 1 exactly when the DC mode dominates (up to ties), so it measures how strongly the layer smooths,
    whereas ``rate`` (= |mu_2| / |mu_1| over all pairs) can be near 1 because the runner-up is another
    DC mode (a competition over which vector all tokens converge to, not over whether they do).
    """
    spec = pred.spectrum
    mod = np.abs(spec.mu)
    is_dc = dc_modes(spec, tol)
    if is_dc.any() and (~is_dc).any():
        hc_dc_rate = float(mod[~is_dc].max() / max(float(mod[is_dc].max()), np.finfo(np.float64).tiny))
    else:  # no DC mode (A not row-stochastic) or a single token: nothing to compare
        hc_dc_rate = float("nan")
    nxt = int(pred.dominant.size)  # pairs are sorted by |mu|: the first one outside the dominant set
    out = {
        "regime": pred.regime,
        "effect": "smooth" if pred.dc_dominant else "sharpen",
        "rate": float(pred.rate),
        "hc_dc_rate": hc_dc_rate,
        "mu_max": float(pred.mu_max),
        "rank_a": int(pred.rank_a),
        "rank_h": int(pred.rank_h),
        "dc_dominant": bool(pred.dc_dominant),
        # |lambda_A| of the strongest non-DC attention mode (0 for a single token): the weaker it is, the
        # less any lambda_H can lift a non-DC mode above the DC one.
        "second_abs_lambda_a": float(np.sort(np.abs(spec.eigvals_a))[-2]) if spec.eigvals_a.size > 1 else 0.0,
        "num_dominant": int(pred.dominant.size),
        # At most 8 listed: a degenerate spectrum (e.g. many zero eigenvalues of H) ties many pairs.
        "dominant_mu": [_c(z) for z in pred.dominant_mu[:8]],
        "dominant_lambda_a": [_c(z) for z in pred.dominant_lambda_a[:8]],
        "dominant_lambda_h": [_c(z) for z in pred.dominant_lambda_h[:8]],
    }
    if nxt < spec.mu.size:
        out["runner_up"] = {
            "mu": _c(spec.mu[nxt]),
            "lambda_a": _c(spec.lam_a[nxt]),
            "lambda_h": _c(spec.lam_h[nxt]),
            "is_dc": bool(is_dc[nxt]),
        }
    return out


def row_stochastic(a_NxN: np.ndarray) -> np.ndarray:
    """float64 copy with every row divided by its sum (float32 softmax rows sum to 1 only to ~1e-7)."""
    a = np.asarray(a_NxN, np.float64)
    s_N = a.sum(axis=-1, keepdims=True)
    return a / np.where(np.abs(s_N) > 0, s_N, 1.0)


def spectral_audit(
    w_v_LxDxD: np.ndarray,
    w_o_LxDxD: np.ndarray,
    gain_LxD: np.ndarray,
    att_LxHxTxT: np.ndarray,
    *,
    alpha: float = 1.0,
    heads: bool = True,
    tol: float = 1e-6,
) -> list[dict]:
    """Per-layer (and per-head) spectra and predictions; one dict per layer, "layer" 1-based.

    w_v, w_o: x @ W convention (H = W_V W_O); gain: the LN gain preceding each attention branch (ones if
    none); att: the batch-averaged attention of each layer and head; alpha: the skip scale (DeepNorm).
    """
    w_v = np.asarray(w_v_LxDxD, np.float64)
    w_o = np.asarray(w_o_LxDxD, np.float64)
    gain = np.asarray(gain_LxD, np.float64)
    att = np.asarray(att_LxHxTxT, np.float64)
    n_layers, d, _ = w_v.shape
    n_heads = att.shape[1]
    k = d // n_heads
    with _one_blas_thread():
        return [_layer_audit(l, w_v, w_o, gain, att, k, alpha, heads, tol) for l in range(n_layers)]


def _one_blas_thread():
    """Single-threaded BLAS/LAPACK for the eigen-analysis: the matrices are small (D <= ~1k), and threaded
    OpenBLAS on a busy machine (the JAX runtime, parallel tests) ran np.linalg.eig ~8x slower here."""
    try:
        from threadpoolctl import threadpool_limits  # ships with scikit-learn, a jaxsmooth dependency
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def _layer_audit(l, w_v, w_o, gain, att, k, alpha, heads, tol) -> dict:
    """One layer of `spectral_audit` (arrays already float64)."""
    n_heads = att.shape[1]
    h_DxD = w_v[l] @ w_o[l]
    # diag(gamma) H: LN(x) = x_hat diag(gamma), so the branch computes x_hat diag(gamma) W_V W_O.
    hg_DxD = gain[l][:, None] * h_DxD
    a_TxT = row_stochastic(att[l].mean(axis=0))  # average over heads (inputs already averaged)
    pred = theory.predict(a_TxT, h_DxD / alpha, tol)
    pred_g = theory.predict(a_TxT, hg_DxD / alpha, tol)
    # Reuse the eigen-decompositions predict made (eigenvalues of H / alpha, scaled back).
    entry = {"layer": l + 1, **eig_summary(pred.spectrum.eigvals_h * alpha)}
    entry["predicted_regime"] = pred.regime
    entry["predicted_effect"] = "smooth" if pred.dc_dominant else "sharpen"
    entry["prediction"] = _prediction(pred, tol)
    entry["ln_folded"] = {
        **eig_summary(pred_g.spectrum.eigvals_h * alpha),
        "predicted_regime": pred_g.regime,
        "predicted_effect": "smooth" if pred_g.dc_dominant else "sharpen",
        "prediction": _prediction(pred_g, tol),
    }
    if heads:
        entry["heads"] = []
        for h in range(n_heads):
            cols = slice(h * k, (h + 1) * k)
            # Nonzero eigenvalues of W_V[:, h] W_O[h, :] (D x D, rank <= k) = eig(W_O[h, :] W_V[:, h]).
            m_KxK = w_o[l][cols, :] @ w_v[l][:, cols]
            mg_KxK = w_o[l][cols, :] @ (gain[l][:, None] * w_v[l][:, cols])
            a_h = row_stochastic(att[l, h])
            p_h = theory.predict(a_h, m_KxK / alpha, tol)
            head = {"head": h, **eig_summary(p_h.spectrum.eigvals_h * alpha, with_values=False)}
            head["predicted_regime"] = p_h.regime
            head["predicted_effect"] = "smooth" if p_h.dc_dominant else "sharpen"
            head["prediction"] = _prediction(p_h, tol)
            head["ln_folded"] = eig_summary(np.linalg.eigvals(mg_KxK), with_values=False)
            entry["heads"].append(head)
    return entry


# =========================================================================================== models


@dataclasses.dataclass
class LoadedModel:
    """What the audit needs from any model, whatever its origin.

    ``measure(inputs) -> (stats {name: [L+1]}, att [L, H, T, T] batch-averaged, info dict)``. The loaders
    build ``inputs`` before reading any weights, so bad inputs fail fast.
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
        from jaxsmooth import bert

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
    from jaxsmooth import bert, metrics

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
    try:
        cfg, params = bert.load_bert(directory)
    except (ValueError, FileNotFoundError) as e:  # BertCheckpointError, bad config
        raise AuditError(f"cannot load the BERT model in {directory}: {e}") from e
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error type on a damaged file
        raise AuditError(f"cannot read {weights} (damaged or not a safetensors file?): {e}") from e
    try:
        tokenizer = bert.load_tokenizer(directory)
    except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception on a bad file
        raise AuditError(f"cannot read {directory / bert.TOKENIZER_FILE}: {e}") from e

    w_v, w_o = bert.value_output_matrices(params, cfg)
    gains = {k: np.asarray(v, np.float64) for k, v in bert.ln_gains(params).items()}
    n_layers = cfg.num_hidden_layers
    sources = ["embeddings.LayerNorm"] + [f"layer {l} output.LayerNorm" for l in range(1, n_layers)]
    other = [
        {"attention.output.LayerNorm": gains["attn"][l], "output.LayerNorm": gains["ffn"][l]}
        for l in range(n_layers)
    ]

    stats_fn = jax.jit(jax.vmap(lambda h, m: metrics.layer_stats(h, m, full=True), in_axes=(0, None)))

    max_len = min(max_len, cfg.max_position_embeddings)

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
        inputs=inputs,
        measure=measure,
    )


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
    """(step, params) of a run, read-only (`jaxsmooth.checkpoint.restore_params`); errors as AuditError."""
    from jaxsmooth import checkpoint

    try:
        return checkpoint.restore_params(run_dir, abstract_params, step)
    except checkpoint.CheckpointError as e:
        raise AuditError(f"{e} (pass --step to audit another step)") from e


def _load_run(run_dir: pathlib.Path, step: int | None, want: tuple) -> LoadedModel:
    import ml_collections

    from jaxsmooth import data as data_lib
    from jaxsmooth import train
    from jaxsmooth.config import ModelConfig

    cfg_path = run_dir / "config.json"
    if not cfg_path.is_file():
        raise AuditError(f"{run_dir} has no config.json, so the model cannot be rebuilt")
    raw = _read_json(cfg_path)
    if not _is_run_config(raw):
        raise AuditError(f"{cfg_path} is not a jaxsmooth run config (no 'model' and 'data' sections)")
    config = ml_collections.ConfigDict(raw)
    try:
        mcfg = ModelConfig.from_dict(config.model.to_dict())
    except (ValueError, TypeError) as e:
        raise AuditError(f"{cfg_path}: bad model config: {e}") from e
    d = config.data
    try:
        ds = data_lib.load(d.name, **d.kwargs.to_dict())
    except data_lib.DataNotFoundError as e:
        raise AuditError(f"the run's dataset {d.name!r} is needed to rebuild the model: {e}") from e

    make = lambda: train.build_model(mcfg, ds, config, nnx.Rngs(params=0))
    graphdef, params, rest = nnx.split(nnx.eval_shape(make), nnx.Param, ...)
    model = nnx.merge(graphdef, params, rest)  # abstract: shapes only, until the restore below
    kind = "causal_lm" if ds.kind == "text" else "vit"
    n_layers, width = mcfg.depth, mcfg.d_model
    spectral = mcfg.spectrum is not None

    def make_inputs(texts, data, num_inputs):
        n = num_inputs or DEFAULT_NUM_INPUTS[kind]
        if kind == "vit":
            if texts:
                raise AuditError("this run is a ViT: it audits images (--data NAME), not --text")
            src = ds if data is None else _dataset(data, d, "image")
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
                src = _dataset(data, d, "text")
                if src.vocab != ds.vocab:
                    raise AuditError(f"--data {data}: its vocabulary differs from the run's {ds.name!r}")
                return _windows(src, n, model.max_len)
        if not texts:
            return _windows(ds, n, model.max_len)
        texts = texts[:n]
        try:
            ids = [ds.encode(t)[: model.max_len] for t in texts]
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

    inputs = make_inputs(*want)
    step, pure = restore_params(run_dir, nnx.to_pure_dict(params), step)
    nnx.replace_by_pure_dict(params, pure)

    # One compiled program instead of many eager ops (eager QR under vmap alone took seconds).
    wts = jax.tree.map(lambda a: np.asarray(a, np.float64), _run_weights(graphdef, spectral, params, rest))
    gains_Lx2xD = wts["gains"]  # (ln1, ln2) effective gains per block
    alpha = float(mcfg.alpha_beta[0])
    if mcfg.residual == "pre_ln":
        gain_LxD = gains_Lx2xD[:, 0]  # x + Attn(LN1(x))
        sources = [f"layer {l + 1} ln1" for l in range(n_layers)]
    else:  # post_ln / deepnorm: the branch reads the previous block's LN2 output (the raw embedding first)
        gain_LxD = np.concatenate([np.ones((1, width)), gains_Lx2xD[:-1, 1]], axis=0)
        sources = ["none (embedding)"] + [f"layer {l} ln2" for l in range(1, n_layers)]
    other = [{"ln1": gains_Lx2xD[l, 0], "ln2": gains_Lx2xD[l, 1]} for l in range(n_layers)]

    def measure(inputs):
        x, info = inputs
        aux = _run_forward(graphdef, params, rest, jnp.asarray(x))
        keys = [k for k in aux["input"]]
        stats = {k: np.concatenate([[float(aux["input"][k])], np.asarray(aux[k], np.float64)]) for k in keys}
        att = np.asarray(aux["attention"], np.float64)  # [L, H, T, T], batch-averaged by the model
        return (
            stats,
            att,
            {"inputs": info, "prediction_inputs": {"seq_len": int(x.shape[1]), "truncated": False}},
        )

    info = {
        "kind": kind,
        "name": config.get("name", run_dir.name),
        "path": str(run_dir),
        "step": step,
        "dataset": d.name,
        "residual": mcfg.residual,
        "num_layers": n_layers,
        "d_model": width,
        "num_heads": mcfg.num_heads,
        "mlp_dim": mcfg.mlp_dim,
        "spectrum": dataclasses.asdict(mcfg.spectrum) if spectral else None,
        "constraint_interval": list(mcfg.spectrum.closed_interval(alpha)) if spectral else None,
        "ln_gain": mcfg.ln_gain,
        "branch_scale": mcfg.branch_scale,
        "alpha": alpha,
    }
    return LoadedModel(
        kind=kind,
        info=info,
        w_v_LxDxD=wts["w_v"],
        w_o_LxDxD=wts["w_o"],
        gain_LxD=gain_LxD,
        gain_sources=sources,
        other_gains=other,
        num_heads=mcfg.num_heads,
        alpha=alpha,
        inputs=inputs,
        measure=measure,
        exact_eigs_LxD=wts.get("eigs"),
    )


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
def _run_forward(graphdef, params, rest, x) -> dict:
    """The model's per-layer stats ([L] each, "input" for the embedding) and attention [L, H, T, T]."""
    _, aux = nnx.merge(graphdef, params, rest)(x, return_stats=True, return_attention=True)
    return aux


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


# =========================================================================================== the audit


def audit(
    path: str | pathlib.Path,
    texts: Sequence[str] | None = None,
    data: str | None = None,
    num_inputs: int | None = None,
    *,
    step: int | None = None,
    max_len: int = DEFAULT_MAX_LEN,
    heads: bool = True,
) -> dict:
    """Audit the model at ``path`` (module docstring) and return the JSON-able result.

    texts: text inputs (BERT, CausalLM); data: a dataset name (jaxsmooth runs: test split of that dataset;
    default the run's own) or a UTF-8 text file, one input per line (text models); num_inputs: at most
    this many inputs; step: checkpoint step of a run (default newest); max_len: BERT tokens per input;
    heads: include per-head spectra and predictions. Raises AuditError for unusable paths and inputs.
    """
    if num_inputs is not None and num_inputs < 1:
        raise AuditError(f"num_inputs={num_inputs} must be >= 1")
    if max_len < 2:
        raise AuditError(f"max_len={max_len} must be >= 2")
    m = load_model(path, step=step, max_len=max_len, texts=texts, data=data, num_inputs=num_inputs)
    stats, att_LxHxTxT, input_info = m.measure(m.inputs)
    layers = spectral_audit(m.w_v_LxDxD, m.w_o_LxDxD, m.gain_LxD, att_LxHxTxT, alpha=m.alpha, heads=heads)
    cos, hfc = stats["token_cosine"], stats["hfc_lfc"]
    for l, entry in enumerate(layers):
        entry["ln_gain"] = gain_counts(m.gain_LxD[l], m.gain_sources[l])
        entry["ln_gains_other"] = {k: gain_counts(g, k) for k, g in m.other_gains[l].items()}
        if m.exact_eigs_LxD is not None:
            entry["constrained_eigenvalue_range"] = [
                float(m.exact_eigs_LxD[l].min()),
                float(m.exact_eigs_LxD[l].max()),
            ]
        for key, prof in stats.items():
            entry[key] = float(prof[l + 1])
        entry["delta_token_cosine"] = float(cos[l + 1] - cos[l])
        entry["measured_effect"] = "smooth" if cos[l + 1] > cos[l] else "sharpen"
        # The same judged by HFC/LFC (falls when the DC component grows relative to the rest).
        entry["measured_effect_hfc"] = "smooth" if hfc[l + 1] < hfc[l] else "sharpen"
        # Measured counterpart of prediction["hc_dc_rate"]: the change of HFC/LFC across the layer.
        entry["hfc_lfc_factor"] = float(hfc[l + 1] / hfc[l]) if hfc[l] > 0 else float("nan")
        entry["agrees"] = entry["measured_effect"] == entry["predicted_effect"]
        # Put the required keys first for readers of the raw JSON.
        layers[l] = {
            k: entry[k] for k in ("layer", "dominant_eigenvalue", "predicted_regime", "token_cosine")
        } | entry
    result = {
        "schema_version": SCHEMA_VERSION,
        "model": m.info,
        **input_info,
        **{key: [float(v) for v in prof] for key, prof in stats.items()},
        "layers": layers,
        "notes": [
            "layer l is 1-based; profile index 0 is the embedding output, index l the output of layer l",
            "dominant_eigenvalue: largest-modulus eigenvalue of W_V W_O (x @ W), imag >= 0 of a pair",
            "predicted_regime: theory.predict(A, W_V W_O / alpha), A averaged over inputs and heads",
            "predicted_effect: smooth if the DC mode (lambda_A = 1) dominates, else sharpen",
            "measured_effect: sign of the change of the mean pairwise token cosine across the layer",
            "heads: the k nonzero eigenvalues of W_V[:, h] W_O[h, :]; regime of Z = X W_V[:, h] under "
            "Z + A_h Z W_O[h, :] W_V[:, h]",
            "the theory models X + A X H; real blocks add LayerNorm, biases, an MLP and input-dependent "
            "attention, so the prediction is a guide",
        ],
    }
    return _finite(result)


def _finite(x: Any) -> Any:
    """Replace NaN / inf by None so the JSON is strict (json.dumps would write NaN)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_finite(v) for v in x]
    return x


# =========================================================================================== output


def _fmt_c(z: Sequence[float] | None) -> str:
    if z is None:
        return "n/a"
    return f"{z[0]:+.3f}{z[1]:+.3f}j"


def _fmt_f(x: float | None) -> str:
    return f"{'n/a':>6}" if x is None else f"{x:6.3f}"


def format_table(result: dict) -> str:
    """The per-layer table printed by `jaxsmooth audit`."""
    m, inp, pin = result["model"], result["inputs"], result["prediction_inputs"]
    head = (
        f"jaxsmooth audit: {m['name']} ({m['kind']}, {m['residual']}, {m['num_layers']} layers, "
        f"D={m['d_model']}, {m['num_heads']} heads"
        + (f", step {m['step']}" if m.get("step") is not None else "")
        + f") on {inp['num_inputs']} inputs ({inp['kind']})"
    )
    if pin.get("truncated"):
        head += f"; attention for the prediction: inputs truncated to {pin['seq_len']} tokens"
    cols = (
        f"{'layer':>5}  {'dom eig W_V W_O':>16}  {'dom eig diag(g)H':>16}  {'neg H':>5}  {'neg gH':>6}  "
        f"{'LN g<0':>6}  {'predicted (H)':>17}  {'pred':>7}  {'HC/DC':>6}  {'cos':>6}  {'dcos':>7}  "
        f"{'meas':>7}  {'HFC/LFC':>8}  {'factor':>6}"
    )
    lines = [head, cols, "-" * len(cols)]
    cos, hfc = result["token_cosine"], result["hfc_lfc"]
    lines.append(
        f"{'emb':>5}  {'':>16}  {'':>16}  {'':>5}  {'':>6}  {'':>6}  {'':>17}  {'':>7}  {'':>6}  "
        f"{cos[0]:6.3f}  {'':>7}  {'':>7}  {hfc[0]:8.3f}"
    )
    for e in result["layers"]:
        f = e["ln_folded"]
        lines.append(
            f"{e['layer']:>5}  {_fmt_c(e['dominant_eigenvalue']):>16}  "
            f"{_fmt_c(f['dominant_eigenvalue']):>16}  "
            f"{e['frac_negative_real']:5.2f}  {f['frac_negative_real']:6.2f}  {e['ln_gain']['negative']:>6}  "
            f"{e['predicted_regime']:>17}  {e['predicted_effect']:>7}  "
            f"{_fmt_f(e['prediction']['hc_dc_rate'])}  "
            f"{e['token_cosine']:6.3f}  {e['delta_token_cosine']:+7.3f}  {e['measured_effect']:>7}  "
            f"{e['hfc_lfc']:8.3f}  {_fmt_f(e['hfc_lfc_factor'])}"
        )
    n_agree = sum(e["agrees"] for e in result["layers"])
    lines.append(
        f"predicted effect (DC mode dominant -> smooth) matches the sign of the measured cosine change in "
        f"{n_agree}/{len(result['layers'])} layers.\nneg = fraction of eigenvalues with negative real part; "
        "HC/DC = max |mu| of non-DC over DC modes of X + A X H (< 1: smooths); factor = measured HFC/LFC "
        "after / before the layer."
    )
    return "\n".join(lines)


def save_json(result: dict, path: str | pathlib.Path) -> pathlib.Path:
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1, allow_nan=False) + "\n")
    return path


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="jaxsmooth audit",
        description="Spectra of W_V W_O, predicted regime and measured smoothing of a trained model.",
    )
    p.add_argument("path", help=f"run directory, checkpoint, Hugging Face BERT directory, or '{MINILM}'")
    p.add_argument(
        "--text",
        action="append",
        default=None,
        metavar="T",
        help="a text input (repeatable); BERT default: a built-in list of sentences",
    )
    p.add_argument(
        "--data",
        default=None,
        metavar="NAME",
        help="dataset name (jaxsmooth runs; default the run's) or a text file, one input per line",
    )
    p.add_argument("--num-inputs", type=int, default=None, metavar="N", help="at most N inputs")
    p.add_argument("--step", type=int, default=None, help="checkpoint step of a run (default: newest)")
    p.add_argument("--max-len", type=int, default=DEFAULT_MAX_LEN, help="BERT: tokens per input")
    p.add_argument("--no-heads", action="store_true", help="skip per-head spectra and predictions")
    p.add_argument("--json", default=None, metavar="OUT", help="write the result as JSON to OUT")
    p.add_argument("--plots", default=None, metavar="DIR", help="write PNG plots into DIR")
    return p


def main(argv: list[str]) -> int:
    """`jaxsmooth audit ...`; returns the exit status (0 ok, 2 bad arguments or unusable input)."""
    parser = _parser()
    try:
        args = parser.parse_args(list(argv))
    except SystemExit as e:  # argparse exits on --help (0) and on bad arguments (2)
        return int(e.code or 0)
    try:
        result = audit(
            args.path,
            texts=args.text,
            data=args.data,
            num_inputs=args.num_inputs,
            step=args.step,
            max_len=args.max_len,
            heads=not args.no_heads,
        )
    except AuditError as e:
        print(f"jaxsmooth audit: error: {e}", file=sys.stderr)
        return 2
    print(format_table(result), flush=True)
    if args.json:
        print(f"wrote {save_json(result, args.json)}")
    if args.plots:
        from jaxsmooth import audit_plots

        for p in audit_plots.plot_audit(result, args.plots):
            print(f"wrote {p}")
    return 0
