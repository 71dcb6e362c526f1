"""LN sign (the paper's v3 claim: the sign of the LayerNorm gains matters): sharpen and smooth in the
standard pre-LN block (the value path reads LN1(x), value_norm="ln") with free vs positive LN gains, and in
jaxsmooth's default block (value_norm="rms", where the gains cannot reach the value path), depth 8, three
seeds. Records carry the fraction of negative gains per layer, the effective map's eigenvalues (wrong-side
fraction) and the measured smoothing.

    jaxsmooth study run experiments/studies/ln_sign.py --jobs 2 --commit
"""

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location("_common", Path(__file__).with_name("_common.py"))
_spec.loader.exec_module(common := importlib.util.module_from_spec(_spec))

STEPS = 2000
# What the report tabulates: accuracy, the fraction of negative LN1 gains and of effective eigenvalues on
# the wrong side, and the last layer's smoothing.
REPORT_METRICS = ["test_accuracy", "val_accuracy", "ln1_neg_frac_mean", "eff_wrong_frac_mean"]
REPORT_METRICS += ["cos_final_last", "hfc_lfc_final_last"]


def get_study(quick: bool = False) -> dict:
    modes = ("sharpen",) if quick else ("sharpen", "smooth")
    variants = {}
    for mode in modes:
        lr = common.chosen_lr(mode, quick)
        for block, extra in (("ln-free", {"model.value_norm": "ln", "model.ln_gain": "free"}),
                             ("ln-positive", {"model.value_norm": "ln", "model.ln_gain": "positive"}),
                             ("rms", {"model.value_norm": "rms", "model.ln_gain": "free"})):  # fmt: skip
            variants[f"{mode}/{block}"] = {**common.VARIANTS[mode], **extra, "opt.lr": lr}
    return {
        "name": "ln_sign",
        "config": "fashion_mnist",
        "overrides": {**common.image_scale(20 if quick else STEPS, quick)},
        "variants": variants,
        "grid": [{"model.depth": 2 if quick else 8}],
        "seeds": [0] if quick else [0, 1, 2],
        # Each block compared with the same mode's gains held positive: the sign's own effect (v3).
        "baseline": {f"{m}/{b}": f"{m}/ln-positive" for m in modes for b in ("ln-free", "rms")},
        "report_metrics": REPORT_METRICS,
    }
