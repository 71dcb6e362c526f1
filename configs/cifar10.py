"""CIFAR-10 with the ViT-Tiny recipe of the paper's experiments (width 192, 3 heads, 12 layers, patch 4 ->
64 patches + [CLS]), for GPU users. CIFAR ships in no package here: download the python version
(cifar-10-python.tar.gz) on a machine with internet, extract it, and pass its directory.

    jaxsmooth train --config cifar10 --config.data.kwargs.directory=/data/cifar --workdir runs/c10_sharpen
    jaxsmooth train --config cifar10:mode=smooth --config.data.kwargs.directory=/data/cifar
    jaxsmooth train --config cifar10:mode=none --config.data.kwargs.directory=/data/cifar   # baseline
    jaxsmooth train --config cifar10:quick --config.data.kwargs.directory=DIR   # smoke test on CPU

Args (comma separated): quick; mode=<sharpen|smooth|neutral|free|none>; depth=<int>;
fraction=<float> (data.train_fraction); dir=<path> (same as data.kwargs.directory).
"""

import importlib.util
from pathlib import Path

import ml_collections
from ml_collections import config_dict

try:  # the shared sections, fields and defaults (also when config_flags loads this file by path)
    from jaxsmooth.configs import _common as common
except ImportError:  # jaxsmooth.configs not installed (a source checkout): the _common.py beside this file
    _spec = importlib.util.spec_from_file_location("_common", Path(__file__).with_name("_common.py"))
    _spec.loader.exec_module(common := importlib.util.module_from_spec(_spec))

KNOWN_ARGS = {"quick": False, "mode": "sharpen", "depth": int, "fraction": 1.0, "dir": str}


def get_config(arg: str | None = None, dataset: str = "cifar10") -> ml_collections.ConfigDict:
    args = common.parse_args(arg, KNOWN_ARGS)
    quick = args["quick"]
    train = common.train(
        quick,
        steps=20 if quick else 40000,  # optimiser steps
        stats_every=20 if quick else 1000,  # per-layer statistics
        eval_every=20 if quick else 2000,  # test-set evaluations
        checkpoint_every=20 if quick else 2000,  # checkpoints
    )
    return common.config(
        dataset,  # run name
        quick,
        model=common.model(
            depth=args.get("depth", 2 if quick else 12),  # ViT-Tiny: 12 blocks
            d_model=48 if quick else 192,  # ViT-Tiny width
            num_heads=3,  # ViT-Tiny heads
            spectrum=common.spectrum(args["mode"]),  # mode= arg, default sharpen
            dropout=0.0 if quick else 0.1,  # on attention probabilities and branch outputs
        ),
        data=common.data(
            dataset,  # cifar10 | cifar100 (jaxsmooth.data.DATASETS)
            {"directory": args.get("dir") or config_dict.placeholder(str)},  # extracted cifar-*-python
            train_fraction=args["fraction"],  # fraction= arg
            batch_size=32 if quick else 256,  # global batch
            eval_batch_size=32 if quick else 512,  # test batch
            patch_size=4,  # 32x32 -> 64 patches + [CLS] = 65 tokens
        ),
        train=train,  # above
        opt=common.opt(train, warmup_steps=5 if quick else 2000),  # lr 1e-3, cosine over train.steps
    )
