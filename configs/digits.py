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
from ml_collections import config_dict


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = dict(kv.split("=", 1) if "=" in kv else (kv, "1") for kv in (arg or "").split(",") if kv)
    unknown = set(args) - {"quick", "mode", "depth"}
    if unknown:
        raise ValueError(f"unknown config args {sorted(unknown)}; known: quick, mode=..., depth=...")
    quick = "quick" in args

    c = ml_collections.ConfigDict()
    c.name = "digits" + ("_quick" if quick else "")  # run name: default workdir is ./runs/<name>

    c.model = ml_collections.ConfigDict()  # jaxsmooth.ModelConfig fields
    c.model.depth = int(args.get("depth", 2 if quick else 4))  # number of transformer blocks L
    c.model.d_model = 32 if quick else 64  # width D
    c.model.num_heads = 2 if quick else 4  # attention heads; must divide d_model
    c.model.mlp_ratio = 2.0  # MLP hidden width = mlp_ratio * d_model
    c.model.spectrum = ml_collections.ConfigDict()  # constraint on the eigenvalues of H = W_V W_O
    c.model.spectrum.mode = args.get("mode", "sharpen")  # sharpen|smooth|neutral|free, or none = baseline
    c.model.spectrum.basis = "orthogonal"  # orthogonal (symmetric H, the paper) | general (cond <= max_cond)
    c.model.spectrum.bound = "clip"  # clip (the paper) | smooth (sigmoid map, never saturates)
    c.model.spectrum.lo = config_dict.placeholder(float)  # lower end of the interval (None: mode default)
    c.model.spectrum.hi = config_dict.placeholder(float)  # upper end of the interval (None: mode default)
    c.model.spectrum.max_cond = 10.0  # basis=general: bound on the condition number of V
    c.model.spectrum.margin = 1e-6  # keeps open interval ends open, as a fraction of hi - lo
    c.model.residual = "pre_ln"  # pre_ln | post_ln | deepnorm
    c.model.deepnorm_arch = "encoder"  # which DeepNet formula sets alpha, beta (encoder | decoder)
    c.model.ln_gain = "free"  # free | positive (softplus gain: keeps the sign of the eigenvalues)
    c.model.remat = "none"  # none | full | nested (activation memory vs recompute)
    c.model.remat_group = config_dict.placeholder(int)  # remat=nested: layers per group (None: sqrt(L))
    c.model.scan = True  # scan over layers (False: unrolled loop, a test oracle)
    c.model.dropout = 0.0  # dropout on attention probabilities and branch outputs
    c.model.dtype = "float32"  # compute dtype (params stay float32)
    c.model.qkv_bias = True  # biases on the Q and K projections
    c.model.branch_scale = "none"  # none | attnscale | featscale (Wang et al. 2022 baselines)
    c.model.ln_eps = 1e-6  # LayerNorm epsilon

    c.data = ml_collections.ConfigDict()  # dataset, batching (jaxsmooth.data)
    c.data.name = "digits"  # dataset (jaxsmooth.data.DATASETS)
    c.data.kwargs = ml_collections.ConfigDict({"test_fraction": 0.2, "seed": 0})  # loader arguments
    c.data.train_fraction = 1.0  # keep this fraction of the training split (data-efficiency studies)
    c.data.batch_size = 32  # global batch, split over the devices
    c.data.eval_batch_size = 128  # test batches (padded, masked)
    c.data.seed = 0  # data order and train_fraction subset
    c.data.patch_size = 2  # 8x8 images -> 16 patches + [CLS] = 17 tokens
    c.data.seq_len = config_dict.placeholder(int)  # text only

    c.train = ml_collections.ConfigDict()  # loop, logging, checkpoints (jaxsmooth.train)
    c.train.steps = 100 if quick else 1200  # optimiser steps
    c.train.log_every = 10 if quick else 50  # steps between metrics.jsonl records
    c.train.stats_every = 50 if quick else 200  # steps between per-layer statistics (same forward pass)
    c.train.eval_every = 50 if quick else 400  # steps between test-set evaluations
    c.train.eval_max_batches = 0  # periodic evals on at most this many test batches (0 = all)
    c.train.checkpoint_every = 50 if quick else 400  # steps between checkpoints (and one at the end)
    c.train.max_to_keep = 3  # checkpoints kept (>= 2 lets a corrupt latest one fall back)
    c.train.seed = 0  # parameter init and dropout
    c.train.num_devices = 0  # data-parallel devices (0 = all)

    c.opt = ml_collections.ConfigDict()  # optimiser (jaxsmooth.optim.make_optimizer)
    c.opt.lr = 2e-3  # peak learning rate
    c.opt.warmup_steps = 10 if quick else 100  # linear warmup from 0
    c.opt.schedule = "cosine"  # cosine | linear | constant (after warmup)
    c.opt.decay_steps = c.train.get_ref("steps")  # schedule length: follows train.steps
    c.opt.end_lr_fraction = 0.01  # final lr = end_lr_fraction * lr
    c.opt.weight_decay = 0.05  # AdamW decoupled decay, on matrices only (jaxsmooth.optim)
    c.opt.clip_norm = 1.0  # global gradient-norm clip
    c.opt.b1 = 0.9  # Adam beta1
    c.opt.b2 = 0.999  # Adam beta2
    c.opt.eps = 1e-8  # Adam epsilon
    return c
