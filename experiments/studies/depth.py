"""Depth: every variant at depths 2 to 32 with three seeds (the paper's v1 claim: sharpening helps more as
layers are added; v2: smoothing can help image classification).

    jaxsmooth study run experiments/studies/depth.py --jobs 2 --commit
"""

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location("_common", Path(__file__).with_name("_common.py"))
_spec.loader.exec_module(common := importlib.util.module_from_spec(_spec))

STEPS = 2000


def get_study(quick: bool = False) -> dict:
    variants = list(common.VARIANTS) if not quick else ["baseline", "sharpen", "smooth"]
    return {
        "name": "depth",
        "config": "fashion_mnist",
        "overrides": common.image_scale(20 if quick else STEPS, quick),
        "variants": common.variants_with_lr(variants, quick),
        "grid": [{"model.depth": d} for d in ((1, 2) if quick else (2, 4, 8, 16, 32))],
        "seeds": [0, 1] if quick else [0, 1, 2],
        "x": "model.depth",
        "log_x": True,
        "report_metrics": ["test_accuracy", "train_accuracy", "val_accuracy"],
    }
