"""jaxsmooth: controllable transformer oversmoothing in JAX/Flax.

The packages are the layers; imports point one way only (tests/test_layout.py checks it):

  core       jaxsmooth.config (Spectrum, ModelConfig), .spectral (H = V diag(lambda) V^-1), .attention
             (attention / LN / MLP math), .metrics and .theory (measuring and predicting oversmoothing),
             .linalg: pure functions, no Flax modules
  modules    jaxsmooth.nnx (SpectralAttention, Transformer, ViT, ...), jaxsmooth.linen (Linen interop)
  data       jaxsmooth.data (datasets, batching, corruptions, augmentation); jaxsmooth.configs
  trainer    jaxsmooth.train (train(), the loop and its hooks, checkpoints, run directories)
  tools      jaxsmooth.tools (cli, study, audit, convert, bert)

Submodules are imported on first use (`import jaxsmooth; jaxsmooth.nnx.Transformer` works), so importing
the package stays cheap. Modules that moved when the packages were introduced keep their old import
paths (`jaxsmooth.convert`, `jaxsmooth.parallel`, `jaxsmooth.checkpoint`, ...) as aliases of the new ones.
"""

import importlib
import importlib.abc
import importlib.util
import sys

from jaxsmooth.config import ModelConfig, Spectrum, deepnorm

__version__ = "0.1.0"
_SUBMODULES = ("attention", "linen", "metrics", "nnx", "spectral", "theory", "data", "train", "tools")
# Old path -> new path of the modules that moved into the train/tools/data packages.
MOVED = {
    **{
        f"jaxsmooth.{m}": f"jaxsmooth.train.{m}"
        for m in (
            "checkpoint",
            "evaluation",
            "jsonl",
            "optim",
            "parallel",
            "plots",
            "runlog",
            "runtime",
            "tblog",
            "watchdog",
            "workdir",
        )
    },  # fmt: skip
    "jaxsmooth.augment": "jaxsmooth.data.augment",
    **{f"jaxsmooth.{m}": f"jaxsmooth.tools.{m}" for m in ("cli", "study", "convert", "bert", "audit")},
}
__all__ = ["ModelConfig", "Spectrum", "deepnorm", "__version__", *_SUBMODULES, "convert", "parallel"]


class _MovedFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """`import jaxsmooth.convert` (an old path) imports jaxsmooth.tools.convert and names it both ways."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname in MOVED:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        module = importlib.import_module(MOVED[spec.name])
        sys.modules[spec.name] = module
        return module

    def exec_module(self, module):
        pass  # imported under its new name already


if not any(isinstance(f, _MovedFinder) for f in sys.meta_path):
    sys.meta_path.append(_MovedFinder())


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"jaxsmooth.{name}")
    if f"jaxsmooth.{name}" in MOVED:
        return importlib.import_module(MOVED[f"jaxsmooth.{name}"])
    raise AttributeError(f"module 'jaxsmooth' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_SUBMODULES))
