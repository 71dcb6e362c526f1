"""Data parallelism: 4 (forced host) devices log the same losses as 1 device (this process), a batch that
does not split over the devices is refused with a clear message, and 2 processes on localhost
(jax.distributed over gloo) train like one process. Device counts are fixed at JAX start-up, hence the
subprocesses. `two_processes` and friends also serve tests/test_multiprocess.py (a process that dies)."""

import contextlib
import json
import os
import resource
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import XLA_CACHE_ENV

from jaxsmooth import train
from jaxsmooth.tools import cli
from jaxsmooth.train import checkpoint

# The tiny run of test_train.py and its persistent XLA cache (same programs, so compiled code is shared).
CACHE_ENV = XLA_CACHE_ENV
TINY = {
    "model.depth": 1, "model.d_model": 16, "model.num_heads": 2, "data.batch_size": 16,
    "data.eval_batch_size": 360, "train.log_every": 1, "train.stats_every": 3, "train.eval_every": 4,
    "train.checkpoint_every": 2, "train.max_to_keep": 3, "opt.schedule": "constant", "opt.warmup_steps": 2,
}  # fmt: skip

STEPS = 4
TINY_ARGS = [f"--config.{k}={v}" for k, v in {**TINY, "train.steps": STEPS}.items()]

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import jax
    from jaxsmooth import train
    from jaxsmooth.tools import cli
    overrides = sys.argv[2:]
    out = {"devices": jax.device_count()}
    config, _, _ = cli.parse_train_args(["--config", "digits:quick", *overrides])
    summary = train.train(config, f"{sys.argv[1]}/dev4", verbose=False)
    records = train.read_metrics(f"{sys.argv[1]}/dev4/metrics.jsonl")
    out["summary"] = summary
    out["train"] = [r for r in records if r["type"] == "train"]
    config.train.num_devices = 3
    try:
        train.train(config, f"{sys.argv[1]}/dev3", verbose=False)
        out["error3"] = None
    except ValueError as e:
        out["error3"] = str(e)
    print("RESULT" + json.dumps(out))
    """
)


pytestmark = pytest.mark.usefixtures("xla_cache")  # conftest: the persistent compilation cache


@pytest.fixture(scope="module")
def one_device(tmp_path_factory):
    """The tiny run on one device, in this process (its programs are test_train.py's: cached)."""
    config, _, _ = cli.parse_train_args(
        ["--config", "digits:quick", *TINY_ARGS, "--config.train.num_devices=1"]
    )
    workdir = tmp_path_factory.mktemp("one")
    summary = train.train(config, workdir, verbose=False)
    records = train.read_metrics(workdir / "metrics.jsonl")
    return {"summary": summary, "train": [r for r in records if r["type"] == "train"]}


def _env(**extra):
    # Nothing inherited may make a subprocess join (or try to form) a multi-process run: not jax's own
    # variables, and none that jax's cluster detection reads (the suite may itself run under srun, mpirun
    # or in a Kubernetes pod).
    drop = ("XLA_FLAGS", "JAXSMOOTH_DISTRIBUTED", "JAXSMOOTH_HEARTBEAT_TIMEOUT_S", "KUBERNETES_SERVICE_HOST")
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "SLURM_", "OMPI_")) and k not in drop
    }
    return {**env, **CACHE_ENV, **extra}


@pytest.fixture(scope="module")
def four_devices(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("dp")
    env = _env(XLA_FLAGS="--xla_force_host_platform_device_count=4")
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(workdir), *TINY_ARGS], env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT"))
    return json.loads(line[len("RESULT") :])


def _losses(records):
    return np.asarray([[r["loss"], r["grad_norm"]] for r in records])


def test_four_devices_log_the_same_losses_as_one(four_devices, one_device):
    assert four_devices["devices"] == 4
    assert four_devices["summary"]["devices"]["count"] == 4 and one_device["summary"]["devices"]["count"] == 1
    steps = list(range(1, STEPS + 1))
    assert [r["step"] for r in four_devices["train"]] == [r["step"] for r in one_device["train"]] == steps
    np.testing.assert_allclose(
        _losses(four_devices["train"]), _losses(one_device["train"]), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(
        four_devices["summary"]["test_loss"], one_device["summary"]["test_loss"], rtol=1e-5
    )


def test_batch_not_divisible_by_devices_is_refused(four_devices):
    msg = four_devices["error3"]
    assert msg and "data.batch_size=16 must be divisible by the number of devices (3)" in msg


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


# One CPU device per process. LLVM at -O0: the second process never hits the persistent compilation
# cache (its programs' cache keys differ from process 0's, and jax writes entries from process 0 only),
# and its compile is most of this test's time; -O0 makes it about 2.5x faster (2 train steps: 23 + 16 s
# -> 8 + 8 s on 2 busy cores). The losses differ from the one-process run's (-O3) in the last bits only,
# well inside the tolerance.
MULTI_XLA_FLAGS = "--xla_force_host_platform_device_count=1 --xla_backend_optimization_level=0"
TRAIN_CMD = [sys.executable, "-m", "jaxsmooth", "train", "--config", "digits:quick"]


def coordinator_envs(n: int = 2, **extra) -> list[dict]:
    """The environments of `n` processes joined through JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
    JAX_PROCESS_ID on a free localhost port."""
    address = f"localhost:{_free_port()}"
    return [
        _env(JAX_COORDINATOR_ADDRESS=address, JAX_NUM_PROCESSES=str(n), JAX_PROCESS_ID=str(i),
             XLA_FLAGS=MULTI_XLA_FLAGS, **extra)
        for i in range(n)
    ]  # fmt: skip


@contextlib.contextmanager
def two_processes(tmp_path: Path, args: list[str], envs: list[dict]):
    """Start `jaxsmooth train <args>` once per environment, each one's stdout / stderr in a file of
    tmp_path (no pipe to fill); yields the Popen objects. Whatever still runs at the end (an assertion
    failed, a limit passed) is killed, so no test leaves a process behind."""
    procs = []
    core = resource.getrlimit(resource.RLIMIT_CORE)
    try:
        # No core files: jax ends a process whose coordinator died with abort() (SIGABRT), and a JAX
        # process's core is hundreds of MB in the current directory on hosts that keep them. Set here and
        # inherited, not in a preexec_fn, which would make subprocess fork this multithreaded process.
        resource.setrlimit(resource.RLIMIT_CORE, (0, core[1]))
        for i, env in enumerate(envs):
            with open(tmp_path / f"p{i}.out", "w") as out, open(tmp_path / f"p{i}.err", "w") as err:
                procs.append(subprocess.Popen([*TRAIN_CMD, *args], stdout=out, stderr=err, env=env))
        resource.setrlimit(resource.RLIMIT_CORE, core)
        yield procs
    finally:
        resource.setrlimit(resource.RLIMIT_CORE, core)
        for p in procs:
            if p.poll() is None:
                p.kill()
        for p in procs:
            p.wait(timeout=60)


def output(tmp_path: Path, i: int, stream: str = "err") -> str:
    return (tmp_path / f"p{i}.{stream}").read_text(errors="replace")


def outputs(tmp_path: Path, n: int = 2) -> str:
    """Every process's stdout and stderr, tails only (for assertion messages)."""
    return "".join(
        f"\n--- process {i} {s}:\n{output(tmp_path, i, s)[-3000:]}" for i in range(n) for s in ("out", "err")
    )


def wait_all(procs, tmp_path: Path, limit_s: float) -> list[int]:
    """Return codes once every process ended. Fails (the caller's `two_processes` then kills the rest)
    when one fails while another still runs, which would otherwise wait for it, or after limit_s."""
    deadline = time.monotonic() + limit_s
    while any(p.poll() is None for p in procs):
        if any(p.poll() not in (None, 0) for p in procs):
            pytest.fail(f"a process failed: {[p.poll() for p in procs]}{outputs(tmp_path)}")
        if time.monotonic() > deadline:
            pytest.fail(f"still running after {limit_s} s: {[p.poll() for p in procs]}{outputs(tmp_path)}")
        time.sleep(0.2)
    return [p.returncode for p in procs]


def test_two_processes_on_localhost_match_one_process(one_device, tmp_path):
    """jax.distributed.initialize from JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID: each
    process feeds its half of every batch; only process 0 writes the logs; Orbax saves cooperatively."""
    workdir = tmp_path / "two"
    with two_processes(tmp_path, ["--workdir", str(workdir), *TINY_ARGS], coordinator_envs()) as procs:
        codes = wait_all(procs, tmp_path, limit_s=300)
    assert codes == [0, 0], outputs(tmp_path)
    summary = json.loads((workdir / "summary.json").read_text())
    assert {k: summary["devices"][k] for k in ("count", "platform", "processes")} == {
        "count": 2,
        "platform": "cpu",
        "processes": 2,
    }
    records = [json.loads(ln) for ln in (workdir / "metrics.jsonl").read_text().splitlines()]
    train_recs = [r for r in records if r["type"] == "train"]
    assert [r["step"] for r in train_recs] == list(range(1, STEPS + 1))  # written once, by process 0
    np.testing.assert_allclose(_losses(train_recs), _losses(one_device["train"]), rtol=1e-5, atol=1e-6)
    assert "done: digits_quick" in output(tmp_path, 0, "out")  # the summary: process 0 only
    assert "done:" not in output(tmp_path, 1, "out") and "step 1/" not in output(tmp_path, 1, "out")
    assert [f"jaxsmooth: process {i} of 2." in output(tmp_path, i) for i in range(2)] == [True, True]
    assert sorted(os.listdir(workdir / "checkpoints"))[:2] == ["2", "4"]
    assert checkpoint.verify(workdir / "checkpoints" / "4") is None
    assert checkpoint.has_checksum(workdir / "checkpoints" / "4")
