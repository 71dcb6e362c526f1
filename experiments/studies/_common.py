"""What the study specs share: the CPU study scale, the variants, and the learning rate chosen per variant.

The scale (docs in experiments/RESULTS.md, "Scale"): Fashion-MNIST (the CPU stand-in for CIFAR) padded to
32x32, patch 8 -> 16 patches + [CLS] = 17 tokens; a pre-LN ViT of width 64, 4 heads, MLP ratio 2; batch 64;
5,000 training images held out as the validation split (model selection and early stopping use it; the
test set is evaluated once, at the end, on the parameters the validation split selected).
"""

from __future__ import annotations

from pathlib import Path

from jaxsmooth.tools import study

RESULTS = Path(__file__).resolve().parents[1] / "results"

# What differs between the compared models (dotted config field -> value).
VARIANTS = {
    "baseline": {"model.spectrum.mode": "none"},
    "smooth": {"model.spectrum.mode": "smooth"},  # eig(H) in (0, 1]
    "sharpen": {"model.spectrum.mode": "sharpen"},  # eig(H) in [-1, 0): the paper's condition
    "neutral": {"model.spectrum.mode": "neutral"},  # eig(H) in [-1, 1]: same parameterisation, no sign
    "free": {"model.spectrum.mode": "free"},  # eigen-parameterised, unbounded: the other control
    "attnscale": {"model.spectrum.mode": "none", "model.branch_scale": "attnscale"},  # Wang et al. 2022
    "featscale": {"model.spectrum.mode": "none", "model.branch_scale": "featscale"},
}


# The variants of the studies that are not about depth (data_size, corruption): every variant but `free`.
# `free` (eigen-parameterised, unbounded) tracked `neutral` (the same map, bounded to [-1, 1]) at every
# learning rate of the lr study (RESULTS.md section 1), and dropping it keeps the CPU study near its 8-hour
# budget; it stays in `lr` and `depth`.
SECONDARY_VARIANTS = tuple(v for v in VARIANTS if v != "free")


def image_scale(steps: int, quick: bool) -> dict:
    """The overrides of the packaged fashion_mnist config for the CPU study scale (quick: a smoke test)."""
    if quick:
        return {
            "model.d_model": 16, "model.num_heads": 2, "model.mlp_ratio": 2.0,
            "data.kwargs.pad_to": 32, "data.patch_size": 8, "data.batch_size": 16,
            "data.train_fraction": 0.02,
            "data.val_size": 200, "data.eval_batch_size": 200, "train.steps": steps, "train.log_every": 5,
            "train.stats_every": steps, "train.eval_every": steps, "train.checkpoint_every": steps,
            "train.eval_max_batches": 0, "train.select": "best_val", "train.train_eval_size": 200,
            "train.test_max_examples": 400, "train.profile": True, "opt.warmup_steps": 2,
        }  # fmt: skip
    return {
        "model.d_model": 64, "model.num_heads": 4, "model.mlp_ratio": 2.0,
        "data.kwargs.pad_to": 32, "data.patch_size": 8, "data.batch_size": 64, "data.val_size": 5000,
        "data.eval_batch_size": 500, "train.steps": steps, "train.log_every": 50,
        "train.stats_every": max(steps // 5, 1), "train.eval_every": max(steps // 5, 1),
        "train.checkpoint_every": max(steps // 5, 1), "train.eval_max_batches": 0, "train.select": "best_val",
        "train.train_eval_size": 5000, "train.profile": True, "opt.warmup_steps": steps // 20,
    }  # fmt: skip


def chosen_lr(variant: str, quick: bool) -> float:
    """The learning rate the `lr` study chose for `variant` on the validation split (best mean validation
    accuracy over its seeds); the quick studies use 1e-3."""
    if quick:
        return 1e-3
    path = RESULTS / "lr.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run the lr study first (experiments/studies/lr.py)")
    records = study.read_records(path)  # a torn last line is skipped with a warning, not a crash
    by_lr: dict[float, list[float]] = {}
    for r in records:
        if r["variant"] == variant and r.get("val_accuracy") is not None:
            by_lr.setdefault(r["tags"]["opt.lr"], []).append(r["val_accuracy"])
    if not by_lr:
        raise ValueError(f"the lr study has no finished runs of {variant!r}: finish it first")
    return max(by_lr, key=lambda lr: sum(by_lr[lr]) / len(by_lr[lr]))


def variants_with_lr(names, quick: bool) -> dict:
    """VARIANTS restricted to `names`, each with its chosen learning rate."""
    return {v: {**VARIANTS[v], "opt.lr": chosen_lr(v, quick)} for v in names}
