"""The packaged deep configs as shipped (jaxsmooth/configs/deep1000.py: DeepNorm, width 32, digits, 1,000
steps):
depth 1000 and depth 100, spectral (sharpen, the default), unconstrained and smooth, seed 0. The bar they
are held to: at least 0.90 test accuracy within the config's own step budget; records carry the wall time.

    jaxsmooth study run experiments/studies/deep_configs.py --jobs 2 --commit
"""


def get_study(quick: bool = False) -> dict:
    return {
        "name": "deep_configs",
        "config": "deep1000:quick" if quick else "deep1000",
        "overrides": {"model.depth": 8} if quick else {},
        "variants": {m: {"model.spectrum.mode": m} for m in ("sharpen", "none", "smooth")},
        "grid": [{"model.depth": 8}] if quick else [{"model.depth": 1000}, {"model.depth": 100}],
        "seeds": [0],
        "baseline": None,
        "metric": "test_accuracy",
        "report_metrics": ["test_accuracy", "final_train_loss"],
    }
