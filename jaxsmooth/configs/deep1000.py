"""A 1000-layer DeepNorm spectral stack (width 32) on scikit-learn digits: depth costs no compile time
(scan), nested remat keeps activation memory about sqrt(L), and DeepNorm's alpha/beta keep the updates
bounded (alpha = (2N)^(1/4) = 6.687, beta = (8N)^(-1/4) = 0.106 for N = 1000), with the blocks'
LayerNorm gains and biases learning at lr / (2N) (model.ln_lr="depth", the default; without it the stack
collapses to an input-independent output by step ~120, experiments/results/deep/README.md).
`depth=100` gives the depth-100 variant (same budget). Measured test accuracies and wall times:
experiments/results/deep_configs.jsonl (`jaxsmooth study run experiments/studies/deep_configs.py`).

    jaxsmooth train --config deep1000 --workdir runs/deep1000
    jaxsmooth train --config deep1000:mode=smooth --workdir runs/deep1000_smooth
    jaxsmooth train --config deep1000:quick --workdir /tmp/deep   # 1000 layers, a few steps

Args (comma separated): quick; mode=<sharpen|smooth|neutral|free|none>; depth=<int>.
"""

import ml_collections

from jaxsmooth.configs import _common as common  # the shared sections, fields and defaults

KNOWN_ARGS = {"quick": False, "mode": "sharpen", "depth": 1000}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = common.parse_args(arg, KNOWN_ARGS)
    quick = args["quick"]
    train = common.train(
        quick,
        steps=4 if quick else 1000,  # optimiser steps
        log_every=1 if quick else 20,  # metrics.jsonl records
        stats_every=2 if quick else 100,  # per-layer statistics
        eval_every=4 if quick else 500,  # test-set evaluations
        eval_max_batches=1 if quick else 0,  # periodic evals: test batches (0 = all)
        checkpoint_every=4 if quick else 250,  # checkpoints
    )
    return common.config(
        "deep1000",  # run name
        quick,
        model=common.model(
            depth=args["depth"],  # 1000 blocks, also in a quick run
            d_model=32,  # width
            num_heads=2,  # heads
            mlp_ratio=2.0,  # a small MLP
            spectrum=common.spectrum(args["mode"]),  # mode= arg, default sharpen
            residual="deepnorm",  # DeepNet's alpha/beta residual scaling
            remat="nested",  # activation memory about sqrt(L)
        ),
        data=common.data(
            "digits",  # scikit-learn's 8x8 digits
            {"test_fraction": 0.2, "seed": 0},  # held-out split of the 1797 images
            batch_size=16 if quick else 32,  # global batch
            eval_batch_size=128,  # test batch
            patch_size=2,  # 8x8 images -> 16 patches + [CLS] = 17 tokens
        ),
        train=train,  # above
        opt=common.opt(train, warmup_steps=1 if quick else 200),  # lr 1e-3, cosine over train.steps
    )
