"""Deterministic, pure-numpy data loading for jaxsmooth training runs.

Modules, each one concept (every public name is re-exported here, so `data_lib.load(...)` and
`from jaxsmooth.data import Batcher` keep working):
  datasets      the frozen `Dataset`, the loaders (digits, Fashion-MNIST, MNIST, CIFAR, character
                corpora), `load` by registry name (`DATASETS`), `DataNotFoundError`, `IdxFormatError`
  splits        `prepare`: the validation split, a seeded training subset, corrupted training images
  corruptions   seeded ImageNet-C style corruptions (`corrupt`), cached on disk (`corrupt_cached`),
                "name:severity" specs (`parse_corruption(s)`) and corrupted test sets (`corrupted_test`)
  batching      `Batcher` (the batch of step t is a pure function of (seed, t), so a resumed run sees
                the batches an uninterrupted one would) and `eval_batches`
  augment       on-device augmentation and label smoothing inside the train step (not re-exported)

Conventions: images are float32 in [0, 1] with shape [N, H, W, C] (C=1 for grey), labels int32 [N];
text is a 1-D int32 array of character ids whose targets (the next character) the batcher makes.
"""

from jaxsmooth.data.batching import Batcher, eval_batches
from jaxsmooth.data.corruptions import (
    INSTALL_CORRUPTIONS,
    SMALL_IMAGE_CORRUPTIONS,
    cache_dir,
    corrupt,
    corrupt_cached,
    corrupted_test,
    parse_corruption,
    parse_corruptions,
)
from jaxsmooth.data.datasets import (
    CIFAR_LAYOUT,
    DATASETS,
    FASHION_MNIST_DIR,
    INSTALL_FASHION_MNIST,
    INSTALL_MNIST,
    INSTALL_SHAKESPEARE,
    DataNotFoundError,
    Dataset,
    IdxFormatError,
    check_fraction,
    load,
    load_char_corpus,
    load_cifar,
    load_digits,
    load_fashion_mnist,
    load_idx,
    load_mnist,
    read_idx,
    stratified_pick,
)
from jaxsmooth.data.splits import VAL_SEED, prepare

_CIFAR_LAYOUT = CIFAR_LAYOUT  # the name tests/test_data.py used before the split

__all__ = [
    "CIFAR_LAYOUT",
    "DATASETS",
    "FASHION_MNIST_DIR",
    "INSTALL_CORRUPTIONS",
    "INSTALL_FASHION_MNIST",
    "INSTALL_MNIST",
    "INSTALL_SHAKESPEARE",
    "SMALL_IMAGE_CORRUPTIONS",
    "VAL_SEED",
    "Batcher",
    "DataNotFoundError",
    "Dataset",
    "IdxFormatError",
    "cache_dir",
    "check_fraction",
    "corrupt",
    "corrupt_cached",
    "corrupted_test",
    "eval_batches",
    "load",
    "load_char_corpus",
    "load_cifar",
    "load_digits",
    "load_fashion_mnist",
    "load_idx",
    "load_mnist",
    "parse_corruption",
    "parse_corruptions",
    "prepare",
    "read_idx",
    "stratified_pick",
]
