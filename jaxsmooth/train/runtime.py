"""Process set-up for training on CPU: a caching memory allocator for XLA's per-step buffers.

XLA:CPU allocates each execution's temp buffer afresh (about 500 MB for a ViT-Tiny train step at batch
64). glibc serves allocations above 32 MB with `mmap` and returns them with `munmap`, so every step faults
in and zeroes every page again: ~130k page faults per step. The faults take the process's memory-map
lock, so they also stall the other XLA thread (a batched LAPACK QR waiting on that thread took 215 ms
per step with the faults, 40 ms without; experiments/benchmarks/README.md). A caching allocator (tcmalloc,
or jemalloc configured to keep freed pages) reuses the same pages every step.

An allocator can only be swapped before the process starts, so `jaxsmooth train` re-executes itself once
with the library in LD_PRELOAD when one is installed (Debian: `apt-get install libtcmalloc-minimal4`) and
says so on stderr. JAXSMOOTH_ALLOCATOR=system turns this off; JAXSMOOTH_ALLOCATOR=/path/lib.so picks one.
Library users get the same effect by starting their own program as

    LD_PRELOAD=libtcmalloc_minimal.so.4 python train.py
"""

from __future__ import annotations

import ctypes.util
import os
import sys
from collections.abc import Mapping

ENV = "JAXSMOOTH_ALLOCATOR"
_DONE = "JAXSMOOTH_ALLOCATOR_ACTIVE"  # set in the re-executed process, so it never loops
# (ctypes.util.find_library name, extra environment), in order of preference
_CANDIDATES = (
    ("tcmalloc_minimal", {}),
    ("tcmalloc", {}),
    # jemalloc's defaults return large freed extents to the OS at once (no gain: measured); keep them.
    ("jemalloc", {"MALLOC_CONF": "oversize_threshold:0,dirty_decay_ms:30000"}),
)


def find_allocator() -> tuple[str, dict[str, str]] | None:
    """(library to preload, extra environment) for the first caching allocator installed, or None."""
    for name, extra in _CANDIDATES:
        found = ctypes.util.find_library(name)  # the soname, e.g. "libtcmalloc_minimal.so.4"
        if found:
            return found, dict(extra)
    return None


def preload_env(env: Mapping[str, str], found: tuple[str, dict[str, str]] | None) -> dict[str, str] | None:
    """The environment to re-execute with, or None to run as we are (pure: tested without exec).

    None when: not on Linux, JAXSMOOTH_ALLOCATOR=system, this process is already the re-executed one, a
    known caching allocator is already in LD_PRELOAD, or none is installed.
    """
    choice = env.get(ENV, "auto")
    if not sys.platform.startswith("linux") or choice in ("system", "0", "off") or env.get(_DONE):
        return None
    preload = env.get("LD_PRELOAD", "")
    if any(key in preload for key in ("tcmalloc", "jemalloc")):
        return None
    if choice not in ("auto", "1", "on"):
        if not os.path.exists(choice):
            raise ValueError(f"{ENV}={choice!r}: no such file (use 'system', 'auto' or a library path)")
        found = (choice, {})
    if found is None:
        return None
    lib, extra = found
    new = {**env, **{k: v for k, v in extra.items() if k not in env}}
    new["LD_PRELOAD"] = f"{lib} {preload}".strip()
    new[_DONE] = lib
    return new


def reexec_with_caching_allocator(argv: list[str]) -> None:
    """Replace this process by `python -m jaxsmooth *argv` under a caching allocator, if one is found.

    Returns (and changes nothing) when `preload_env` says not to. Call it before jax is imported.
    """
    new_env = preload_env(os.environ, find_allocator())
    if new_env is None:
        return
    print(
        f"jaxsmooth: using the {os.path.basename(new_env[_DONE])} allocator (XLA's per-step buffers are "
        f"reused instead of re-faulted); {ENV}=system turns this off",
        file=sys.stderr,
        flush=True,
    )
    os.execve(sys.executable, [sys.executable, "-m", "jaxsmooth", *argv], new_env)


def active_allocator() -> str:
    """The preloaded allocator this process runs under ('system' if none), for run metadata."""
    maps = ""
    try:
        with open("/proc/self/maps") as f:
            maps = f.read()
    except OSError:
        pass
    for key in ("tcmalloc", "jemalloc"):
        if key in maps:
            return key
    return "system"
