"""jaxsmooth.train.checkpoint on small pytrees: round trip, retention, and only verified steps restored.
Corrupt
checkpoints (bad checksums, or no checksum file and contents that do not match the digests saved with
them) are detected, reported, moved aside, and the previous good one restored; an intact checkpoint that
does not fit is refused without being moved; a full disk during a save leaves the earlier steps intact."""

import errno
import json
import shutil
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxsmooth.train import workdir as wd
from jaxsmooth.train.checkpoint import (
    CHECKSUM_FILE,
    META_ITEM,
    CheckpointError,
    Checkpoints,
    NoUsableCheckpointError,
    content_problem,
    read_meta,
    restore_params,
    state_digests,
    verify,
)


def _state(step: int):
    # Random weights: a flipped bit in them is not compressed away, it restores as a wrong number.
    params = {"w": jax.random.normal(jax.random.PRNGKey(step), (32, 16)), "b": {"c": jnp.arange(5.0) * step}}
    return {
        "params": params,
        "opt_state": optax.adamw(1e-3).init(params),  # namedtuples, an int count, an empty state
        "step": jnp.int32(step),
        "rng": jax.random.PRNGKey(step),
    }


def _abstract(state):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state)


def _assert_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _largest_file(step_dir):
    return max((p for p in step_dir.rglob("*") if p.is_file() and p.name != CHECKSUM_FILE),
               key=lambda p: p.stat().st_size)  # fmt: skip


def _saved(tmp_path, steps=(1, 2, 3), max_to_keep=3, metadata=None):
    ckpt = Checkpoints(tmp_path, max_to_keep, metadata)
    for s in steps:
        ckpt.save(s, _state(s))
    return ckpt


def _flip_bit(path, where=0.5):
    raw = bytearray(path.read_bytes())
    raw[int(len(raw) * where)] ^= 0x01
    path.write_bytes(bytes(raw))


def test_round_trip_retention_and_stored_metadata(tmp_path):
    ckpt = _saved(tmp_path, steps=(1, 2, 3, 4), max_to_keep=2, metadata={"config": {"a": 1}})
    assert ckpt.steps() == [3, 4]
    step, restored = ckpt.restore_latest(_abstract(_state(0)))
    assert step == 4 and not ckpt.reports
    _assert_equal(restored, _state(4))
    assert verify(tmp_path / "checkpoints" / "4") is None
    meta, problem = read_meta(tmp_path / "checkpoints" / "4")
    assert problem is None and meta["step"] == 4 and meta["config"] == {"a": 1}
    assert set(meta["digests"]) == {"params", "opt_state", "step", "rng"}
    ckpt.close()


def test_empty_directory_restores_nothing(tmp_path):
    assert Checkpoints(tmp_path, 3).restore_latest(_abstract(_state(0))) is None


@pytest.mark.parametrize("damage", ["garble", "truncate", "delete"])
def test_corrupt_latest_falls_back_to_previous(tmp_path, damage, capsys):
    _saved(tmp_path).close()
    victim = _largest_file(tmp_path / "checkpoints" / "3")
    raw = victim.read_bytes()
    if damage == "garble":
        victim.write_bytes(raw[:8] + bytes(b ^ 0xFF for b in raw[8:24]) + raw[24:])
    elif damage == "truncate":
        victim.write_bytes(raw[: len(raw) // 2])
    else:
        victim.unlink()
    ckpt = Checkpoints(tmp_path, 3)
    step, restored = ckpt.restore_latest(_abstract(_state(0)))
    assert step == 2
    _assert_equal(restored, _state(2))
    assert len(ckpt.reports) == 1 and "step 3" in ckpt.reports[0]
    assert "corrupt" in capsys.readouterr().err
    assert ckpt.steps() == [1, 2]  # the bad step was moved aside ...
    moved = list((tmp_path / "checkpoints_corrupt").iterdir())
    assert len(moved) == 1 and moved[0].name.startswith("3-")  # ... and kept for inspection
    ckpt.save(3, _state(3))  # so the run can write step 3 again
    assert ckpt.steps() == [1, 2, 3]


def test_missing_checksum_file_is_verified_by_digests(tmp_path):
    """Killed after Orbax committed the step but before our checksum file: its digests verify it."""
    _saved(tmp_path).close()
    (tmp_path / "checkpoints" / "3" / CHECKSUM_FILE).unlink()
    ckpt = Checkpoints(tmp_path, 3)
    step, restored = ckpt.restore_latest(_abstract(_state(0)))
    assert step == 3 and not ckpt.reports
    _assert_equal(restored, _state(3))


def test_digests_catch_a_single_changed_value():
    """What the checksum file would catch on disk, the digests catch in the restored arrays: one float
    changed by one ulp is a mismatch; the stored step and NaNs are checked too."""
    state = _state(3)
    meta = {"step": 3, "digests": state_digests(state)}
    assert content_problem(3, state, meta) is None
    changed = jax.tree.map(lambda a: a, state)
    changed["params"]["w"] = state["params"]["w"].at[5, 7].set(np.nextafter(state["params"]["w"][5, 7], 9.0))
    assert "params does not match the digest" in content_problem(3, changed, meta)
    assert "says step 3" in content_problem(4, state, meta)
    nan = jax.tree.map(lambda a: a, state)
    nan["params"]["b"]["c"] = state["params"]["b"]["c"].at[0].set(np.nan)
    assert "NaN" in content_problem(3, nan, None)


def test_missing_checksum_and_flipped_bit_falls_back(tmp_path):
    """Without the checksum file, a flipped bit in the weights restores silently as a wrong number; the
    digests saved with the step catch it, and the previous step is used."""
    _saved(tmp_path).close()
    step_dir = tmp_path / "checkpoints" / "3"
    (step_dir / CHECKSUM_FILE).unlink()
    data = max((p for p in (step_dir / "state").rglob("*") if p.is_file() and "/d/" in str(p)),
               key=lambda p: p.stat().st_size)  # fmt: skip
    _flip_bit(data)
    ckpt = Checkpoints(tmp_path, 3)
    step, restored = ckpt.restore_latest(_abstract(_state(0)))
    assert step == 2
    _assert_equal(restored, _state(2))
    assert len(ckpt.reports) == 1 and "step 3" in ckpt.reports[0]
    assert "digest" in ckpt.reports[0] or "restore failed" in ckpt.reports[0]
    assert ckpt.steps() == [1, 2] and len(list((tmp_path / "checkpoints_corrupt").iterdir())) == 1


def test_step_without_checksum_or_digests_is_not_trusted(tmp_path, capsys):
    """A step that has nothing to verify it by (an older save cut off before its checksum) is moved aside
    with a message saying so, not restored."""
    _saved(tmp_path).close()
    step_dir = tmp_path / "checkpoints" / "3"
    (step_dir / CHECKSUM_FILE).unlink()
    shutil.rmtree(step_dir / META_ITEM)
    ckpt = Checkpoints(tmp_path, 3)
    step, _ = ckpt.restore_latest(_abstract(_state(0)))
    assert step == 2 and "cannot be verified" in ckpt.reports[0]
    assert "cannot be verified" in capsys.readouterr().err


def test_unreadable_checkpoint_without_checksum_falls_back(tmp_path):
    """No checksum and Orbax cannot read it either: reported as corrupt, previous step used."""
    _saved(tmp_path).close()
    step_dir = tmp_path / "checkpoints" / "3"
    (step_dir / CHECKSUM_FILE).unlink()
    for p in (step_dir / "state").rglob("*"):
        if p.is_file():
            p.write_bytes(b"\x00garbage")
    ckpt = Checkpoints(tmp_path, 3)
    step, _ = ckpt.restore_latest(_abstract(_state(0)))
    assert step == 2 and "restore failed" in ckpt.reports[0]


def test_all_corrupt_is_an_error(tmp_path):
    _saved(tmp_path, steps=(1, 2)).close()
    for s in (1, 2):
        sums = tmp_path / "checkpoints" / str(s) / CHECKSUM_FILE
        sums.write_text(json.dumps({k: "0" * 64 for k in json.loads(sums.read_text())}))
    with pytest.raises(NoUsableCheckpointError, match=r"no usable checkpoint.*steps \[1, 2\]"):
        Checkpoints(tmp_path, 3).restore_latest(_abstract(_state(0)))
    assert len(list((tmp_path / "checkpoints_corrupt").iterdir())) == 2  # kept, not deleted


def test_intact_checkpoint_that_does_not_fit_is_refused_not_moved(tmp_path):
    """An intact step restored into another model is a mismatch, not corruption: nothing moves."""
    _saved(tmp_path).close()
    other = _state(0)
    other["params"]["w"] = jnp.zeros((8, 16))  # another shape, as from another model config
    ckpt = Checkpoints(tmp_path, 3)
    with pytest.raises(wd.IncompatibleWorkdirError, match="matches its checksums but does not fit"):
        ckpt.restore_latest(_abstract(other))
    assert ckpt.steps() == [1, 2, 3] and not (tmp_path / "checkpoints_corrupt").exists()


def test_save_cut_off_mid_write_is_ignored_and_cleaned(tmp_path):
    """A save killed before Orbax's final rename leaves only a temporary directory: not a step."""
    _saved(tmp_path, steps=(1, 2)).close()
    partial = tmp_path / "checkpoints" / "3.orbax-checkpoint-tmp-1700000000000000"
    shutil.copytree(tmp_path / "checkpoints" / "2", partial)
    (partial / CHECKSUM_FILE).unlink()
    ckpt = Checkpoints(tmp_path, 3)
    step, restored = ckpt.restore_latest(_abstract(_state(0)))
    assert step == 2 and not ckpt.reports
    _assert_equal(restored, _state(2))
    assert not partial.exists()


def _tmpfs(path, size: str):
    """Mount a small tmpfs at `path` (root only; the test is skipped where mounting is not allowed)."""
    path.mkdir()
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")


def test_disk_full_during_save_keeps_earlier_steps(tmp_path):
    """A real full disk (a 400 KiB tmpfs) during a save: DiskFullError naming the step, the partial save
    removed, the earlier steps intact and restorable. (Where the disk fills up inside the checksum write,
    Orbax's step is complete and its digests verify it.)"""
    disk = tmp_path / "disk"
    _tmpfs(disk, "400k")
    try:
        ckpt = Checkpoints(disk, 10)
        with pytest.raises(wd.DiskFullError) as info:
            for s in range(1, 100):
                ckpt.save(s, _state(s))
        msg = info.value.strerror
        full_at = int(msg.split("checkpoint step ")[1].split()[0])
        if "checksum file" in msg:  # Orbax's save completed, only our checksum file did not fit
            last = full_at
            assert not (disk / "checkpoints" / str(full_at) / CHECKSUM_FILE).exists()
        else:
            last = full_at - 1
            assert f"the last checkpoint, step {last}, is untouched" in msg
            assert not list((disk / "checkpoints").glob(f"{full_at}*"))  # the partial save is gone
        assert last >= 1 and ckpt.steps() == list(range(1, last + 1))
        ckpt.close()
        step, restored = Checkpoints(disk, 10).restore_latest(_abstract(_state(0)))
        assert step == last
        _assert_equal(restored, _state(last))
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def test_save_failure_is_reported_with_the_last_good_step(tmp_path, monkeypatch):
    ckpt = _saved(tmp_path, steps=(1,))

    def fail(*a, **k):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(ckpt._manager, "save", fail)
    with pytest.raises(
        CheckpointError, match="saving checkpoint step 2 .*the last checkpoint, step 1, is untouched"
    ):
        ckpt.save(2, _state(2))


def test_restore_params_relative_path_and_verification(tmp_path, monkeypatch):
    _saved(tmp_path / "run").close()
    monkeypatch.chdir(tmp_path)  # Orbax needs absolute paths: a relative run directory must work too
    step, params = restore_params("run", _state(0)["params"])
    assert step == 3
    _assert_equal(params, _state(3)["params"])
    step_dir = tmp_path / "run" / "checkpoints" / "3"
    other = {"w": jnp.zeros((8, 16)), "b": {"c": jnp.zeros(5)}}
    with pytest.raises(CheckpointError, match="matches its checksums \\(not corrupt\\) but does not fit"):
        restore_params("run", other)
    (step_dir / CHECKSUM_FILE).unlink()  # no checksum: the digest of params verifies what is read
    data = max((p for p in (step_dir / "state").rglob("*") if p.is_file() and "/d/" in str(p)),
               key=lambda p: p.stat().st_size)  # fmt: skip
    _flip_bit(data)
    with pytest.raises(CheckpointError, match="is corrupt.*other steps: \\[1, 2\\]"):
        restore_params("run", _state(0)["params"])
    assert (step_dir / "state").is_dir()  # read-only: nothing moved
