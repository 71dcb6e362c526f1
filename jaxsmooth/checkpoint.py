"""Checkpoints of the training state behind one small class, so an Orbax API move touches one file.

Layout (Orbax CheckpointManager, one item "state" saved with StandardSave):

    DIR/checkpoints/<step>/state/...              the pytree (params, optimizer state, step, rng)
    DIR/checkpoints/<step>/jaxsmooth_sha256.json  our checksums of every file of that step, written last
    DIR/checkpoints_corrupt/<step>-<unix time>/   checkpoints found corrupt, moved aside (kept for autopsy)

Why checksums: Orbax writes a step into a temporary directory and renames it when complete, so a save
cut off mid-write never appears as a step; but bytes damaged on disk afterwards (a garbled or truncated
file) can restore silently as wrong numbers. The checksum file is written after the save has finished,
so a step whose checksum file is missing was interrupted between the two: it is complete (Orbax
committed it) but unverified, and is restored if Orbax can read it. Corrupt or unreadable steps are
reported, moved aside, and the previous step is tried.

Saves are synchronous: the checksum needs the finished files, and small CPU runs gain little from async
writes. Multi-process: every process takes part in Orbax's save/restore (it coordinates the hosts); only
process 0 writes checksums and moves corrupt steps, and the others wait for it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

CHECKSUM_FILE = "jaxsmooth_sha256.json"
ITEM = "state"


class CheckpointError(RuntimeError):
    """No usable checkpoint although some exist (all corrupt), or a save failed."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _files(step_dir: Path) -> list[Path]:
    return sorted(p for p in step_dir.rglob("*") if p.is_file() and p.name != CHECKSUM_FILE)


def verify(step_dir: Path) -> str | None:
    """None if the files of a step match its checksums (or it has none yet), else what is wrong."""
    sums_path = step_dir / CHECKSUM_FILE
    if not sums_path.is_file():
        return None  # committed by Orbax, interrupted before our checksum: restore will tell
    try:
        expected: dict[str, str] = json.loads(sums_path.read_text())
    except (OSError, ValueError) as e:
        return f"unreadable checksum file {sums_path} ({e})"
    for rel, digest in expected.items():
        path = step_dir / rel
        if not path.is_file():
            return f"file {rel} is missing"
        if _sha256(path) != digest:
            return f"file {rel} does not match its checksum (garbled or truncated)"
    return None


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


class Checkpoints:
    """Periodic / final saves and restore-the-latest-good-one for one workdir."""

    def __init__(self, workdir: str | Path, max_to_keep: int | None):
        if max_to_keep is not None and max_to_keep < 1:
            raise ValueError(f"train.max_to_keep={max_to_keep} must be >= 1")
        self.directory = Path(workdir).absolute() / "checkpoints"
        self.corrupt_directory = Path(workdir).absolute() / "checkpoints_corrupt"
        self.primary = jax.process_index() == 0
        self._options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            enable_async_checkpointing=False,
            create=True,
            cleanup_tmp_directories=True,  # remove saves that were cut off mid-write (never listed as steps)
        )
        self._manager = ocp.CheckpointManager(self.directory, options=self._options)
        self.reports: list[str] = []  # what was found corrupt, for the run's log

    def steps(self) -> list[int]:
        self._manager.reload()  # re-read the directory: another run or a quarantine may have changed it
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: Any) -> None:
        """Save `state` as `step` (state must be known good: the trainer checks it is finite first)."""
        self._manager.save(step, args=ocp.args.Composite(**{ITEM: ocp.args.StandardSave(state)}))
        self._manager.wait_until_finished()
        if self.primary:
            step_dir = self.directory / str(step)
            sums = {str(p.relative_to(step_dir)): _sha256(p) for p in _files(step_dir)}
            tmp = step_dir / (CHECKSUM_FILE + ".tmp")
            tmp.write_text(json.dumps(sums, indent=0, sort_keys=True))
            tmp.replace(step_dir / CHECKSUM_FILE)  # atomic: a checksum file is complete or absent
        _sync(f"jaxsmooth_ckpt_save_{step}")

    def restore_latest(self, abstract_state: Any) -> tuple[int, Any] | None:
        """(step, state) of the newest checkpoint that verifies and restores, or None if there is none.

        abstract_state: the state's tree of jax.ShapeDtypeStruct (with shardings), e.g. from a freshly
        initialised state. Corrupt steps are reported on stderr, recorded in `self.reports` and moved to
        checkpoints_corrupt/, so the run can save that step number again.
        """
        steps = self.steps()
        for step in reversed(steps):
            problem = verify(self.directory / str(step))
            if problem is None:
                try:
                    restored = self._manager.restore(
                        step, args=ocp.args.Composite(**{ITEM: ocp.args.StandardRestore(abstract_state)})
                    )
                    return step, restored[ITEM]
                except Exception as e:  # noqa: BLE001 - any failure to read means: not usable
                    problem = f"restore failed: {type(e).__name__}: {str(e)[:300]}"
            self._quarantine(step, problem)
        if steps:
            raise CheckpointError(
                f"all checkpoints in {self.directory} are corrupt (steps {steps}); they were moved to "
                f"{self.corrupt_directory}. Delete the workdir's checkpoints to start over."
            )
        return None

    def _quarantine(self, step: int, problem: str) -> None:
        msg = f"checkpoint step {step} in {self.directory} is corrupt: {problem}"
        if self.primary:
            self.corrupt_directory.mkdir(parents=True, exist_ok=True)
            dest = self.corrupt_directory / f"{step}-{int(time.time())}"
            shutil.move(str(self.directory / str(step)), dest)
            msg += f"; moved to {dest}"
        _sync(f"jaxsmooth_ckpt_quarantine_{step}")
        self._manager.reload()  # forget the moved step
        print(f"WARNING: {msg}", file=sys.stderr, flush=True)
        self.reports.append(msg)

    def close(self) -> None:
        self._manager.close()


def step_dirs(workdir: str | Path) -> list[int]:
    """The checkpoint steps present in a workdir (without verifying them)."""
    ckpt_dir = Path(workdir) / "checkpoints"
    if not ckpt_dir.is_dir():
        return []
    return sorted(int(q.name) for q in ckpt_dir.iterdir() if q.is_dir() and q.name.isdigit())


def restore_params(workdir: str | Path, abstract_params: Any, step: int | None = None) -> tuple[int, Any]:
    """(step, params) of a run, read-only: only the "params" subtree of the trainer's state is restored
    (newest step by default), on the first local device.

    The step's checksums are verified first; a corrupt or unreadable step raises CheckpointError naming
    the other steps. Nothing is moved: readers (audit, evaluation) never change the run directory.
    """
    steps = step_dirs(workdir)
    if not steps:
        raise CheckpointError(
            f"{workdir} has no checkpoints (expected {Path(workdir) / 'checkpoints'}/<step>/)"
        )
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise CheckpointError(f"{workdir} has no checkpoint for step {step}; it has steps {steps}")
    step_dir = Path(workdir) / "checkpoints" / str(step)
    others = [s for s in steps if s != step]
    hint = f"; other steps: {others}" if others else ""
    problem = verify(step_dir)
    if problem is None and not (step_dir / ITEM).is_dir():
        problem = f"it has no {ITEM}/ directory"
    if problem is not None:
        raise CheckpointError(f"checkpoint {step_dir} is corrupt: {problem}{hint}")
    sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = {
        "params": jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), abstract_params
        )
    }
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)  # Orbax warns about metadata it does not need here
    try:
        restored = ocp.PyTreeCheckpointer().restore(
            step_dir / ITEM,
            args=ocp.args.PyTreeRestore(
                item=target,
                restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                partial_restore=True,
            ),
        )
    except Exception as e:  # noqa: BLE001 - any failure to read means the checkpoint is unusable
        raise CheckpointError(
            f"checkpoint {step_dir} is corrupt or does not match the run's config.json: "
            f"{type(e).__name__}: {str(e)[:400]}{hint}"
        ) from e
    finally:
        absl_logger.setLevel(level)
    return step, restored["params"]
