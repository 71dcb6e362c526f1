"""The default run: a small spectral ViT on scikit-learn's 8x8 digits (bundled with scikit-learn, no
download). About two minutes on 2 CPU cores, test accuracy >= 0.9.

    jaxsmooth train                                   # this config, into ./runs/digits
    jaxsmooth train --config digits --workdir runs/digits
    jaxsmooth train --config digits:quick             # ~100 steps, a CPU smoke test
    jaxsmooth train --config digits:mode=smooth --config.model.depth=12

Args (comma separated): quick; mode=<sharpen|smooth|neutral|free|none> (none = the unconstrained
baseline); depth=<int>.
"""

import ml_collections

from jaxsmooth.configs import _common as common  # the shared sections, fields and defaults

KNOWN_ARGS = {"quick": False, "mode": "sharpen", "depth": int}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = common.parse_args(arg, KNOWN_ARGS)
    quick = args["quick"]
    train = common.train(
        quick,
        steps=100 if quick else 1200,  # optimiser steps (about two minutes on 2 CPU cores)
        log_every=10 if quick else 50,  # metrics.jsonl records
        stats_every=50 if quick else 200,  # per-layer statistics
        eval_every=50 if quick else 400,  # test-set evaluations
        eval_max_batches=0,  # the whole test split, even in a quick run
        checkpoint_every=50 if quick else 400,  # checkpoints
    )
    return common.config(
        "digits",  # run name
        quick,
        model=common.model(
            depth=args.get("depth", 2 if quick else 4),  # blocks
            d_model=32 if quick else 64,  # width
            num_heads=2 if quick else 4,  # heads
            mlp_ratio=2.0,  # a small MLP for small images
            spectrum=common.spectrum(args["mode"]),  # mode= arg, default sharpen
        ),
        data=common.data(
            "digits",  # scikit-learn's 8x8 digits
            {"test_fraction": 0.2, "seed": 0},  # held-out split of the 1797 images
            batch_size=32,  # global batch
            eval_batch_size=128,  # test batch
            patch_size=2,  # 8x8 images -> 16 patches + [CLS] = 17 tokens
        ),
        train=train,  # above
        opt=common.opt(
            train,  # decay_steps follows train.steps
            lr=2e-3,  # peak learning rate
            warmup_steps=10 if quick else 100,  # linear warmup
        ),
    )
