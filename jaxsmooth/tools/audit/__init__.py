"""Audit a trained transformer for oversmoothing: spectra of W_V W_O, the regime the eigen-theory predicts,
and the smoothing measured on real inputs (the theory: `jaxsmooth.theory`).

    jaxsmooth audit PATH [--text T ...] [--data NAME] [--num-inputs N] [--json OUT] [--plots DIR]

PATH is one of
  - a jaxsmooth run directory (config.json + checkpoints/, as written by `jaxsmooth train`), its
    checkpoints/ directory, or one step checkpoints/<step> (default: the newest step);
  - a Hugging Face BERT-family directory (config.json, model.safetensors, tokenizer.json);
  - the literal ``minilm``: the installed all-MiniLM-L6-v2 package (`jaxsmooth.tools.bert.MINILM_INSTALL`).

What is measured, per layer l = 1..L (tokens are rows; the x @ W convention, so H_l = W_V W_O):
  - eigenvalues of H_l: the dominant one (largest modulus; of a complex-conjugate pair the one with
    imag >= 0), min / max real part, the fraction with negative real part;
  - the effective map M_l = `theory.effective_update(H_l, g_l, residual, alpha, value_norm=...)`, the
    matrix whose spectrum decides what the block's attention update X + A X M does, per residual type:
      pre-LN, value_norm "ln" (V reads LN1(x)):   M = C diag(g) H, g = the block's LN1 gain, C = I -
          1 1^T / D the LayerNorm centring (negative gains flip eigenvalue signs);
      pre-LN, value_norm "rms" (V reads x/rms(x), the jaxsmooth default):   M = H, gains irrelevant;
      post-LN (x <- LN(x + A x H); BERT / MiniLM) and DeepNorm (x <- LN(alpha x + A x H)):   M = H /
          alpha, the gain multiplies skip and branch alike and is not folded in (exact for a uniform
          gain; an approximation for unequal gains, see `theory.effective_update`).
    Reported: the same eigenvalue summary for M, computed with `theory.effective_eigenvalues` (the
    centring's structural zero left out), and which fold was applied ("fold", in words). The LN gain
    read by the attention (pre-LN: the block's LN1; post-LN / DeepNorm jaxsmooth models: the previous
    block's LN2, none for layer 1; BERT: the previous layer's output LN, the embedding LN for layer 1,
    `jaxsmooth.tools.bert.ln_gains`) is summarised by sign counts either way, with "folded" saying whether it
    enters M;
  - the regime `theory.predict(A_l, M_l)` gives, A_l the measured attention averaged over the inputs
    and the heads; and what H_l / alpha alone would predict ("h_alone": differs only where a gain is
    folded in);
  - per head h (k = D / heads channels): the map H_lh = W_V[:, h] W_O[h, :] has rank <= k; its nonzero
    eigenvalues are those of the k x k matrix W_O[h, :] W_V[:, h], and they are what is reported. The
    head's effective map is folded like the layer's (pre-LN "ln": C diag(g) W_V[:, h] W_O[h, :]; post-LN /
    DeepNorm: H_lh / alpha; the gain is again a similarity there), and its nonzero eigenvalues are those of
    the k x k matrix Q_lh = W_O[h, :] P_lh with P_lh the folded W_V[:, h]. The per-head regime is
    `theory.predict(A_lh, Q_lh)`: the head alone maps X -> X + A_lh X P_lh W_O[h, :], its value
    coordinates Z = X P_lh follow Z -> Z + A_lh Z Q_lh exactly, and the other D - k directions are left
    unchanged (mu = 1). So ``mu_max`` < 1 means the head shrinks its own subspace relative to the
    untouched directions;
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

JSON layout (``SCHEMA_VERSION`` = 2; scripts read it). Changed in 2: "predicted_regime",
"predicted_effect", "prediction" and "agrees" of layers and heads now come from the effective map M
instead of H / alpha; the key "ln_folded" (diag(gamma) H, folded the pre-LN way into every model,
post-LN included) is gone, replaced by "effective"; added "h_alone", ln_gain["folded"], model["fold"]
and model["value_norm"] (model["value_norm_note"] for runs whose config.json predates value_norm).
  "token_cosine"   [L+1] mean pairwise cosine over all non-padding tokens of each input (special tokens
                   included), averaged over inputs; index 0 = embedding output, index l = after layer l.
  "hfc_lfc", "res_norm", "dirichlet" (+ "sv_ratio", "effective_rank" for BERT)   [L+1], same indexing.
  "layers"         L objects; "layer" = l is 1-based, so result["token_cosine"][l] ==
                   layers[l-1]["token_cosine"]. Keys:
      layer, dominant_eigenvalue [re, im] (of W_V W_O), predicted_regime (theory.REGIMES, from M),
          token_cosine;
      eig_abs_max, eig_real_min, eig_real_max, frac_negative_real, eigenvalues [[re, im], ...] (all D of
          H, by modulus); predicted_effect ("smooth": DC mode of X + A X M dominant, else "sharpen");
      prediction {regime, rate, hc_dc_rate, mu_max, rank_a, rank_h, dc_dominant, second_abs_lambda_a,
          dominant_mu / _lambda_a / _lambda_h (<= 8 pairs, [re, im] each; lambda_h: eigenvalues of M),
          runner_up, ...} of theory.predict(A, M);
      effective {fold, the eigenvalue keys of M, predicted_regime, predicted_effect};
      h_alone {predicted_regime, predicted_effect, hc_dc_rate} of theory.predict(A, H / alpha);
      ln_gain {source, negative, zero, positive, min, max, folded} of the LN gain the attention reads;
          ln_gains_other {name: the same without "folded"};
      heads [{head, the eigenvalue keys of H_lh without "eigenvalues", predicted_regime,
          predicted_effect, prediction, effective {the eigenvalue keys of the head's folded map}}]
          (unless heads=False);
      the per-layer metrics (hfc_lfc, ...), delta_token_cosine, measured_effect (sign of the cosine
          change), measured_effect_hfc, hfc_lfc_factor (after / before), agrees (predicted_effect ==
          measured_effect); constrained_eigenvalue_range [min, max] for spectral jaxsmooth models.
  "model"          kind ("bert" | "vit" | "causal_lm"), name, path, residual, value_norm (pre-LN runs;
                   else null), fold, num_layers, d_model, num_heads, alpha, and for runs step, dataset,
                   spectrum, constraint_interval, ...
  "inputs", "prediction_inputs" (the length A was averaged at; "truncated"), "notes", "schema_version".
Non-finite numbers are written as null.

Layout: `loading` (runs, BERT directories, MiniLM, inputs), `spectra` (eigenvalue summaries, gain
counts), `prediction` (theory predictions per layer and head), `report` (the audit, table, JSON, command
line), `plots` (PNG plots). Everything public is re-exported here.
"""

from jaxsmooth.tools.audit.loading import (
    DEFAULT_MAX_LEN,
    DEFAULT_NUM_INPUTS,
    DEFAULT_SENTENCES,
    MINILM,
    AuditError,
    LoadedModel,
    load_model,
    restore_params,
)
from jaxsmooth.tools.audit.prediction import dc_modes, prediction_summary, spectral_audit
from jaxsmooth.tools.audit.report import REGIMES, SCHEMA_VERSION, audit, format_table, main, save_json
from jaxsmooth.tools.audit.spectra import eig_summary, gain_counts, row_stochastic, sort_by_modulus

__all__ = [
    "DEFAULT_MAX_LEN",
    "DEFAULT_NUM_INPUTS",
    "DEFAULT_SENTENCES",
    "MINILM",
    "REGIMES",
    "SCHEMA_VERSION",
    "AuditError",
    "LoadedModel",
    "audit",
    "dc_modes",
    "eig_summary",
    "format_table",
    "gain_counts",
    "load_model",
    "main",
    "prediction_summary",
    "restore_params",
    "row_stochastic",
    "save_json",
    "sort_by_modulus",
    "spectral_audit",
]
