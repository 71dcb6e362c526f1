"""CIFAR-100 with the ViT-Tiny recipe of the paper's experiments (width 192, 3 heads, 12 layers, patch 4 ->
64 patches + [CLS]), for GPU users: cifar10.py's config with the 100-class data. CIFAR ships in no package
here: download the python version (cifar-100-python.tar.gz) on a machine with internet, extract it, and
pass its directory.

    jaxsmooth train --config cifar100 --config.data.kwargs.directory=/data/cifar --workdir runs/c100_sharpen
    jaxsmooth train --config cifar100:mode=smooth --config.data.kwargs.directory=/data/cifar
    jaxsmooth train --config cifar100:mode=none --config.data.kwargs.directory=/data/cifar   # baseline
    jaxsmooth train --config cifar100:quick --config.data.kwargs.directory=DIR   # smoke test on CPU

Args (comma separated): quick; mode=<sharpen|smooth|neutral|free|none>; depth=<int>;
fraction=<float> (data.train_fraction); dir=<path> (same as data.kwargs.directory).
"""

import ml_collections

from jaxsmooth.configs import _common as common  # the shared sections, fields and defaults


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    return common.sibling("cifar10").get_config(arg, dataset="cifar100")  # name and data.name: cifar100
