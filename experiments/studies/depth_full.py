"""The full-size depth study, for a GPU: ViT-Tiny on CIFAR-100 with the paper authors' recipe
(jaxsmooth/configs/cifar100.py, recipe=paper; docs/experiments.md "Full-size configs"), every variant at
depths
12 / 24 / 48, three seeds, 5,000 training images held out for best-validation selection. One learning
rate (the recipe's 1.25e-4) for every variant. CIFAR ships in no package: point JAXSMOOTH_CIFAR_DIR at the
extracted cifar-100-python directory.

    JAXSMOOTH_CIFAR_DIR=/data/cifar jaxsmooth study run experiments/studies/depth_full.py --commit

Not run on this project's CPU machines (300 epochs of a 257-token ViT per cell); `--quick` is a smoke test
that needs the same directory.
"""

import importlib.util
import os
from pathlib import Path

_spec = importlib.util.spec_from_file_location("_common", Path(__file__).with_name("_common.py"))
_spec.loader.exec_module(common := importlib.util.module_from_spec(_spec))


def get_study(quick: bool = False) -> dict:
    directory = os.environ.get("JAXSMOOTH_CIFAR_DIR")
    if not directory:
        raise ValueError("set JAXSMOOTH_CIFAR_DIR to the extracted cifar-100-python directory")
    variants = list(common.VARIANTS) if not quick else ["baseline", "sharpen"]
    overrides = {
        "data.kwargs.directory": directory, "data.val_size": 5000, "train.select": "best_val",
        "train.train_eval_size": 5000, "train.profile": True,
    }  # fmt: skip
    if quick:
        overrides.update({"data.val_size": 64, "train.train_eval_size": 64, "train.test_max_examples": 128})
    return {
        "name": "depth_full",
        "config": "cifar100:quick" if quick else "cifar100",
        "overrides": overrides,
        "variants": {v: common.VARIANTS[v] for v in variants},
        "grid": [{"model.depth": d} for d in ((1, 2) if quick else (12, 24, 48))],
        "seeds": [0] if quick else [0, 1, 2],
        "x": "model.depth",
        "log_x": True,
        "report_metrics": ["test_accuracy", "train_accuracy", "val_accuracy"],
    }
