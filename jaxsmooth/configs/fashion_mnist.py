"""Fashion-MNIST, the CPU-scale stand-in for CIFAR (write-ups must say so): 28x28 grey images padded
to 32x32, patch 4 -> 64 patches + [CLS], a ViT of width 128, 6 layers, 4 heads.

Data: Debian package dataset-fashion-mnist (`apt-get install -y dataset-fashion-mnist`), read from
/usr/share/datasets/fashion-mnist/ (override with --config.data.kwargs.directory=DIR).

    jaxsmooth train --config fashion_mnist --workdir runs/fmnist_sharpen
    jaxsmooth train --config fashion_mnist:mode=smooth --workdir runs/fmnist_smooth
    jaxsmooth train --config fashion_mnist:quick,mode=none --workdir /tmp/fm   # CPU smoke test

Args (comma separated): quick; mode=<sharpen|smooth|neutral|free|none>; depth=<int>;
fraction=<float> (data.train_fraction, for data-efficiency runs).
"""

import ml_collections
from ml_collections import config_dict

from jaxsmooth.configs import _common as common  # the shared sections, fields and defaults

KNOWN_ARGS = {"quick": False, "mode": "sharpen", "depth": int, "fraction": float}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = common.parse_args(arg, KNOWN_ARGS)
    quick = args["quick"]
    train = common.train(
        quick,
        steps=30 if quick else 10000,  # optimiser steps
        eval_every=30 if quick else 2000,  # test-set evaluations
    )
    return common.config(
        "fashion_mnist",  # run name
        quick,
        model=common.model(
            depth=args.get("depth", 2 if quick else 6),  # blocks
            d_model=32 if quick else 128,  # width
            num_heads=2 if quick else 4,  # heads
            mlp_ratio=2.0 if quick else 4.0,  # MLP width / d_model
            spectrum=common.spectrum(args["mode"]),  # mode= arg, default sharpen
        ),
        data=common.data(
            "fashion_mnist",  # Debian's dataset-fashion-mnist
            {"directory": config_dict.placeholder(str), "pad_to": 32},  # None: the Debian path
            train_fraction=args.get("fraction", 0.1 if quick else 1.0),  # fraction= arg
            batch_size=32 if quick else 128,  # global batch
            patch_size=4,  # 32x32 (padded) -> 64 patches + [CLS] = 65 tokens
        ),
        train=train,  # above
        opt=common.opt(train, warmup_steps=5 if quick else 500),  # lr 1e-3, cosine over train.steps
    )
