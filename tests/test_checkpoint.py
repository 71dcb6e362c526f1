"""jaxsmooth.checkpoint on small pytrees: round trip, retention, and corrupt checkpoints detected, reported,
moved aside, with the previous good one restored."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxsmooth.checkpoint import CHECKSUM_FILE, CheckpointError, Checkpoints, verify


def _state(step: int):
    params = {"w": jnp.full((4, 3), float(step)), "b": {"c": jnp.arange(5.0) * step}}
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


def _saved(tmp_path, steps=(1, 2, 3), max_to_keep=3):
    ckpt = Checkpoints(tmp_path, max_to_keep)
    for s in steps:
        ckpt.save(s, _state(s))
    return ckpt


def test_round_trip_and_retention(tmp_path):
    ckpt = _saved(tmp_path, steps=(1, 2, 3, 4), max_to_keep=2)
    assert ckpt.steps() == [3, 4]
    step, restored = ckpt.restore_latest(_abstract(_state(0)))
    assert step == 4 and not ckpt.reports
    _assert_equal(restored, _state(4))
    assert verify(tmp_path / "checkpoints" / "4") is None
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


def test_missing_checksum_file_is_restored(tmp_path):
    """Killed after Orbax committed the step but before our checksum file: complete, so it is used."""
    _saved(tmp_path).close()
    (tmp_path / "checkpoints" / "3" / CHECKSUM_FILE).unlink()
    step, restored = Checkpoints(tmp_path, 3).restore_latest(_abstract(_state(0)))
    assert step == 3
    _assert_equal(restored, _state(3))


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
    with pytest.raises(CheckpointError, match="all checkpoints"):
        Checkpoints(tmp_path, 3).restore_latest(_abstract(_state(0)))


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
