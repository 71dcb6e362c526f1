"""CIFAR-10 with ViT-Tiny (width 192, 3 heads, 12 layers), for GPU users. Two recipes:

- recipe=paper (default): the recipe of the paper authors' CIFAR experiments (docs/experiments.md,
  "Full-size configs"): 32x32 images in 2x2 patches (256 patches + [CLS]), no Q/K bias, AdamW lr 1.25e-4,
  weight decay 0.05, batch 96, 300 epochs with 5 warmup epochs, cosine, label smoothing 0.1, mixup 1.0 /
  cutmix 0.8 (one of the two per batch), stochastic depth 0.1, random 4-pixel shifts and flips. Not
  implemented: RandAugment (m9-n2) and DeiT's random erasing / repeated augmentation.
- recipe=simple: patch 4 (64 patches + [CLS]), lr 1e-3, batch 256, 40,000 steps, dropout 0.1, no
  augmentation: about 10x cheaper, for quick comparisons.

CIFAR ships in no package here: download the python version (cifar-10-python.tar.gz) on a machine with
internet, extract it, and pass its directory.

    jaxsmooth train --config cifar10 --config.data.kwargs.directory=/data/cifar --workdir runs/c10_sharpen
    jaxsmooth train --config cifar10:mode=smooth,depth=24,dir=/data/cifar
    jaxsmooth train --config cifar10:mode=none,recipe=simple,dir=/data/cifar   # baseline, simple recipe
    jaxsmooth train --config cifar10:quick --config.data.kwargs.directory=DIR   # smoke test on CPU

Args (comma separated): quick; mode=<sharpen|smooth|neutral|free|none>; depth=<int>;
recipe=<paper|simple>; fraction=<float> (data.train_fraction); dir=<path> (same as data.kwargs.directory).
"""

import ml_collections
from ml_collections import config_dict

from jaxsmooth.configs import _common as common  # the shared sections, fields and defaults

KNOWN_ARGS = {"quick": False, "mode": "sharpen", "depth": int, "fraction": 1.0, "dir": str, "recipe": "paper"}
TRAIN_IMAGES = 50_000  # CIFAR-10/100 training split


def get_config(arg: str | None = None, dataset: str = "cifar10") -> ml_collections.ConfigDict:
    args = common.parse_args(arg, KNOWN_ARGS)
    quick, recipe = args["quick"], args["recipe"]
    if recipe not in ("paper", "simple"):
        raise ValueError(f"config arg recipe={recipe!r}: choose paper or simple")
    paper = recipe == "paper" and not quick
    batch = 96 if paper else (32 if quick else 256)
    epoch = -(-int(TRAIN_IMAGES * args["fraction"]) // batch)  # steps per epoch
    train = common.train(
        quick,
        steps=20 if quick else (300 * epoch if paper else 40000),  # optimiser steps (paper: 300 epochs)
        stats_every=20 if quick else 1000,  # per-layer statistics
        eval_every=20 if quick else (10 * epoch if paper else 2000),  # test-set evaluations
        checkpoint_every=20 if quick else 2000,  # checkpoints
        label_smoothing=0.1 if paper else 0.0,  # cross-entropy targets
    )
    return common.config(
        dataset,  # run name
        quick,
        model=common.model(
            depth=args.get("depth", 2 if quick else 12),  # ViT-Tiny: 12 blocks
            d_model=48 if quick else 192,  # ViT-Tiny width
            num_heads=3,  # ViT-Tiny heads
            spectrum=common.spectrum(args["mode"]),  # mode= arg, default sharpen
            dropout=0.1 if recipe == "simple" and not quick else 0.0,  # attention probabilities, branches
            drop_path=0.1 if paper else 0.0,  # stochastic depth (linear in depth, as timm)
            qkv_bias=not paper,  # the paper authors' ViT-Ti has no Q/K/V bias
        ),
        data=common.data(
            dataset,  # cifar10 | cifar100 (jaxsmooth.data.DATASETS)
            {"directory": args.get("dir") or config_dict.placeholder(str)},  # extracted cifar-*-python
            train_fraction=args["fraction"],  # fraction= arg
            batch_size=batch,  # global batch
            eval_batch_size=32 if quick else 512,  # test batch
            patch_size=2 if paper else 4,  # 32x32 -> 256 (paper) or 64 patches, + [CLS]
            random_crop_pad=4 if paper else 0,  # random shifts (padded crops)
            random_flip=paper,  # horizontal flips
            mixup_alpha=1.0 if paper else 0.0,  # mixup Beta(a, a)
            cutmix_alpha=0.8 if paper else 0.0,  # cutmix Beta(a, a)
        ),
        train=train,  # above
        opt=common.opt(
            train,
            warmup_steps=5 if quick else (5 * epoch if paper else 2000),  # paper: 5 epochs
            lr=1.25e-4 if paper else 1e-3,  # peak learning rate
        ),
    )
