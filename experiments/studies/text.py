"""Text: a character-level causal LM on the works of Shakespeare (the stand-in for the paper's crammed BERT
on The Pile), baseline / smooth / sharpen / neutral at depths 4 and 8, three seeds; the metric is
validation bits per character (v2 claim: forcing either smoothing or sharpening hurts text models).
Scale: width 64, 4 heads, 64-character windows, batch 32, 1,500 steps (3.1 M characters, about 0.7
passes over the 4.4 M-character training text). A depth-4 run takes about 2.3 minutes on one core;
128-character windows and depth 12 took 5 and ~13, over the CPU study's budget.
Learning rate: the packaged shakespeare_char config's, the same for every variant (not tuned per variant;
RESULTS.md says so).

    jaxsmooth study run experiments/studies/text.py --jobs 2 --commit
"""

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location("_common", Path(__file__).with_name("_common.py"))
_spec.loader.exec_module(common := importlib.util.module_from_spec(_spec))

STEPS = 1500


def get_study(quick: bool = False) -> dict:
    steps = 20 if quick else STEPS
    over = {
        "model.d_model": 16 if quick else 64, "model.num_heads": 2 if quick else 4, "model.mlp_ratio": 4.0,
        "data.seq_len": 32 if quick else 64, "data.batch_size": 16 if quick else 32,
        "data.val_size": 20000 if quick else 200000, "data.train_fraction": 0.05 if quick else 1.0,
        "train.steps": steps, "train.log_every": 5 if quick else 50,
        "train.stats_every": steps if quick else steps // 5,
        "train.eval_every": steps if quick else steps // 5,
        "train.checkpoint_every": steps if quick else steps // 5,
        "train.eval_max_batches": 8 if quick else 40,
        "train.select": "best_val", "train.profile": True, "opt.warmup_steps": 2 if quick else 100,
        "train.test_max_examples": 64 if quick else 0,
    }  # fmt: skip
    names = ["baseline", "sharpen"] if quick else ["baseline", "smooth", "sharpen", "neutral"]
    return {
        "name": "text",
        "config": "shakespeare_char",
        "overrides": over,
        "variants": {v: common.VARIANTS[v] for v in names},
        "grid": [{"model.depth": d} for d in ((1,) if quick else (4, 8))],
        "seeds": [0] if quick else [0, 1, 2],
        "x": "model.depth",
        "metric": "val_bpc",
        "report_metrics": ["val_bpc", "test_bpc", "train_bpc"],
    }
