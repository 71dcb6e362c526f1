"""Data parallelism: a 1-D mesh over all devices, the batch sharded along "data", parameters replicated.

Single process: the mesh is `jax.devices()` (e.g. 4 CPU devices with
XLA_FLAGS=--xla_force_host_platform_device_count=4); the global batch is placed with one sharded
device_put. XLA inserts the gradient all-reduce, because the loss is a mean over a sharded batch
and the parameters are replicated: the step's code does not change.

Multiple processes (`initialize`): every process runs the same program on the global mesh of all
processes' devices; each one builds only the rows of the global batch that its own devices hold
(`local_rows`) and `jax.make_array_from_process_local_data` assembles the global array. On CPU the
cross-process collectives use gloo (jax's default `jax_cpu_collectives_implementation`). A process joins
a run from JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID, or with JAXSMOOTH_DISTRIBUTED=auto
from jax's cluster detection (SLURM, Open MPI, Kubernetes, Cloud TPU; `distributed_args`). When one process
dies, the others must not wait for it forever: a collective that loses its peer fails at once, and
`peer_loss_as_error` turns that failure into `PeerLostError` (the CLI then exits at once); a process that
vanishes silently is declared dead by jax's coordination service after JAXSMOOTH_HEARTBEAT_TIMEOUT_S
seconds (default 60), which then terminates every process.

Sharded parameters. Every parameter of jaxsmooth's models carries logical axis names (`out_sharding`
metadata: "embed", "heads", "mlp", "vocab", "classes", "patch", and "layers" for the stacked block axis).
A rule set maps each name to a mesh axis or None (replicated); `partition_specs` resolves a model's
names through Flax's logical-axis rules (`nnx.logical_axis_rules` + `nnx.get_partition_spec`) into mesh
PartitionSpecs, `check_specs` proves them valid for a mesh, and `shard_model` / `state_shardings` place a
model or the trainer's state. The rule sets (`RULES`):

    replicated       every parameter whole on every device (plain data parallelism).
    tensor_parallel  Megatron-style over the "model" axis: "heads" (the output columns of W_Q, W_K, W_V,
                     theta, the rows of W_O, psi) and "mlp" (the hidden units of the MLP) are split, so each
                     device holds whole heads when num_heads is divisible by the axis size. Embeddings,
                     LayerNorms, the vocabulary and the head stay replicated ("vocab" too: vocabularies
                     such as 65 characters rarely divide the axis).
    fsdp             ZeRO-3 / FSDP over the "data" axis: every parameter is split along its "embed" axis
                     (the model width D, present in every matrix and vector of the blocks), and XLA
                     gathers it where a layer needs it; works on the 1-D data-parallel mesh.
    fsdp_tp          both: "embed" over "data", "heads" / "mlp" over "model" (a 2-D mesh).
The stacked "layers" axis is never split: the scan over layers reads one slice per step.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXIS = "data"
MODEL_AXIS = "model"
# The logical axis names jaxsmooth's parameters carry (jaxsmooth.nnx.layers.param, Transformer's vmap).
LOGICAL_AXES = ("layers", "embed", "heads", "mlp", "vocab", "classes", "patch")
Rules = tuple[tuple[str, str | None], ...]  # Flax LogicalRules: (logical name, mesh axis or None)


def _rules(**mesh_axes: str | None) -> Rules:
    return tuple((name, mesh_axes.get(name)) for name in LOGICAL_AXES)


REPLICATED = _rules()
TENSOR_PARALLEL = _rules(heads=MODEL_AXIS, mlp=MODEL_AXIS)
FSDP = _rules(embed=AXIS)
FSDP_TP = _rules(embed=AXIS, heads=MODEL_AXIS, mlp=MODEL_AXIS)
RULES = {"replicated": REPLICATED, "tensor_parallel": TENSOR_PARALLEL, "fsdp": FSDP, "fsdp_tp": FSDP_TP}
ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID = (
    "JAX_COORDINATOR_ADDRESS",
    "JAX_NUM_PROCESSES",
    "JAX_PROCESS_ID",
)
ENV_DISTRIBUTED = "JAXSMOOTH_DISTRIBUTED"  # "auto": join the run that jax's cluster detection finds
ENV_HEARTBEAT = "JAXSMOOTH_HEARTBEAT_TIMEOUT_S"
# jax's own default is 100 s. A peer that dies with its host still up closes its sockets, and the collective
# waiting on it fails at once; the heartbeat only bounds the silent cases (a host that lost power or its
# network). A minute is long beside the heartbeat thread's scheduling delays, even on a loaded machine.
DEFAULT_HEARTBEAT_TIMEOUT_S = 60


def _env_int(env: Mapping[str, str], name: str) -> int | None:
    text = env.get(name, "").strip()
    if not text:
        return None
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{name}={text!r} is not an integer") from None


def heartbeat_timeout(env: Mapping[str, str] | None = None) -> int:
    """Seconds without a heartbeat after which jax's coordination service declares a process dead
    (JAXSMOOTH_HEARTBEAT_TIMEOUT_S, default `DEFAULT_HEARTBEAT_TIMEOUT_S`)."""
    seconds = _env_int(os.environ if env is None else env, ENV_HEARTBEAT)
    if seconds is None:
        return DEFAULT_HEARTBEAT_TIMEOUT_S
    if seconds < 1:
        raise ValueError(f"{ENV_HEARTBEAT}={seconds} must be at least 1 (seconds)")
    return seconds


def distributed_args(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    env: Mapping[str, str] | None = None,
) -> dict[str, Any] | None:
    """The keyword arguments `initialize` passes to `jax.distributed.initialize`, or None for a
    single-process run. Pure (reads only `env`, default os.environ): the decision is tested without a
    cluster.

    Explicit: a coordinator address (argument, else JAX_COORDINATOR_ADDRESS) needs the number of processes
    and this process's id (arguments, else JAX_NUM_PROCESSES / JAX_PROCESS_ID). Automatic:
    JAXSMOOTH_DISTRIBUTED=auto passes only what is given and leaves the rest to jax's cluster detection
    (jax/_src/clusters: SLURM, Open MPI, Kubernetes with the `kubernetes` package, Cloud TPU; not mpi4py,
    which jax only uses when asked by name). Never automatic otherwise: a lone `srun` or `mpirun` of one
    process should not start a coordination service. Every multi-process run gets
    `heartbeat_timeout_seconds` (`heartbeat_timeout`).
    """
    env = os.environ if env is None else env
    mode = env.get(ENV_DISTRIBUTED, "").strip().lower()
    if mode not in ("", "auto"):
        raise ValueError(
            f"{ENV_DISTRIBUTED}={env[ENV_DISTRIBUTED]!r}: the only value is 'auto' (jax's cluster "
            f"detection); unset it to run one process, or set {ENV_COORDINATOR}, {ENV_NUM_PROCESSES}, "
            f"{ENV_PROCESS_ID}"
        )
    coordinator_address = coordinator_address or env.get(ENV_COORDINATOR) or None
    if num_processes is None:
        num_processes = _env_int(env, ENV_NUM_PROCESSES)
    if process_id is None:
        process_id = _env_int(env, ENV_PROCESS_ID)
    if not coordinator_address and mode != "auto":
        return None
    if mode != "auto" and (num_processes is None or process_id is None):
        raise ValueError(
            f"a coordinator address ({coordinator_address}) needs the number of processes and this "
            f"process's id: set {ENV_NUM_PROCESSES} and {ENV_PROCESS_ID} (or --num_processes/--process_id), "
            f"or {ENV_DISTRIBUTED}=auto to take them from the cluster (SLURM, ...)"
        )
    if num_processes is not None and process_id is not None and not 0 <= process_id < num_processes:
        raise ValueError(f"process_id={process_id} must be in [0, num_processes={num_processes})")
    given = {"coordinator_address": coordinator_address, "num_processes": num_processes,
             "process_id": process_id}  # fmt: skip
    return {
        **{k: v for k, v in given.items() if v is not None},
        "heartbeat_timeout_seconds": heartbeat_timeout(env),
    }


def initialize(
    coordinator_address: str | None = None, num_processes: int | None = None, process_id: int | None = None
) -> bool:
    """`jax.distributed.initialize` with `distributed_args` (the arguments, else the environment variables
    JAX_COORDINATOR_ADDRESS (host:port of process 0), JAX_NUM_PROCESSES, JAX_PROCESS_ID, or
    JAXSMOOTH_DISTRIBUTED=auto; the heartbeat timeout from JAXSMOOTH_HEARTBEAT_TIMEOUT_S).

    Returns False (and does nothing) for a plain single-process run. Must run before anything touches a
    device.
    """
    args = distributed_args(coordinator_address, num_processes, process_id)
    if args is None:
        return False
    try:
        jax.distributed.initialize(**args)
    except ValueError as e:
        if "coordinator_address" in args:
            raise
        # jax's own words ("coordinator_address should be defined.") do not say that detection failed.
        raise ValueError(
            f"{ENV_DISTRIBUTED}=auto: jax found no cluster environment to join ({e}); it detects SLURM "
            f"(srun), Open MPI (mpirun), Kubernetes indexed Jobs and Cloud TPU. Elsewhere set "
            f"{ENV_COORDINATOR}, {ENV_NUM_PROCESSES} and {ENV_PROCESS_ID}"
        ) from None
    return True


class PeerLostError(RuntimeError):
    """Another process of this multi-process run died or stopped answering, so this one cannot go on."""


# How a lost peer reads in the errors that reach Python: gloo's failed CPU collectives ("Gloo all-reduce
# failed: ... Connection reset by peer", "Gloo AllGather failed: ... Connection closed by peer", also inside
# Orbax's checkpoint syncs) and the coordination service's heartbeat verdicts.
_PEER_LOST = re.compile(
    r"\bGloo\b.*\bfailed\b|Connection (?:closed|reset) by peer|Broken pipe|heartbeat timeout|"
    r"stopped sending heartbeats",
    re.IGNORECASE,
)


def is_peer_loss(exc: BaseException) -> bool:
    """Whether `exc`, or an exception it was raised from or during, reports a lost peer process."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if _PEER_LOST.search(str(e)):
            return True
        e = e.__cause__ or e.__context__
    return False


@contextlib.contextmanager
def peer_loss_as_error() -> Iterator[None]:
    """Re-raise an error that reports a lost peer (`is_peer_loss`) as `PeerLostError`, in a multi-process
    run only. Whatever failed (a train step's all-reduce, a checkpoint's sync, an evaluation), the cause is
    the same and so is the remedy: restart every process."""
    try:
        yield
    except Exception as e:
        if not (jax.distributed.is_initialized() and is_peer_loss(e)):
            raise
        cause = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
        raise PeerLostError(
            f"process {jax.process_index()} of {jax.process_count()}: another process of this run died or "
            f"stopped responding ({cause[:400]})"
        ) from e


def make_mesh(num_devices: int = 0, model_parallel: int = 1) -> Mesh:
    """Mesh over the first `num_devices` devices (0 = all devices of all processes): 1-D ("data",), or
    2-D ("data", "model") with `model_parallel` devices along "model" when model_parallel > 1."""
    devices = jax.devices()
    if num_devices < 0 or num_devices > len(devices):
        raise ValueError(f"train.num_devices={num_devices} must be in [0, {len(devices)}] (0 = all devices)")
    if num_devices and num_devices != len(devices) and jax.process_count() > 1:
        raise ValueError("train.num_devices must be 0 (all devices) in a multi-process run")
    chosen = np.asarray(devices[: num_devices or len(devices)])
    if model_parallel == 1:
        return Mesh(chosen, (AXIS,))
    if model_parallel < 1 or chosen.size % model_parallel:
        raise ValueError(
            f"train.model_parallel={model_parallel} must be >= 1 and divide the {chosen.size} devices"
        )
    return Mesh(chosen.reshape(-1, model_parallel), (AXIS, MODEL_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over the mesh, every other axis whole."""
    return NamedSharding(mesh, P(AXIS))


def check_batch_size(batch_size: int, mesh: Mesh, field: str = "data.batch_size") -> None:
    n = mesh.shape[AXIS]  # the batch is split over "data" (and replicated over "model", if any)
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


# ---------------------------------------------------------------------------------------- sharded parameters


def logical_rules(rules: str | Rules) -> Rules:
    """A rule set by name (`RULES`) or an explicit ((logical name, mesh axis | None), ...) tuple."""
    if isinstance(rules, str):
        if rules not in RULES:
            raise ValueError(
                f"unknown sharding rules {rules!r} (train.param_sharding); choose one of {', '.join(RULES)}"
            )
        return RULES[rules]
    return tuple((str(a), b) for a, b in rules)


def _is_spec(x: Any) -> bool:
    return isinstance(x, P)


def partition_specs(tree: Any, rules: str | Rules) -> Any:
    """Mesh PartitionSpecs of every variable of an nnx Module or State under a rule set.

    The variables' logical names go through Flax's logical-axis rules (`nnx.logical_axis_rules`,
    `nnx.get_partition_spec`); a variable without names is replicated (P()). A logical name the rules do
    not mention would pass through as a mesh-axis name, so it is refused.

    Args:
      tree: an nnx.Module, or an nnx.State of its variables (e.g. `nnx.state(model, nnx.Param)`).
      rules: a rule-set name of `RULES` or explicit rules.
    Returns:
      an nnx.State of the same structure whose values are PartitionSpecs (`nnx.to_pure_dict` gives the
      plain nested dict the trainer's params use).
    """
    from flax import nnx

    rules = logical_rules(rules)
    state = nnx.state(tree) if isinstance(tree, nnx.Module) else tree
    known = {name for name, _ in rules}
    for path, var in nnx.to_flat_state(state):
        unknown = [
            n for n in (var.get_metadata().get("out_sharding") or ()) if n is not None and n not in known
        ]
        if unknown:
            raise ValueError(
                f"variable {'/'.join(map(str, path))} has logical axis names {unknown} that the sharding "
                f"rules do not map; add them to the rules (known: {sorted(known)})"
            )
    with nnx.logical_axis_rules(rules):
        return nnx.get_partition_spec(state)


def check_specs(state: Any, specs: Any, mesh_shape: Mapping[str, int]) -> None:
    """Raise ValueError unless every spec fits its variable and the mesh: one entry per dimension (or
    fewer), only mesh axes that exist, each mesh axis at most once per spec, and every sharded dimension
    divisible by the product of its mesh axes' sizes. Also refuses parameters without logical names.

    Args:
      state: nnx.State of the variables (values: arrays or ShapeDtypeStructs).
      specs: `partition_specs(state, rules)`.
      mesh_shape: {axis name: size}, e.g. `mesh.shape` (an AbstractMesh works: no devices needed).
    """
    from flax import nnx

    spec_of = {tuple(p): v.get_value() for p, v in nnx.to_flat_state(specs)}
    problems = []
    for path, var in nnx.to_flat_state(state):
        name, shape = "/".join(map(str, path)), tuple(var.get_value().shape)
        names = var.get_metadata().get("out_sharding")
        spec = spec_of[tuple(path)]
        if isinstance(var, nnx.Param) and (not names or len(names) != len(shape)):
            problems.append(f"{name}: logical names {names} do not name its {len(shape)} dimensions")
            continue
        if len(spec) > len(shape):
            problems.append(f"{name}: spec {spec} has more entries than its shape {shape}")
            continue
        used: list[str] = []
        for dim, entry in zip(shape, spec, strict=False):
            axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
            for a in axes:
                if a not in mesh_shape:
                    problems.append(f"{name}: spec {spec} names mesh axis {a!r}, not in {dict(mesh_shape)}")
            used += axes
            size = int(np.prod([mesh_shape.get(a, 1) for a in axes]))
            if dim % size:
                problems.append(
                    f"{name}: dimension {dim} of shape {shape} does not split over {axes} ({size})"
                )
        if len(set(used)) != len(used):
            problems.append(f"{name}: spec {spec} uses a mesh axis twice")
    if problems:
        raise ValueError("invalid parameter sharding:\n  " + "\n  ".join(problems))


def named_shardings(tree: Any, mesh: Mesh, rules: str | Rules) -> Any:
    """NamedShardings (an nnx.State, like `partition_specs`) of a model's variables on `mesh`, checked
    with `check_specs`."""
    from flax import nnx

    state = nnx.state(tree) if isinstance(tree, nnx.Module) else tree
    specs = partition_specs(state, rules)
    check_specs(state, specs, mesh.shape)
    return jax.tree.map(lambda p: NamedSharding(mesh, p), specs, is_leaf=_is_spec)


def shard_model(model: Any, mesh: Mesh, rules: str | Rules) -> Any:
    """Place every variable of an nnx model on `mesh` as the rules say (in place); returns the model."""
    from flax import nnx

    state = nnx.state(model)
    nnx.update(model, jax.device_put(state, named_shardings(state, mesh, rules)))
    return model


def state_shardings(
    mesh: Mesh, rules: str | Rules, params: Any, state: Mapping[str, Any], tx: Any = None
) -> dict:
    """Shardings of the trainer's state dict {"params", "opt_state", ...} (jaxsmooth.train).

    params (the typed nnx.State of the model's nnx.Param variables, abstract or not) decides the
    parameters' shardings; the optimiser's per-parameter leaves (Adam's moments) follow their
    parameter (`optax.tree_map_params`, needs `tx`); everything else (step counts, rng) is replicated.

    Args:
      mesh: the device mesh.
      rules: a rule-set name or rules.
      params: nnx.State of the parameters.
      state: the trainer's state, or its `jax.eval_shape` (only its structure is used).
      tx: the optax transformation that built state["opt_state"] (None: no "opt_state" entry).
    Returns:
      a dict of the same structure as `state` whose leaves are NamedShardings.
    """
    from flax import nnx

    rep = replicated(mesh)
    param_sh = nnx.to_pure_dict(named_shardings(params, mesh, rules))
    out = {k: jax.tree.map(lambda _: rep, v) for k, v in state.items() if k not in ("params", "opt_state")}
    out["params"] = param_sh
    if "opt_state" in state:
        import optax

        if tx is None:
            raise ValueError("state_shardings needs tx= to place the optimiser state")
        out["opt_state"] = optax.tree_map_params(
            tx, lambda _, sh: sh, state["opt_state"], param_sh, transform_non_params=lambda _: rep,
            is_leaf=lambda x: isinstance(x, NamedSharding),
        )  # fmt: skip
    return out


def is_sharded(array: jax.Array) -> bool:
    """Whether an array is split across devices (some device holds less than the whole array)."""
    return not array.sharding.is_fully_replicated


def specs_summary(specs: Any) -> dict[str, Sequence]:
    """{variable path: PartitionSpec} of an nnx.State of specs, for reports and tests."""
    from flax import nnx

    return {"/".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(specs)}
