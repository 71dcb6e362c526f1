"""The run directory kept safe: one trainer per workdir, metadata written atomically, the path and free
space checked before anything is compiled, and a config compared against the one a checkpoint was made
with. No JAX here: the trainer (jaxsmooth.train), the checkpoints (jaxsmooth.train.checkpoint) and the CLI
use it.

- `WorkdirLock`: an exclusive `fcntl.flock` on DIR/jaxsmooth.lock, held for the run's life; the file names
  the holder (pid, host, start time, command). The kernel drops the lock when its process dies, so a lock
  file whose lock is free was left by a process that is gone: it is taken over, with a message.
- `atomic_write_text` / `atomic_write_json`: temp file in the same directory, fsync, rename, fsync of the
  directory: a crash leaves the old file or the new one, never a torn one. `read_json` names a damaged
  file in its error.
- `resolved_config` / `config_differences`: what a checkpoint stores and how a resumed config is compared
  with it. Every field counts except those in `RESUMABLE_CHANGES` (they cannot change the model, the data
  stream or the optimiser trajectory), so a field added to the config later is compared by default.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import json
import math
import os
import shutil
import socket
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from jaxsmooth.train import migrate

LOCK_FILE = "jaxsmooth.lock"
# What a previous run leaves in its workdir; `--restart` renames each to <stem>.<k><suffix>.
RUN_FILES = ("metrics.jsonl", "summary.json", "config.json", "curves.png", "checkpoints")

# Config fields that may differ between the run that saved a checkpoint and the run that resumes it, and
# why they cannot change the trajectory. Everything else is compared (resolved values: a field set to its
# default equals the default). opt.decay_steps follows train.steps in the packaged configs, so raising
# train.steps changes it unless the schedule ignores it (constant) or it is pinned on the command line.
RESUMABLE_CHANGES = {
    "name": "the run's name (only the default workdir follows it)",
    "train.steps": "where the run stops; the schedule's length is opt.decay_steps, compared separately",
    "train.log_every": "logging",
    "train.stats_every": "logging (per-layer statistics of the same forward pass)",
    "train.eval_every": "evaluation",
    "train.eval_max_batches": "evaluation",
    "train.checkpoint_every": "checkpoints",
    "train.max_to_keep": "checkpoints",
    "train.num_devices": "data-parallel devices (the global batch is the same; see README: resuming)",
    "train.model_parallel": "devices along the mesh's model axis (the same computation, placed otherwise)",
    "train.param_sharding": "where parameters live (the same computation, placed otherwise)",
    "data.eval_batch_size": "evaluation batches (padded and masked)",
    "data.eval_corruptions": "which corrupted test sets the final evaluation adds",
    "train.select": "which parameters the final test uses (the trajectory is the same)",
    "train.train_eval_size": "evaluation",
    "train.test_max_examples": "evaluation",
    "train.profile": "evaluation",
    "train.on_nonfinite": "what happens after a divergence",
    "train.tensorboard": "logging",
    "train.step_timeout_s": "the step watchdog (when a stuck run is stopped)",
    "model.remat": "recomputation: the same values",
    "model.remat_group": "recomputation: the same values",
    "model.scan": "scanned or unrolled layers: the same values",
    "model.fast_backward": "the same gradients, laid out differently",
}


class WorkdirError(ValueError):
    """The workdir cannot hold a run (empty path, a file, not creatable, not writable, too little space)."""


class WorkdirLockedError(WorkdirError):
    """Another trainer holds the workdir's lock."""


class IncompatibleWorkdirError(ValueError):
    """The workdir holds a run whose model, data or optimiser config differs from the config."""


class MetadataError(ValueError):
    """A metadata file of the workdir (config.json, summary.json, ...) is damaged; the message names it."""


class DiskFullError(OSError):
    """The disk filled up while the run wrote to its workdir; the message names the file."""


# ---------------------------------------------------------------------------------------- files


def is_disk_full(e: BaseException) -> bool:
    """Whether an exception (an OSError, or Orbax/TensorStore's wrapped one) reports a full disk."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(e)
    return "No space left on device" in text or "Disk quota exceeded" in text


def disk_full_error(path: Path | str, e: BaseException, what: str = "") -> DiskFullError:
    """A DiskFullError naming `path` (and what was being written), with the free space left."""
    try:
        free = f"{shutil.disk_usage(Path(path).parent).free / 2**20:.1f} MiB free"
    except OSError:
        free = "free space unknown"
    return DiskFullError(
        errno.ENOSPC,
        f"disk full while writing {what or path} ({free}): free some space, then rerun the same command "
        "to resume from the last checkpoint",
    )


def fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems cannot fsync a directory; the rename is still atomic
    finally:
        os.close(fd)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write `text` to `path` so that a crash leaves either the old file or the complete new one.

    Args:
      path: the file to (re)write; its directory must exist.
      text: the whole new content.
    Raises DiskFullError on a full disk (the old file is kept), OSError otherwise.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with tmp.open("w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if is_disk_full(e):
            raise disk_full_error(path, e) from None
        raise
    fsync_dir(path.parent)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """`atomic_write_text(path, json.dumps(obj, indent=2) + "\\n")`."""
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def read_json(path: str | Path, fix: str = "") -> Any:
    """Parse a JSON metadata file; a damaged one raises MetadataError naming it.

    Args:
      path: the file.
      fix: what the user can do about a damaged file (appended to the message).
    Returns the parsed object. Raises FileNotFoundError if it does not exist.
    """
    path = Path(path)
    raw = path.read_bytes()
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        what = "empty" if not raw.strip() else f"not valid JSON ({e})"
        raise MetadataError(f"{path} is damaged: {what}" + (f"; {fix}" if fix else "")) from None


# ---------------------------------------------------------------------------------------- the workdir


def prepare_workdir(workdir: str | Path) -> Path:
    """Check that `workdir` can hold a run, creating it if needed; returns it as a Path.

    Done before anything is compiled, so a bad path fails in a second rather than after the compile.
    Raises WorkdirError naming the problem and its fix (DiskFullError if nothing can be written).
    """
    if isinstance(workdir, str) and not workdir.strip():
        raise WorkdirError("--workdir is empty: give a directory, or leave the flag out for ./runs/<name>")
    p = Path(workdir)
    if p.exists() and not p.is_dir():
        raise WorkdirError(f"workdir {p} is a file, not a directory: pass a directory (created if missing)")
    try:
        p.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        parent = next((q for q in p.parents if q.exists() and not q.is_dir()), p)
        raise WorkdirError(
            f"cannot create workdir {p}: {parent} is a file; choose another --workdir"
        ) from None
    except OSError as e:
        raise WorkdirError(f"cannot create workdir {p}: {e.strerror}; choose another --workdir") from None
    probe = p / f".jaxsmooth-write-test-{socket.gethostname()}-{os.getpid()}"
    try:
        with probe.open("wb") as f:
            f.write(b"x")
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        if is_disk_full(e):
            raise disk_full_error(probe, e, f"a test file in {p}") from None
        raise WorkdirError(f"workdir {p} is not writable ({e.strerror}); choose another --workdir") from None
    finally:
        try:
            probe.unlink(missing_ok=True)
        except OSError:  # a read-only filesystem refuses even this
            pass
    return p


def check_free_space(workdir: Path, need_bytes: int, why: str) -> None:
    """Raise WorkdirError if the filesystem of `workdir` has less than `need_bytes` free."""
    free = shutil.disk_usage(workdir).free
    if free < need_bytes:
        raise WorkdirError(
            f"only {free / 2**20:.1f} MiB free where {workdir} lives; the run needs about "
            f"{need_bytes / 2**20:.1f} MiB ({why}): free some space, lower train.max_to_keep, or use "
            "another --workdir"
        )


def tree_size(path: Path) -> int:
    """Bytes of the files under `path` (0 if it does not exist)."""
    return sum(q.stat().st_size for q in path.rglob("*") if q.is_file()) if path.exists() else 0


def archive_previous_run(workdir: Path) -> list[str]:
    """Rename a previous run's files (RUN_FILES) to <stem>.<k><suffix> with one k for all of them, the
    smallest not yet used; returns "old -> new" for each renamed file. Nothing is deleted."""
    present = [name for name in RUN_FILES if (workdir / name).exists()]
    if not present:
        return []

    def numbered(name: str, k: int) -> Path:
        stem, dot, suffix = name.partition(".")
        return workdir / (f"{stem}.{k}.{suffix}" if dot else f"{stem}.{k}")

    k = 1
    while any(numbered(name, k).exists() for name in RUN_FILES):
        k += 1
    moved = []
    for name in present:
        os.replace(workdir / name, numbered(name, k))
        moved.append(f"{name} -> {numbered(name, k).name}")
    fsync_dir(workdir)
    return moved


# ---------------------------------------------------------------------------------------- the lock

_HELD: list[WorkdirLock] = []  # locks held by this process (released by `release_all` on a hard exit)


class WorkdirLock:
    """An exclusive lock on a workdir for the life of a run (a context manager).

    Args:
      workdir: the run directory (must exist).
      enabled: False makes this a no-op (the non-primary processes of a multi-process run).
    After entering, `took_over` is a message if a lock left by a process that is gone was taken over.
    Raises WorkdirLockedError, naming the holder, if another process holds it.
    """

    def __init__(self, workdir: Path, enabled: bool = True):
        self.path, self.enabled = Path(workdir) / LOCK_FILE, enabled
        self.fd: int | None = None
        self.took_over: str | None = None

    def __enter__(self) -> WorkdirLock:
        if not self.enabled:
            return self
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                os.close(fd)
                raise
            holder = None
            for _ in range(20):  # the holder writes its details just after locking
                holder = _read_holder(fd)
                if holder:
                    break
                time.sleep(0.05)
            os.close(fd)
            raise WorkdirLockedError(locked_message(self.path.parent, holder)) from None
        previous = _read_holder(fd)
        if previous:
            self.took_over = (
                f"note: taking over the lock of {self.path.parent}, left by {describe_holder(previous)}, "
                "which no longer holds it (it was killed or crashed)"
            )
        me = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "command": " ".join(sys.argv)[:300],
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
        os.fsync(fd)
        self.fd = fd
        _HELD.append(self)
        return self

    def release(self) -> None:
        """Clear the holder's details and unlock (idempotent)."""
        if self.fd is None:
            return
        fd, self.fd = self.fd, None
        try:
            os.ftruncate(fd, 0)  # an empty lock file: nobody to take over from
        except OSError:
            pass
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
        if self in _HELD:
            _HELD.remove(self)

    def __exit__(self, *exc) -> None:
        self.release()


def live_holder(workdir: str | Path) -> dict | None:
    """The details of a trainer that holds `workdir`'s lock, if it runs on this host and is alive; None
    otherwise. Takes no lock (so it never disturbs a trainer that is starting): a quick early refusal for
    the CLI, before the slow imports; the lock itself is taken by WorkdirLock."""
    try:
        raw = (Path(workdir) / LOCK_FILE).read_bytes()
        holder = json.loads(raw.decode()) if raw.strip() else None
    except (OSError, ValueError):
        return None
    if not isinstance(holder, dict) or holder.get("host") != socket.gethostname():
        return None
    pid = holder.get("pid")
    try:
        cmdline = Path(f"/proc/{int(pid)}/cmdline").read_bytes()
    except (OSError, TypeError, ValueError):
        return None
    return holder if b"jaxsmooth" in cmdline and pid != os.getpid() else None


def release_all() -> None:
    """Release every workdir lock this process holds (for a signal handler that exits at once)."""
    for lock in list(_HELD):
        lock.release()


def _read_holder(fd: int) -> dict | None:
    try:
        raw = os.pread(fd, 4096, 0)
        return json.loads(raw.decode()) if raw.strip() else None
    except (OSError, ValueError):
        return None


def locked_message(workdir: str | Path, holder: dict | None) -> str:
    """The error of a second trainer: who holds the workdir, and what to do."""
    return (
        f"{workdir} is in use by another trainer ({describe_holder(holder)}); wait for it to finish or stop "
        "it, or use another --workdir"
    )


def describe_holder(holder: dict | None) -> str:
    """'pid 123 on host h, started 2025-01-01 12:00:00 UTC' from a lock file's details."""
    if not holder:
        return "a process that has not written its details yet"
    return f"pid {holder.get('pid')} on host {holder.get('host')}, started {holder.get('started')}"


# ---------------------------------------------------------------------------------------- config


def check_finite(config: Mapping[str, Any], prefix: str = "") -> None:
    """Raise ValueError naming the first field that holds NaN, or +-inf outside model.spectrum.lo/hi
    (where mode=free means unbounded). A non-finite learning rate or Adam constant trains silently wrong."""
    for key, value in config.items():
        field = f"{prefix}{key}"
        if isinstance(value, Mapping):
            check_finite(value, f"{field}.")
        elif isinstance(value, float) and not math.isfinite(value):
            if math.isinf(value) and field in ("model.spectrum.lo", "model.spectrum.hi"):
                continue
            raise ValueError(f"{field}={value} must be a finite number")


def resolved_config(config_dict: Mapping[str, Any], model_config: Any) -> dict:
    """The config as a checkpoint stores it for comparison: a plain JSON-able dict whose "model" section
    is the typed model config with its defaults filled in (e.g. spectrum.lo of mode sharpen is -1.0, so
    giving -1.0 explicitly is no difference), every other section as given (FieldReferences resolved).

    Args:
      config_dict: the run config as a plain dict (`json.loads(config.to_json_best_effort())`).
      model_config: the ModelConfig built from it (a dataclass).
    Returns a new dict.
    """
    out = json.loads(json.dumps(dict(config_dict)))
    out["model"] = json.loads(json.dumps(dataclasses.asdict(model_config)))
    return out


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, Mapping):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out if out or not prefix else {prefix[:-1]: {}}
    return {prefix[:-1]: d}


_ABSENT = object()

# Fields added to the config after runs had been made, with the value that behaves as before they existed:
# a checkpoint whose stored config lacks one resumes under a config that has it at that value.
ADDED_FIELDS = migrate.ADDED_FIELDS


def config_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """The fields whose difference would change the model, the data stream or the optimiser trajectory,
    as "field: checkpoint has X, config has Y" lines (empty if resuming is safe).

    Args:
      saved: the resolved config stored with a checkpoint (`resolved_config`).
      current: the resolved config of the run that wants to resume it.
    Every field counts except RESUMABLE_CHANGES; opt.decay_steps only when the schedule uses it.
    """
    a, b = _flatten(saved), _flatten(current)
    constant = a.get("opt.schedule") == b.get("opt.schedule") == "constant"
    lines = []
    for field in sorted(set(a) | set(b)):
        if field in RESUMABLE_CHANGES or (constant and field == "opt.decay_steps"):
            continue
        va, vb = (
            a.get(field, ADDED_FIELDS.get(field, _ABSENT)),
            b.get(field, ADDED_FIELDS.get(field, _ABSENT)),
        )
        if va == vb or (_is_nan(va) and _is_nan(vb)):
            continue
        show = lambda v: "(no such field)" if v is _ABSENT else repr(v)
        line = f"{field}: checkpoint has {show(va)}, config has {show(vb)}"
        if field == "opt.decay_steps":
            line += f" (it follows train.steps; pin it with --config.opt.decay_steps={show(va)} to continue)"
        lines.append(line)
    return lines


def _is_nan(v: Any) -> bool:
    return isinstance(v, float) and math.isnan(v)
