"""Append-only JSON-lines files: one JSON object per line, only ever appended to (a study's
`experiments/results/<study>.jsonl`, a run's `metrics.jsonl`). No JAX here.

A writer killed mid-line leaves a torn last line (no trailing newline). Two rules keep every record:

- `append_line` starts every record on a fresh line. A torn tail (the bytes after the last newline) is first
  set aside by `repair_torn_tail`: its bytes are appended, unchanged, to the sidecar `<name>.torn` next to
  the file (a header line "# <time> torn tail of <name>: <n> bytes from byte <offset>", then the bytes, then
  a newline), fsynced, and only then is the file truncated to its last newline and fsynced; one line
  "warning: <file>: set aside a torn last line (<n> bytes ...) in <sidecar>" goes to stderr. A tail that
  is a complete JSON object (only its newline was lost) is kept in place and just gets its newline.
- `read_jsonl` skips an unparsable last line with a `TornLineWarning` naming the file and the line, and
  raises `JsonlError` (file, line, what to do) for an unparsable line before the last: a killed writer
  cannot leave one there, and skipping it silently would lose a record. (An unparsable last line that
  has its newline is not moved by the next append, so its warning says to fix or remove it first.)
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings
from pathlib import Path

from jaxsmooth.train import workdir as wd

TORN_SUFFIX = ".torn"  # the sidecar of set-aside torn tails: <name>.jsonl.torn
_CHUNK = 1 << 16  # bytes read per step when looking back for the last newline


class JsonlError(ValueError):
    """A line before the last of an append-only JSON-lines file is not a JSON object; the message names
    the file and the line."""


class TornLineWarning(UserWarning):
    """A reader skipped the torn (unparsable) last line of an append-only JSON-lines file."""


def torn_path(path: str | Path) -> Path:
    """The sidecar that keeps the torn tails set aside from `path`: `<path>.torn`."""
    path = Path(path)
    return path.with_name(path.name + TORN_SUFFIX)


def append_line(path: str | Path, obj: dict | str, *, fsync: bool = True) -> None:
    """Append one record as one line, always starting on a fresh line.

    Args:
      path: the append-only file (created if missing; its directory must exist).
      obj: the record: a dict (written with `json.dumps`) or its JSON text, without the newline.
      fsync: fsync the file after the write (a crash then keeps the record).
    Raises ValueError if the text holds a newline, OSError (e.g. a full disk) if the write fails.
    """
    path = Path(path)
    text = obj if isinstance(obj, str) else json.dumps(obj)
    if "\n" in text:
        raise ValueError(f"a record of {path} must be one line; this one holds a newline")
    data = memoryview((text + "\n").encode())
    # O_APPEND: the write lands at the end even if the repair below truncated the file; O_RDWR: the
    # repair reads the tail through the same descriptor.
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        _repair(fd, path)  # checked at every append: any writer, in any process, may have been killed
        while data:  # a short write (e.g. a nearly full disk) goes on where it stopped, or raises
            data = data[os.write(fd, data) :]
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)


def repair_torn_tail(path: str | Path) -> int:
    """Make `path` end on a newline, keeping every byte: a torn tail is moved to `torn_path(path)` (a tail
    that is a complete JSON object just gets its newline). See the module docstring.

    Args:
      path: the append-only file; a missing or empty one is left as it is.
    Returns:
      The number of bytes set aside (0: nothing was torn, or the tail was a complete record).
    """
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CLOEXEC)
    except FileNotFoundError:
        return 0
    try:
        return _repair(fd, path)
    finally:
        os.close(fd)


def read_jsonl(path: str | Path) -> list[dict]:
    """The records of an append-only JSON-lines file, in order (blank lines are ignored).

    Args:
      path: the file.
    Returns:
      One dict per line. An unparsable last line (torn by a killed writer) is skipped with a
      TornLineWarning naming the file and its line number.
    Raises FileNotFoundError if the file is missing, JsonlError if a line before the last is not a JSON
    object.
    """
    path = Path(path)
    # Bytes, not text: a line cut inside a multi-byte character is one bad line, not a failed read.
    lines = path.read_bytes().split(b"\n")
    # 1-based physical line numbers (as an editor or `sed -n Np` shows them); blank lines carry nothing.
    numbered = [(i + 1, line) for i, line in enumerate(lines) if line.strip()]
    out = []
    for k, (n, line) in enumerate(numbered):
        try:
            out.append(_parse(line))
        except ValueError as e:
            if k == len(numbered) - 1:  # a killed writer's torn line: the records before it are whole
                if n == len(lines):  # no newline after it: the next append moves it to the sidecar
                    then = f"the next append sets it aside in {torn_path(path).name}"
                else:  # it has its newline, so an append would not move it and would leave it mid-file
                    then = f"fix or remove line {n} before appending to the file"
                warnings.warn(
                    f"{path}: skipped its torn last line {n} ({len(line)} bytes, not a complete JSON record; "
                    f"left by a killed writer); {then}",
                    TornLineWarning,
                    stacklevel=2,
                )
                break
            # Not something a killed writer leaves: a hand edit, a merge, or a disk fault. Say where.
            raise JsonlError(
                f"{path}, line {n}: not a JSON record ({e}), and only a last line can be torn by a killed "
                f"writer;\nfix or remove line {n} (the other lines are intact records), then rerun"
            ) from None
    return out


def _parse(line: bytes) -> dict:
    """One line -> its record; ValueError (the reason) if it is not one JSON object."""
    try:
        rec = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError:
        raise ValueError("not UTF-8") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{e.msg} at column {e.colno}") from None
    if not isinstance(rec, dict):
        raise ValueError(f"a JSON {type(rec).__name__}, not an object")
    return rec


def _repair(fd: int, path: Path) -> int:
    """`repair_torn_tail` on an open descriptor (O_RDWR | O_APPEND); returns the bytes set aside."""
    size = os.fstat(fd).st_size
    if size == 0 or os.pread(fd, 1, size - 1) == b"\n":  # the usual case: one byte read, nothing to do
        return 0
    start = _tail_start(fd, size)
    tail = _pread_all(fd, size - start, start)
    try:
        _parse(tail)
        complete = True
    except ValueError:
        complete = False
    if complete:  # only the newline was lost: the record stays where it is
        os.write(fd, b"\n")
        os.fsync(fd)
        return 0
    side = torn_path(path)
    when = time.strftime("%Y-%m-%dT%H:%M:%S")
    header = f"# {when} torn tail of {path.name}: {len(tail)} bytes from byte {start}\n"
    # The bytes reach the sidecar's disk before they leave the file: a crash in between keeps them twice,
    # never zero times.
    sfd = os.open(side, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        data = memoryview(header.encode() + tail + b"\n")
        while data:
            data = data[os.write(sfd, data) :]
        os.fsync(sfd)
    finally:
        os.close(sfd)
    wd.fsync_dir(side.parent)  # the sidecar's directory entry, should it be new
    os.ftruncate(fd, start)
    os.fsync(fd)
    print(f"warning: {path}: set aside a torn last line ({len(tail)} bytes, left by a killed writer) in "
          f"{side}; the complete records are kept", file=sys.stderr, flush=True)  # fmt: skip
    return len(tail)


def _tail_start(fd: int, size: int) -> int:
    """The offset just after the last newline of the first `size` bytes (0 if there is none)."""
    end = size
    while end > 0:  # backwards in chunks: a torn record can be long (per-layer arrays), the file longer
        lo = max(0, end - _CHUNK)
        i = _pread_all(fd, end - lo, lo).rfind(b"\n")
        if i >= 0:
            return lo + i + 1
        end = lo
    return 0


def _pread_all(fd: int, n: int, offset: int) -> bytes:
    parts: list[bytes] = []
    while n > 0:
        b = os.pread(fd, n, offset)
        if not b:  # the file shrank under us; what there is will do
            break
        parts.append(b)
        n, offset = n - len(b), offset + len(b)
    return b"".join(parts)
