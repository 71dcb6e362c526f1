"""A run never hangs silently: with a train step that never returns (a host callback that sleeps inside
the XLA execution, as a deadlocked kernel or a dead peer's collective would), the watchdog reports the
stuck step with every thread's stack and exits, and a second SIGINT exits at once; neither corrupts the
checkpoint saved before. The watchdog's limits are checked alone, without a run."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from conftest import XLA_CACHE_ENV

from jaxsmooth.train import checkpoint, watchdog

HANG_SCRIPT = textwrap.dedent(
    """
    import sys, time
    import jax, jax.numpy as jnp, numpy as np
    from jaxsmooth.tools import cli
    from jaxsmooth.train import trainer

    workdir, hang_at, *overrides = sys.argv[1:]

    def hang(step):  # runs inside the compiled step, on an XLA thread
        if int(step) + 1 >= int(hang_at):
            print("HANGING", flush=True)
            time.sleep(3600)
        return np.zeros((), np.float32)

    make = trainer.make_train_step  # the name the trainer compiles

    def make_hanging(*args, **kwargs):
        step_fn = make(*args, **kwargs)

        def step(state, x, y):
            new, metrics = step_fn(state, x, y)
            z = jax.pure_callback(hang, jax.ShapeDtypeStruct((), jnp.float32), state["step"])
            return new, dict(metrics, loss=metrics["loss"] + z)  # used, so never removed

        return step

    trainer.make_train_step = make_hanging
    config, _, _ = cli.parse_train_args(["--config", "digits:quick", *overrides])
    trainer.train(config, workdir)
    """
)
TINY = {
    "model.depth": 1, "model.d_model": 16, "model.num_heads": 2, "data.batch_size": 16,
    "data.eval_batch_size": 360, "train.log_every": 1, "train.stats_every": 100, "train.eval_every": 100,
    "train.checkpoint_every": 2, "train.steps": 8, "train.tensorboard": False,
}  # fmt: skip


def _start(workdir, hang_at: int, **extra):
    args = [f"--config.{k}={v}" for k, v in {**TINY, **extra}.items()]
    env = {**os.environ, **XLA_CACHE_ENV, "JAXSMOOTH_ALLOCATOR": "system"}
    return subprocess.Popen(
        [sys.executable, "-c", HANG_SCRIPT, str(workdir), str(hang_at), *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip


def _wait_for_hang(proc, limit_s=300):
    """Read stdout until the step hangs (the process compiles first)."""
    deadline = time.monotonic() + limit_s
    for line in proc.stdout:
        if "HANGING" in line:
            return
        if time.monotonic() > deadline:
            break
    proc.kill()
    pytest.fail(f"the run never reached the hanging step: {proc.stderr.read()[-3000:]}")


def _finish(proc, limit_s):
    try:
        out, err = proc.communicate(timeout=limit_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"still running {limit_s} s later")
    return proc.returncode, err


def test_watchdog_reports_a_stuck_step_and_exits(tmp_path):
    proc = _start(tmp_path, hang_at=5, **{"train.step_timeout_s": 3})
    _wait_for_hang(proc)
    t0 = time.monotonic()
    rc, err = _finish(proc, 60)
    assert rc == watchdog.STUCK_EXIT, err[-3000:]
    assert time.monotonic() - t0 < 30
    assert "stuck: step 5 has not finished in 3 s" in err, err[-3000:]
    assert "Thread 0x" in err and "most recent call first" in err  # faulthandler's stacks
    assert "The last checkpoint, step 4, matches its checksums" in err
    events = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e.get("event") == "stuck"] == [5]
    assert checkpoint.verify(tmp_path / "checkpoints" / "4") is None  # untouched, restorable


def test_second_sigint_exits_at_once_while_a_step_never_returns(tmp_path):
    proc = _start(tmp_path, hang_at=5, **{"train.step_timeout_s": 0})  # no watchdog: only signals
    _wait_for_hang(proc)
    proc.send_signal(signal.SIGINT)
    time.sleep(2)
    assert proc.poll() is None  # the first one waits for the step (which never ends)
    proc.send_signal(signal.SIGINT)
    t0 = time.monotonic()
    rc, err = _finish(proc, 30)
    assert rc == 128 + signal.SIGINT, err[-3000:]
    assert time.monotonic() - t0 < 10
    assert "SIGINT: stopping after the current step" in err
    assert "second SIGINT: exiting now. The last checkpoint, step 4, matches its checksums" in err
    assert checkpoint.verify(tmp_path / "checkpoints" / "4") is None


def test_limits_scale_with_the_measured_step_time():
    clock = iter([0.0, 0.0, 10.0, 20.0, 30.0, 100.0, 5000.0])
    w = watchdog.Watchdog(watchdog.AUTO, clock=lambda: next(clock))
    assert w.limit("step") == 600.0 and w.limit("evaluation") == 1800.0  # nothing measured yet
    for what in ("step 1", "step 2", "step 3", "step 4"):
        w.beat(what)
    assert w.limit("step") == 1000.0  # 100x the median step (10 s)
    w.beat("eval", "evaluation")
    w.beat("step 5")  # the evaluation took 4900 s
    assert w.limit("evaluation") == 49000.0
    fixed = watchdog.Watchdog(7)
    assert fixed.limit("step") == 7 and fixed.limit("checkpoint") == 70
    assert not watchdog.Watchdog(0).enabled


@pytest.mark.parametrize("bad", [-2, float("nan"), "600", True])
def test_bad_timeout_is_named(bad):
    with pytest.raises(ValueError, match="train.step_timeout_s"):
        watchdog.Watchdog(bad)
