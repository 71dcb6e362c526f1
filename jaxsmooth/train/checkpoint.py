"""Checkpoints of the training state behind one small class, so an Orbax API move touches one file.

Layout (Orbax CheckpointManager; two items committed together, so a step has both or is not a step):

    DIR/checkpoints/<step>/state/...              the pytree (params, optimizer state, step, rng)
    DIR/checkpoints/<step>/meta/...               JSON: the step, the run's config (as given and resolved),
                                                  the devices, and a SHA-256 digest of every state subtree
    DIR/checkpoints/<step>/jaxsmooth_sha256.json  our checksums of every file of that step, written last
    DIR/checkpoints_corrupt/<step>-<unix time>/   checkpoints found corrupt, moved aside (kept for autopsy)

Only verified steps are restored. Orbax writes a step into a temporary directory and renames it when
complete, so a save cut off mid-write never appears as a step; but bytes damaged on disk afterwards can
restore silently as wrong numbers. Two independent checks catch that:
  - the checksum file, written after Orbax's commit, covers every file of the step (checked before the
    restore: a step that fails it is corrupt);
  - the digests inside `meta`, committed with the state, cover its contents (checked after the restore:
    the restored arrays must hash to them, the stored step must be the step, every value finite). They
    verify a step that lost its checksum file to a kill between Orbax's commit and the checksum write.
A step that fails a check is reported, moved to checkpoints_corrupt/, and the previous step is tried. A
step that is intact but does not fit the run (another config) is never moved: the caller compares the
config in `meta` first, and a restore that fails on an intact step raises IncompatibleWorkdirError.

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
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxsmooth.train import workdir as wd
from jaxsmooth.train.workdir import IncompatibleWorkdirError

CHECKSUM_FILE = "jaxsmooth_sha256.json"
ITEM = "state"
META_ITEM = "meta"
META_FORMAT = 1


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used (corrupt, unreadable, missing), or a save failed."""


class NoUsableCheckpointError(CheckpointError):
    """Checkpoints exist but none verifies (each was moved to checkpoints_corrupt/)."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _files(step_dir: Path) -> list[Path]:
    return sorted(p for p in step_dir.rglob("*") if p.is_file() and p.name != CHECKSUM_FILE)


def has_checksum(step_dir: Path) -> bool:
    return (step_dir / CHECKSUM_FILE).is_file()


def verify(step_dir: Path) -> str | None:
    """None if the files of a step match its checksums (or it has no checksum file), else what is wrong."""
    sums_path = step_dir / CHECKSUM_FILE
    if not sums_path.is_file():
        return None  # committed by Orbax, cut off before our checksum: its digests will tell
    try:
        expected: dict[str, str] = json.loads(sums_path.read_text())
    except (OSError, ValueError) as e:
        return f"its checksum file {sums_path} is damaged ({e})"
    for rel, digest in expected.items():
        path = step_dir / rel
        if not path.is_file():
            return f"file {rel} is missing"
        if _sha256(path) != digest:
            return f"file {rel} does not match its checksum (garbled or truncated)"
    return None


def _host(a: Any) -> np.ndarray:
    """A host copy of one leaf (this process's replica of a replicated global array)."""
    if isinstance(a, jax.Array) and not a.is_fully_addressable:
        a = a.addressable_data(0)
    return np.asarray(a)


def tree_digest(tree: Any) -> str:
    """SHA-256 over every leaf of a pytree: its path, dtype, shape and bytes, in tree order."""
    h = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        a = np.ascontiguousarray(_host(leaf))
        h.update(f"{jax.tree_util.keystr(path)}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def state_digests(state: Any) -> dict[str, str]:
    """{subtree: digest} for a dict state (so `params` alone can be verified), {"": digest} otherwise."""
    if isinstance(state, dict):
        return {str(k): tree_digest(v) for k, v in state.items()}
    return {"": tree_digest(state)}


@contextmanager
def _quiet_absl():
    """Orbax logs warnings about metadata it does not need here; keep stderr for our messages."""
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        absl_logger.setLevel(level)


def read_meta(step_dir: Path) -> tuple[dict | None, str | None]:
    """(meta, None) for a step with a readable meta item; (None, None) for a step saved without one (an
    older jaxsmooth); (None, problem) if it is there but unreadable."""
    path = Path(step_dir).absolute() / META_ITEM
    if not path.exists():
        return None, None
    try:
        with _quiet_absl():
            meta = ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(path)
    except Exception as e:  # noqa: BLE001 - any failure to read means: unreadable
        return None, f"its {META_ITEM}/ item is unreadable ({type(e).__name__}: {str(e)[:200]})"
    if not isinstance(meta, dict) or not isinstance(meta.get("digests"), dict):
        return None, f"its {META_ITEM}/ item is damaged (no digests)"
    return meta, None


def content_problem(
    step: int, restored: Any, meta: dict | None, keys: tuple[str, ...] | None = None
) -> str | None:
    """None if a restored state is what was saved as `step`, else what is wrong.

    Args:
      step: the step it was restored from.
      restored: the restored state (or a dict of some of its subtrees).
      meta: the step's meta item (None: only the finiteness and step checks).
      keys: the subtrees to check (default: all of `restored`).
    """
    parts = restored if isinstance(restored, dict) else {"": restored}
    keys = tuple(parts) if keys is None else keys
    if meta is not None:
        if meta.get("step") != step:
            return f"its {META_ITEM}/ item says step {meta.get('step')}"
        for k in keys:
            want = meta["digests"].get(str(k))
            if want is None or tree_digest(parts[k]) != want:
                return f"its {k or 'state'} does not match the digest saved with it (damaged bytes)"
    if "step" in parts and int(_host(parts["step"])) != step:
        return f"the state inside says step {int(_host(parts['step']))}"
    for k in keys:
        for leaf in jax.tree.leaves(parts[k]):
            a = _host(leaf)
            if np.issubdtype(a.dtype, np.inexact) and not np.all(np.isfinite(a)):
                return f"its {k or 'state'} holds NaN or Inf"
    return None


def sync_processes(name: str) -> None:
    """Wait until every process reaches the barrier `name` (a no-op with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


class Checkpoints:
    """Periodic / final saves and restore-the-latest-verified-one for one workdir.

    Args:
      workdir: the run directory (checkpoints go to workdir/checkpoints).
      max_to_keep: newest checkpoints kept (None: all).
      metadata: JSON-able dict saved in every step's meta item (the trainer puts the run's config and
        devices there); `step` and `digests` are added per save. Settable later as `self.metadata`.
    """

    def __init__(self, workdir: str | Path, max_to_keep: int | None, metadata: dict | None = None):
        if max_to_keep is not None and max_to_keep < 1:
            raise ValueError(f"train.max_to_keep={max_to_keep} must be >= 1")
        self.directory = Path(workdir).absolute() / "checkpoints"
        self.corrupt_directory = Path(workdir).absolute() / "checkpoints_corrupt"
        self.primary = jax.process_index() == 0
        self.metadata = dict(metadata or {})
        self._options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            enable_async_checkpointing=False,
            create=True,
            cleanup_tmp_directories=True,  # remove saves that were cut off mid-write (never listed as steps)
        )
        if self.primary and self.directory.is_dir():  # the run holds the workdir's lock: nobody else saves
            for partial in self.directory.glob("*.orbax-checkpoint-tmp*"):
                shutil.rmtree(partial, ignore_errors=True)  # now (Orbax's own cleanup runs in the background)
        sync_processes("jaxsmooth_ckpt_cleanup")
        with _quiet_absl():
            self._manager = ocp.CheckpointManager(self.directory, options=self._options)
        self.reports: list[str] = []  # what was found corrupt, for the run's log
        self.found: list[int] = []  # the steps present when `inspect` ran
        self.candidates: list[int] | None = None  # steps that passed `inspect`, newest first
        self.metas: dict[int, dict | None] = {}

    def steps(self) -> list[int]:
        self._manager.reload()  # re-read the directory: another run or a quarantine may have changed it
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: Any) -> None:
        """Save `state` as `step` (state must be known good: the trainer checks it is finite first).

        Raises DiskFullError on a full disk, CheckpointError on any other failure; either way the partial
        save is removed and the earlier checkpoints are untouched.
        """
        meta = {**self.metadata, "format": META_FORMAT, "step": int(step), "digests": state_digests(state)}
        args = ocp.args.Composite(**{ITEM: ocp.args.StandardSave(state), META_ITEM: ocp.args.JsonSave(meta)})
        try:
            with _quiet_absl():
                self._manager.save(step, args=args)
                self._manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001 - Orbax/TensorStore wrap OSErrors in their own types
            self._remove_partial(step)
            last = [s for s in self.steps() if s != step]
            kept = f"the last checkpoint, step {last[-1]}, is untouched" if last else "no checkpoint is saved"
            if wd.is_disk_full(e):
                raise wd.DiskFullError(
                    28,
                    f"disk full while saving checkpoint step {step} in {self.directory} ({kept}): free "
                    "some space, then rerun the same command to resume",
                ) from None
            raise CheckpointError(
                f"saving checkpoint step {step} in {self.directory} failed ({kept}): "
                f"{type(e).__name__}: {str(e)[:300]}"
            ) from e
        if self.primary:
            step_dir = self.directory / str(step)
            sums = {str(p.relative_to(step_dir)): _sha256(p) for p in _files(step_dir)}
            # Atomic: a checksum file is complete or absent (absent: the digests in meta verify the step).
            try:
                wd.atomic_write_text(step_dir / CHECKSUM_FILE, json.dumps(sums, indent=0, sort_keys=True))
            except wd.DiskFullError:
                raise wd.DiskFullError(
                    28,
                    f"disk full while writing the checksum file of checkpoint step {step} in {self.directory}"
                    " (the step itself is complete: its saved digests verify it on resume): free some "
                    "space, then rerun the same command to resume",
                ) from None
        sync_processes(f"jaxsmooth_ckpt_save_{step}")

    def _remove_partial(self, step: int, settle_s: float = 0.3, deadline_s: float = 10.0) -> None:
        """Remove what a failed save of `step` left behind.

        When one of Orbax's writers fails, the error reaches us while TensorStore's other writers may still
        be finishing into the temporary directory (and can recreate it after one rmtree). So remove, then
        keep checking until the partial paths have stayed absent for `settle_s` (or `deadline_s` passes).
        """
        if not self.primary:
            return
        step_dir = self.directory / str(step)

        def partial() -> list[Path]:
            found = list(self.directory.glob(f"{step}.orbax-checkpoint-tmp*"))
            if step_dir.is_dir() and not (step_dir / "commit_success.txt").exists():
                found.append(step_dir)
            return found

        deadline = time.monotonic() + deadline_s
        absent_since = None
        while time.monotonic() < deadline:
            left = partial()
            if left:
                absent_since = None
                for p in left:
                    shutil.rmtree(p, ignore_errors=True)
            elif absent_since is None:
                absent_since = time.monotonic()
            elif time.monotonic() - absent_since >= settle_s:
                return
            time.sleep(0.02)

    def inspect(self) -> list[int]:
        """Check every step's files and metadata (no arrays are read: cheap, and done before compiling).

        Steps that fail their checksums, whose meta item is unreadable, or that have neither a checksum
        file nor a meta item (nothing to verify them by) are quarantined. Returns the remaining steps,
        newest first; their meta items are in `self.metas` (None for a step saved by an older jaxsmooth).
        """
        self.found = self.steps()
        self.candidates = []
        for step in reversed(self.found):
            step_dir = self.directory / str(step)
            problem = verify(step_dir)
            meta, meta_problem = (None, None) if problem else read_meta(step_dir)
            problem = problem or meta_problem
            if problem is None and meta is None and not has_checksum(step_dir):
                self._quarantine(
                    step, "it has neither a checksum file nor stored digests", "cannot be verified"
                )
                continue
            if problem is not None:
                self._quarantine(step, problem)
                continue
            self.metas[step] = meta
            self.candidates.append(step)
        return list(self.candidates)

    def restore_latest(self, abstract_state: Any) -> tuple[int, Any] | None:
        """(step, state) of the newest checkpoint that verifies, or None if the workdir has none.

        abstract_state: the state's tree of jax.ShapeDtypeStruct (with shardings), e.g. from a freshly
        initialised state. Corrupt steps are reported on stderr, recorded in `self.reports` and moved to
        checkpoints_corrupt/, so the run can save that step number again. Raises NoUsableCheckpointError
        if steps exist but none verifies, IncompatibleWorkdirError if an intact step does not fit
        `abstract_state` (nothing is moved then).
        """
        if self.candidates is None:
            self.inspect()
        for step in list(self.candidates):
            step_dir = self.directory / str(step)
            try:
                with _quiet_absl():
                    restored = self._manager.restore(
                        step, args=ocp.args.Composite(**{ITEM: ocp.args.StandardRestore(abstract_state)})
                    )[ITEM]
            except Exception as e:  # noqa: BLE001 - any failure to read
                if has_checksum(step_dir):  # its bytes are as saved: it does not fit this model
                    raise IncompatibleWorkdirError(
                        f"checkpoint {step_dir} matches its checksums but does not fit the model being "
                        f"built ({type(e).__name__}: {str(e)[:300]}); use the config it was saved with, "
                        "another --workdir, or --restart"
                    ) from None
                problem = f"restore failed: {type(e).__name__}: {str(e)[:300]}"
            else:
                problem = content_problem(step, restored, self.metas.get(step))
                if problem is None:
                    return step, restored
            self._quarantine(step, problem)
            self.candidates.remove(step)
        if self.found:
            raise NoUsableCheckpointError(
                f"no usable checkpoint in {self.directory}: steps {self.found} were corrupt or unverifiable "
                f"and were moved to {self.corrupt_directory}"
            )
        return None

    def _quarantine(self, step: int, problem: str, verdict: str = "is corrupt") -> None:
        msg = f"checkpoint step {step} in {self.directory} {verdict}: {problem}"
        if self.primary:
            self.corrupt_directory.mkdir(parents=True, exist_ok=True)
            dest = self.corrupt_directory / f"{step}-{int(time.time())}"
            shutil.move(str(self.directory / str(step)), dest)
            msg += f"; moved to {dest}"
        sync_processes(f"jaxsmooth_ckpt_quarantine_{step}")
        self._manager.reload()  # forget the moved step
        print(f"WARNING: {msg}", file=sys.stderr, flush=True)
        self.reports.append(msg)

    def close(self) -> None:
        self._manager.close()


def describe_last(directory: Path, steps: list[int]) -> str:
    """A true sentence about the newest of `steps` in the checkpoint `directory`, checked now (for the
    messages of a stopped run: the trainer's, the watchdog's, a lost peer's)."""
    if not steps:
        return "No checkpoint was saved yet."
    step_dir = Path(directory) / str(steps[-1])
    problem = verify(step_dir)
    if problem is not None:
        return f"The last checkpoint, step {steps[-1]}, fails its checksums ({problem}); a rerun skips it."
    if not has_checksum(step_dir):
        return f"The last checkpoint, step {steps[-1]}, has no checksum file; a rerun checks its digests."
    return f"The last checkpoint, step {steps[-1]}, matches its checksums (checked just now)."


def step_dirs(workdir: str | Path) -> list[int]:
    """The checkpoint steps present in a workdir (without verifying them)."""
    ckpt_dir = Path(workdir) / "checkpoints"
    if not ckpt_dir.is_dir():
        return []
    return sorted(int(q.name) for q in ckpt_dir.iterdir() if q.is_dir() and q.name.isdigit())


def pick_step(workdir: str | Path, step: int | None = None) -> int:
    """The newest step of a run (or check that `step` exists); raises CheckpointError naming the others."""
    steps = step_dirs(workdir)
    if not steps:
        raise CheckpointError(
            f"{workdir} has no checkpoints (expected {Path(workdir) / 'checkpoints'}/<step>/)"
        )
    if step is None:
        return steps[-1]
    if step not in steps:
        raise CheckpointError(f"{workdir} has no checkpoint for step {step}; it has steps {steps}")
    return step


def restore_params(
    workdir: str | Path, abstract_params: Any, step: int | None = None, *, source: str = "config.json"
) -> tuple[int, Any]:
    """(step, params) of a run, read-only: only the "params" subtree of the trainer's state is restored
    (newest step by default), on the first local device.

    Args:
      workdir: the run directory (relative paths work).
      abstract_params: the params tree (arrays or ShapeDtypeStructs) of the model rebuilt from `source`.
      step: the step to restore (default: the newest).
      source: where the model's config came from, for the error messages.
    The step is verified (checksums before, the stored digest after the restore); a corrupt, unverifiable
    or ill-fitting step raises CheckpointError saying which, and naming the other steps. Nothing is moved:
    readers (audit, evaluation) never change the run directory.
    """
    workdir = Path(workdir).absolute()  # Orbax needs absolute paths
    step = pick_step(workdir, step)
    steps = step_dirs(workdir)
    step_dir = workdir / "checkpoints" / str(step)
    others = [s for s in steps if s != step]
    hint = f"; other steps: {others}" if others else ""
    problem = verify(step_dir)
    meta, meta_problem = (None, None) if problem else read_meta(step_dir)
    problem = problem or meta_problem
    if problem is None and not (step_dir / ITEM).is_dir():
        problem = f"it has no {ITEM}/ directory"
    if problem is not None:
        raise CheckpointError(f"checkpoint {step_dir} is corrupt: {problem}{hint}")
    if meta is None and not has_checksum(step_dir):
        raise CheckpointError(
            f"checkpoint {step_dir} cannot be verified: it has no checksum file and no stored digests{hint}"
        )
    sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = {
        "params": jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), abstract_params
        )
    }
    try:
        with _quiet_absl():
            restored = ocp.PyTreeCheckpointer().restore(
                step_dir / ITEM,
                args=ocp.args.PyTreeRestore(
                    item=target,
                    restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                    partial_restore=True,
                ),
            )
    except Exception as e:  # noqa: BLE001 - any failure to read means the checkpoint is unusable here
        err = f"{type(e).__name__}: {str(e)[:400]}"
        if has_checksum(step_dir):
            msg = f"matches its checksums (not corrupt) but does not fit the model rebuilt from {source}"
        else:
            msg = f"cannot be read (no checksum file: it is corrupt, or does not fit the model from {source})"
        raise CheckpointError(f"checkpoint {step_dir} {msg}: {err}{hint}") from e
    problem = content_problem(step, restored, meta, keys=("params",))
    if problem is not None:
        raise CheckpointError(f"checkpoint {step_dir} is corrupt: {problem}{hint}")
    return step, restored["params"]
