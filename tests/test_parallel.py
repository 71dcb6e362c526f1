"""Data parallelism: 4 (forced host) devices log the same losses as 1 device (this process), a batch that
does not split over the devices is refused with a clear message, and 2 processes on localhost
(jax.distributed over gloo) train like one process (opt-in: JAXSMOOTH_TEST_MULTIPROCESS=1). Device
counts are fixed at JAX start-up, hence the subprocesses."""

import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from conftest import XLA_CACHE_ENV

from jaxsmooth import cli, train

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
    from jaxsmooth import cli, train
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
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_") and k != "XLA_FLAGS"}
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


@pytest.mark.skipif(
    not os.environ.get("JAXSMOOTH_TEST_MULTIPROCESS"),
    reason="two jax.distributed processes compile for ~50 s on 2 cores (over the test-time budget); "
    "run with JAXSMOOTH_TEST_MULTIPROCESS=1",
)
def test_two_processes_on_localhost_match_one_process(one_device, tmp_path):
    """jax.distributed.initialize from JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID: each
    process feeds its half of every batch; only process 0 writes the logs; Orbax saves cooperatively."""
    workdir = tmp_path / "two"
    port = _free_port()
    cmd = [sys.executable, "-m", "jaxsmooth", "train", "--config", "digits:quick", "--workdir", str(workdir)]
    one_device_each = "--xla_force_host_platform_device_count=1"
    envs = [
        _env(JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i),
             XLA_FLAGS=one_device_each)
        for i in range(2)
    ]  # fmt: skip
    procs = [
        subprocess.Popen(
            [*cmd, *TINY_ARGS], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=e
        )
        for e in envs
    ]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
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
    assert sorted(os.listdir(workdir / "checkpoints"))[:2] == ["2", "4"]
