"""Learning-rate selection: every variant at depth 8 with three learning rates and two seeds; each variant
later uses the rate with the best mean validation accuracy (studies/_common.py:chosen_lr), so no variant is
compared at another's optimum.

    jaxsmooth study run experiments/studies/lr.py --jobs 2 --commit
"""

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location("_common", Path(__file__).with_name("_common.py"))
_spec.loader.exec_module(common := importlib.util.module_from_spec(_spec))

STEPS = 2000


def get_study(quick: bool = False) -> dict:
    variants = list(common.VARIANTS) if not quick else ["baseline", "sharpen"]
    return {
        "name": "lr",
        "config": "fashion_mnist",
        "overrides": {**common.image_scale(20 if quick else STEPS, quick), "model.depth": 2 if quick else 8},
        "variants": {v: common.VARIANTS[v] for v in variants},
        "grid": [{"opt.lr": lr} for lr in ((1e-3,) if quick else (5e-4, 1e-3, 2e-3))],
        "seeds": [0, 1],
        "x": "opt.lr",
        "log_x": True,
        "metric": "val_accuracy",
        "report_metrics": ["val_accuracy", "train_accuracy"],
    }
