"""Corruption, both ways the paper's robustness claim can mean (v1: sharpening helps with corrupted data):
  - "test": models trained on clean images, tested on corrupted test sets (4 ImageNet-C corruptions x
    severities 1 / 3 / 5, seeded, generated at run time);
  - "train": models trained on corrupted images (2 corruptions x severities 3 / 5), tested on the same
    corruption and on clean images.
Depth 8, every variant but `free` (_common.SECONDARY_VARIANTS). The corruptions come from
imagecorruptions-imaug (jaxsmooth.data.corrupt).

    jaxsmooth study run experiments/studies/corruption.py --jobs 2 --commit
"""

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location("_common", Path(__file__).with_name("_common.py"))
_spec.loader.exec_module(common := importlib.util.module_from_spec(_spec))

STEPS = 2000
TEST_CORRUPTIONS = ("gaussian_noise", "defocus_blur", "contrast", "jpeg_compression")
TRAIN_CORRUPTIONS = ("gaussian_noise", "contrast")


def get_study(quick: bool = False) -> dict:
    test_c = TEST_CORRUPTIONS[:2] if quick else TEST_CORRUPTIONS
    severities = (3,) if quick else (1, 3, 5)
    evals = ",".join(f"{c}:{s}" for c in test_c for s in severities)
    grid = [{"data.corrupt_train": "none", "data.eval_corruptions": evals, "tags": {"trained_on": "clean"}}]
    for c in TRAIN_CORRUPTIONS[:1] if quick else TRAIN_CORRUPTIONS:
        for s in (3,) if quick else (3, 5):
            grid.append({"data.corrupt_train": f"{c}:{s}", "data.eval_corruptions": f"{c}:{s}",
                         "tags": {"trained_on": f"{c}:{s}"}})  # fmt: skip
    variants = ["baseline", "sharpen"] if quick else list(common.SECONDARY_VARIANTS)
    return {
        "name": "corruption",
        "config": "fashion_mnist",
        "overrides": {**common.image_scale(20 if quick else STEPS, quick), "model.depth": 2 if quick else 8},
        "variants": common.variants_with_lr(variants, quick),
        "grid": grid,
        "seeds": [0] if quick else [0, 1, 2],
        # test_corrupted/mean: a clean-trained model's mean over its corrupted test sets (for a model
        # trained on a corruption, its one test set of that corruption).
        "report_metrics": ["test_accuracy", "test_corrupted/mean"]
        + [f"test_corrupted/{c}:{s}" for c in test_c for s in severities]
        + [f"test_corrupted/{c}:{s}" for c in TRAIN_CORRUPTIONS for s in (3, 5)],
        "label": ["trained_on"],
        "profile_point": {"trained_on": "clean"},
        # Clean-trained models: accuracy against severity (0 = the clean test set), one panel a corruption.
        "curves": {
            "point": {"trained_on": "clean"},
            "xlabel": "severity (0 = clean)",
            "ylabel": "test accuracy (mean ± std over seeds)",
            "panels": {
                c: [(0, "test_accuracy")] + [(s, f"test_corrupted/{c}:{s}") for s in severities]
                for c in test_c
            },  # fmt: skip
        },
    }
