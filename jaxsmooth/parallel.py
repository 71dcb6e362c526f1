"""Data parallelism: a 1-D mesh over all devices, the batch sharded along "data", parameters replicated.

Single process: the mesh is `jax.devices()` (e.g. 4 CPU devices with
XLA_FLAGS=--xla_force_host_platform_device_count=4); the global batch is placed with one sharded
device_put. XLA inserts the gradient all-reduce, because the loss is a mean over a sharded batch
and the parameters are replicated: the step's code does not change.

Multiple processes (`initialize`): every process runs the same program on the global mesh of all
processes' devices; each one builds only the rows of the global batch that its own devices hold
(`local_rows`) and `jax.make_array_from_process_local_data` assembles the global array. On CPU the
cross-process collectives use gloo (jax's default `jax_cpu_collectives_implementation`).
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXIS = "data"
ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID = (
    "JAX_COORDINATOR_ADDRESS",
    "JAX_NUM_PROCESSES",
    "JAX_PROCESS_ID",
)


def initialize(
    coordinator_address: str | None = None, num_processes: int | None = None, process_id: int | None = None
) -> bool:
    """`jax.distributed.initialize` from the arguments, else from the environment variables
    JAX_COORDINATOR_ADDRESS (host:port of process 0), JAX_NUM_PROCESSES, JAX_PROCESS_ID.

    Returns False (and does nothing) when no coordinator is given: a plain single-process run. Must run
    before anything touches a device.
    """
    coordinator_address = coordinator_address or os.environ.get(ENV_COORDINATOR)
    if not coordinator_address:
        return False
    env_n, env_id = os.environ.get(ENV_NUM_PROCESSES), os.environ.get(ENV_PROCESS_ID)
    num_processes = num_processes if num_processes is not None else (int(env_n) if env_n else None)
    process_id = process_id if process_id is not None else (int(env_id) if env_id else None)
    if num_processes is None or process_id is None:
        raise ValueError(
            f"a coordinator address ({coordinator_address}) needs the number of processes and this "
            f"process's id: set {ENV_NUM_PROCESSES} and {ENV_PROCESS_ID} (or --num_processes/--process_id)"
        )
    if not 0 <= process_id < num_processes:
        raise ValueError(f"process_id={process_id} must be in [0, num_processes={num_processes})")
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
    return True


def make_mesh(num_devices: int = 0) -> Mesh:
    """1-D mesh ("data",) over the first `num_devices` devices (0 = all devices of all processes)."""
    devices = jax.devices()
    if num_devices < 0 or num_devices > len(devices):
        raise ValueError(f"train.num_devices={num_devices} must be in [0, {len(devices)}] (0 = all devices)")
    if num_devices and num_devices != len(devices) and jax.process_count() > 1:
        raise ValueError("train.num_devices must be 0 (all devices) in a multi-process run")
    return Mesh(np.asarray(devices[: num_devices or len(devices)]), (AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over the mesh, every other axis whole."""
    return NamedSharding(mesh, P(AXIS))


def check_batch_size(batch_size: int, mesh: Mesh, field: str = "data.batch_size") -> None:
    n = mesh.devices.size
    if batch_size % n:
        raise ValueError(
            f"{field}={batch_size} must be divisible by the number of devices ({n}): data parallelism "
            f"gives each device batch_size / {n} rows. Change {field} or train.num_devices."
        )


def local_rows(mesh: Mesh, global_batch: int) -> slice:
    """The rows of a [global_batch, ...] array that this process's devices hold (contiguous)."""
    index_map = batch_sharding(mesh).addressable_devices_indices_map((global_batch,))
    starts = [idx[0].start or 0 for idx in index_map.values()]
    stops = [global_batch if idx[0].stop is None else idx[0].stop for idx in index_map.values()]
    lo, hi = min(starts), max(stops)
    if hi - lo != sum(b - a for a, b in set(zip(starts, stops, strict=True))):
        raise RuntimeError("this process's batch shards are not contiguous; unsupported device order")
    return slice(lo, hi)


def put_batch(mesh: Mesh, global_batch: int, *local_arrays: np.ndarray) -> tuple[jax.Array, ...]:
    """Global sharded arrays from this process's rows (`local_rows`) of each [global_batch, ...] array."""
    sharding = batch_sharding(mesh)
    return tuple(
        jax.make_array_from_process_local_data(sharding, a, (global_batch, *a.shape[1:]))
        for a in local_arrays
    )
