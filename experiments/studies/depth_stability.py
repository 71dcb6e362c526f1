"""Depth stability: 100, 300 and 1000 layers at small width (jaxsmooth/configs/deep1000.py: width 32, 2
heads, digits
in 2x2 patches = 17 tokens, batch 32, nested remat), DeepNorm vs post-LN vs pre-LN, each unconstrained and
spectral (sharpen), three seeds, one fixed budget (STEPS optimiser steps, lr 1e-3, WARMUP warmup steps,
cosine). A run that goes non-finite is recorded as diverged (train.on_nonfinite="record"), not an error.
Records: final training loss, train / test accuracy, and the per-layer smoothing profile (token cosine,
HFC/LFC, effective rank) at init and at the end, thinned to 65 layers.

Every model uses the library's defaults for its residual type: DeepNorm's alpha / beta and its LayerNorms
at lr / (2L) (model.ln_lr="depth"); post-LN and pre-LN have no depth-dependent scaling (that is what they
are compared for).

    jaxsmooth study run experiments/studies/depth_stability.py --jobs 2 --commit
"""

STEPS = 200
WARMUP = 50
RESIDUALS = ("deepnorm", "post_ln", "pre_ln")
MODES = {"none": "none", "spectral": "sharpen"}


def get_study(quick: bool = False) -> dict:
    steps = 4 if quick else STEPS
    variants = {
        f"{res}/{name}": {"model.residual": res, "model.spectrum.mode": mode}
        for res in (RESIDUALS[:2] if quick else RESIDUALS)
        for name, mode in MODES.items()
    }
    return {
        "name": "depth_stability",
        "config": "deep1000",
        "overrides": {
            "train.steps": steps,
            "opt.warmup_steps": 1 if quick else WARMUP,
            "opt.decay_steps": steps,
            "train.log_every": 1 if quick else 10,
            "train.stats_every": steps,
            "train.eval_every": steps,
            "train.checkpoint_every": steps if quick else 50,
            "train.eval_max_batches": 0,
            "train.train_eval_size": 200 if quick else 1437,
            "train.profile": True,
            "train.on_nonfinite": "record",
            "data.batch_size": 16 if quick else 32,
        },  # fmt: skip
        "variants": variants,
        "grid": [{"model.depth": d} for d in ((6, 12) if quick else (100, 300, 1000))],
        "seeds": [0] if quick else [0, 1, 2],
        "x": "model.depth",
        "log_x": True,
        "baseline": {f"{res}/spectral": f"{res}/none" for res in RESIDUALS if f"{res}/none" in variants},
        "metric": "final_train_loss",
        "report_metrics": ["final_train_loss", "train_accuracy", "test_accuracy", "cos_final_last"],
    }
