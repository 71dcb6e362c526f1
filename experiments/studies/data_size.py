"""Data efficiency: every variant but `free` (see _common.SECONDARY_VARIANTS) at depth 8, trained on
1,000 / 3,000 / 10,000 / 55,000 images (the paper's v1 claim: sharpening helps with fewer data points).
Each run keeps the parameters with the best validation accuracy (evaluated 10 times), so small sets are
early-stopped rather than over-trained.

    jaxsmooth study run experiments/studies/data_size.py --jobs 2 --commit
"""

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location("_common", Path(__file__).with_name("_common.py"))
_spec.loader.exec_module(common := importlib.util.module_from_spec(_spec))

STEPS = 2000
TRAIN_IMAGES = 55000  # Fashion-MNIST's 60,000 minus the 5,000-image validation split


def get_study(quick: bool = False) -> dict:
    variants = list(common.SECONDARY_VARIANTS) if not quick else ["baseline", "sharpen"]
    sizes = (300, 1000) if quick else (1000, 3000, 10000, TRAIN_IMAGES)
    base = TRAIN_IMAGES if not quick else 1200
    over = common.image_scale(20 if quick else STEPS, quick)
    if not quick:
        over.update({"train.eval_every": STEPS // 10, "train.checkpoint_every": STEPS // 10})
    return {
        "name": "data_size",
        "config": "fashion_mnist",
        "overrides": {**over, "model.depth": 2 if quick else 8},
        "variants": common.variants_with_lr(variants, quick),
        # train_fraction of the images left after the validation split (data.prepare carves it first).
        "grid": [{"data.train_fraction": round(n / base, 6), "tags": {"train_images": n}} for n in sizes],
        "seeds": [0] if quick else [0, 1, 2],
        "label": ["train_images"],
        "x": "train_images",
        "log_x": True,
        "report_metrics": ["test_accuracy", "train_accuracy", "val_accuracy"],
    }
