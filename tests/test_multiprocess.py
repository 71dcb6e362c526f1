"""Multi-process runs that lose a process: the survivors exit with a message naming the problem instead of
waiting forever. Also: when jaxsmooth joins a jax.distributed run (`parallel.distributed_args`, pure, no
cluster needed), and which errors read as a lost peer.

What jax 0.10.2 does on its own when a process dies (seen in these tests' runs): a collective waiting on
the dead process fails at once with a Python error (gloo: "Connection reset by peer" / "closed by peer");
if the coordinator (process 0) died, every other process is aborted within a second by its
coordination-service client (a C++ LOG(FATAL): "... This most likely indicates that another task died",
SIGABRT), unless a failing collective raised first; a process that vanishes without closing its sockets
is declared dead after the heartbeat timeout, and then every process is aborted the same way. Left alone,
a survivor that got the Python error waited in jax's exit-time shutdown barrier for the dead process
until the heartbeat timeout (about 100 s with jax's default), then aborted there; jaxsmooth's CLI now
reports the lost peer and exits at once (jaxsmooth/cli.py `_exit_after_peer_loss`).
"""

import re
import signal
import subprocess
import sys
import time

import jax
import pytest
from test_parallel import (
    MULTI_XLA_FLAGS,
    TINY,
    _env,
    _free_port,
    coordinator_envs,
    output,
    outputs,
    two_processes,
)

from jaxsmooth.train import checkpoint, parallel

# Long enough never to finish; checkpoints every 2 steps, nothing else periodic (no statistics or
# evaluation programs run, though all are compiled before the first step).
ENDLESS = {**TINY, "train.steps": 100_000, "train.stats_every": 100_000, "train.eval_every": 100_000,
           "train.checkpoint_every": 2, "train.tensorboard": False}  # fmt: skip
ENDLESS_ARGS = [f"--config.{k}={v}" for k, v in ENDLESS.items()]
# The survivor of a peer that dies with its host up is told by the failed collective, well inside this.
HEARTBEAT_S = 20


def _wait_for(tmp_path, i: int, stream: str, text: str, procs, limit_s: float) -> None:
    deadline = time.monotonic() + limit_s
    while text not in output(tmp_path, i, stream):
        if any(p.poll() is not None for p in procs):
            pytest.fail(f"a process ended before {text!r}: {[p.poll() for p in procs]}{outputs(tmp_path)}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {text!r} from process {i} within {limit_s} s{outputs(tmp_path)}")
        time.sleep(0.1)


def _exit_time(proc, tmp_path, limit_s: float) -> float:
    """Seconds until `proc` exits; fails after limit_s (its `two_processes` then kills it)."""
    t0 = time.monotonic()
    while proc.poll() is None:
        if time.monotonic() - t0 > limit_s:
            pytest.fail(f"the survivor still runs {limit_s} s after its peer died{outputs(tmp_path)}")
        time.sleep(0.05)
    return time.monotonic() - t0


def slurm_envs(n: int = 2) -> list[dict]:
    """A SLURM job step of n tasks on this host, as `srun` describes it to each task, with
    JAXSMOOTH_DISTRIBUTED=auto: jax's SLURM detection supplies the coordinator, count and id."""
    port = str(_free_port())
    return [
        _env(SLURM_JOB_ID="4242", SLURM_STEP_NODELIST="localhost", SLURM_NTASKS=str(n), SLURM_PROCID=str(i),
             SLURM_LOCALID=str(i), JAX_COORDINATOR_PORT=port, JAXSMOOTH_DISTRIBUTED="auto",
             JAXSMOOTH_HEARTBEAT_TIMEOUT_S=str(HEARTBEAT_S), XLA_FLAGS=MULTI_XLA_FLAGS)
        for i in range(n)
    ]  # fmt: skip


def test_peer_killed_during_training_stops_the_survivor_with_a_message(tmp_path):
    """SIGKILL process 1 after three logged steps (and the checkpoint at step 2): process 0 exits with
    status 1 within seconds, saying a peer process died and how to resume, and its last checkpoint is
    intact. The two processes join through SLURM's variables (JAXSMOOTH_DISTRIBUTED=auto)."""
    workdir = tmp_path / "run"
    with two_processes(tmp_path, ["--workdir", str(workdir), *ENDLESS_ARGS], slurm_envs()) as procs:
        _wait_for(tmp_path, 0, "out", "step 3/", procs, limit_s=300)
        procs[1].send_signal(signal.SIGKILL)
        seconds = _exit_time(procs[0], tmp_path, limit_s=120)
        err = output(tmp_path, 0)
        assert procs[0].returncode == 1, outputs(tmp_path)
    assert seconds < 30, f"{seconds:.1f} s{outputs(tmp_path)}"  # measured: under 1 s
    assert "jaxsmooth: process 0 of 2." in err
    assert "process 0 of 2: another process of this run died or stopped responding" in err, err[-3000:]
    assert "start all 2 processes again with the same command to resume" in err
    m = re.search(r"The last checkpoint, step (\d+), matches its checksums", err)
    assert m, err[-3000:]
    step_dir = workdir / "checkpoints" / m.group(1)
    assert int(m.group(1)) >= 2 and checkpoint.verify(step_dir) is None


def test_coordinator_killed_stops_the_other_process(tmp_path):
    """SIGKILL process 0, which hosts jax's coordination service, once process 1 has joined: process 1
    stops within seconds. Two ways, a race: jax's client sees the service gone and aborts the process (a
    C++ LOG(FATAL), SIGABRT; jaxsmooth's start-up line says what to do), or process 1's first collective
    fails first (gloo's context set-up) and jaxsmooth reports the lost peer (status 1)."""
    args = ["--workdir", str(tmp_path / "run"), *ENDLESS_ARGS]
    with two_processes(tmp_path, args, coordinator_envs()) as procs:
        _wait_for(tmp_path, 1, "err", "jaxsmooth: process 1 of 2.", procs, limit_s=120)
        procs[0].send_signal(signal.SIGKILL)
        seconds = _exit_time(procs[1], tmp_path, limit_s=120)
        err = output(tmp_path, 1)
    assert seconds < 30, f"{seconds:.1f} s{outputs(tmp_path)}"  # measured: under 1 s
    if procs[1].returncode == 1:
        assert "process 1 of 2: another process of this run died or stopped responding" in err, err[-3000:]
        assert "start all 2 processes again with the same command to start over" in err
    else:
        assert procs[1].returncode == -signal.SIGABRT, outputs(tmp_path)
        assert "another task died" in err, err[-3000:]
        assert "start all 2 again with the same command to resume from the last checkpoint" in err


# ---------------------------------------------------------------------------------------- no cluster needed


def test_single_process_without_a_coordinator():
    assert parallel.distributed_args(env={}) is None
    assert parallel.distributed_args(env={"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"}) is None
    # SLURM's variables alone do not start a coordination service (a plain `srun` of one process).
    assert (
        parallel.distributed_args(env={"SLURM_JOB_ID": "1", "SLURM_NTASKS": "4", "SLURM_PROCID": "0"}) is None
    )


def test_explicit_coordinator_from_env_and_flags():
    env = {"JAX_COORDINATOR_ADDRESS": "host0:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
    assert parallel.distributed_args(env=env) == {
        "coordinator_address": "host0:1234", "num_processes": 4, "process_id": 3,
        "heartbeat_timeout_seconds": parallel.DEFAULT_HEARTBEAT_TIMEOUT_S,
    }  # fmt: skip
    flags = parallel.distributed_args("h:1", 2, 1, env={"JAXSMOOTH_HEARTBEAT_TIMEOUT_S": "15"})
    assert flags == {"coordinator_address": "h:1", "num_processes": 2, "process_id": 1,
                     "heartbeat_timeout_seconds": 15}  # fmt: skip
    # The flags win over the environment.
    assert parallel.distributed_args(None, None, 0, env=env)["process_id"] == 0


def test_auto_leaves_the_rest_to_jax():
    auto = {"JAXSMOOTH_DISTRIBUTED": "auto"}
    assert parallel.distributed_args(env=auto) == {"heartbeat_timeout_seconds": 60}
    assert parallel.distributed_args(env={**auto, "JAX_COORDINATOR_ADDRESS": "h:9"}) == {
        "coordinator_address": "h:9", "heartbeat_timeout_seconds": 60,
    }  # fmt: skip
    assert parallel.distributed_args(num_processes=8, env={"JAXSMOOTH_DISTRIBUTED": " AUTO "}) == {
        "num_processes": 8, "heartbeat_timeout_seconds": 60,
    }  # fmt: skip


@pytest.mark.parametrize(
    "env, message",
    [
        ({"JAX_COORDINATOR_ADDRESS": "h:1"}, "set JAX_NUM_PROCESSES and JAX_PROCESS_ID"),
        ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"},
         "must be in [0, num_processes=2)"),
        ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "two", "JAX_PROCESS_ID": "0"},
         "JAX_NUM_PROCESSES='two' is not an integer"),
        ({"JAXSMOOTH_DISTRIBUTED": "slurm"}, "the only value is 'auto'"),
        ({"JAXSMOOTH_DISTRIBUTED": "auto", "JAXSMOOTH_HEARTBEAT_TIMEOUT_S": "0"}, "must be at least 1"),
        ({"JAXSMOOTH_DISTRIBUTED": "auto", "JAXSMOOTH_HEARTBEAT_TIMEOUT_S": "1m"}, "is not an integer"),
    ],
)  # fmt: skip
def test_bad_settings_are_named(env, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        parallel.distributed_args(env=env)


def test_auto_without_a_cluster_says_so():
    """JAXSMOOTH_DISTRIBUTED=auto where jax detects no cluster: a ValueError naming what jax looks for
    (a fresh interpreter: jax.distributed.initialize must come before any backend starts)."""
    code = "from jaxsmooth import parallel; parallel.initialize()"
    env = _env(JAXSMOOTH_DISTRIBUTED="auto")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "ValueError: JAXSMOOTH_DISTRIBUTED=auto: jax found no cluster environment to join" in proc.stderr
    assert "it detects SLURM (srun)" in proc.stderr


def test_lost_peer_errors_are_recognised():
    # Seen in this file's runs (a train step's all-reduce; Orbax's sync inside a checkpoint save).
    step = RuntimeError(
        "UNKNOWN: Gloo all-reduce failed: [external/gloo/gloo/transport/tcp/pair.cc:538] Read error "
        "[127.0.0.1]:59821: Connection reset by peer"
    )
    assert parallel.is_peer_loss(step)
    try:
        try:
            raise ValueError("UNKNOWN: Gloo AllGather failed: [pair.cc:547] Connection closed by peer")
        except ValueError as e:
            raise checkpoint.CheckpointError("saving checkpoint step 6 failed") from e
    except checkpoint.CheckpointError as e:
        assert parallel.is_peer_loss(e)  # through __cause__
    assert parallel.is_peer_loss(RuntimeError("UNAVAILABLE: Task 1 heartbeat timeout. This indicates ..."))
    # Process 1's first collective when process 0 died just before it (the coordinator test's other ending).
    setup = "UNKNOWN: Gloo context initialization failed: UNAVAILABLE: recvmsg:Connection reset by peer"
    assert parallel.is_peer_loss(RuntimeError(setup))
    assert not parallel.is_peer_loss(ValueError("data.batch_size=16 must be divisible by 3"))
    assert not parallel.is_peer_loss(FloatingPointError("non-finite loss at step 3"))


def test_peer_loss_as_error_only_in_a_multi_process_run():
    """In this (single) process, even a gloo-worded error passes through unchanged."""
    assert not jax.distributed.is_initialized()
    with pytest.raises(RuntimeError, match="Gloo all-reduce failed") as info:
        with parallel.peer_loss_as_error():
            raise RuntimeError("Gloo all-reduce failed: Connection reset by peer")
    assert type(info.value) is RuntimeError
