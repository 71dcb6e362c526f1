"""Multi-device CPU runs finish: no program the trainer compiles, for any packaged config and spectrum mode,
calls a jaxlib LAPACK kernel that waits on XLA's thread pool (the cause of the 4-device deadlock,
jaxsmooth/linalg.py), and the default config trains on 4 simulated devices several times in a row, each
run within a time limit."""

import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import pytest
from conftest import XLA_CACHE_ENV
from flax import nnx

from jaxsmooth import linalg, metrics, train
from jaxsmooth.config import ModelConfig
from jaxsmooth.nnx import CausalLM, ViT
from jaxsmooth.tools import cli
from jaxsmooth.train import optim
from jaxsmooth.train.state import new_state


def _programs(name: str, mode: str, basis: str | None):
    """Lowered (not compiled) CPU programs of the trainer for a packaged config: init, the train step with
    and without statistics, the profile forward pass (full statistics: SVDs) and evaluation."""
    config = cli.load_config_file(f"{cli.configs_dir() / name}.py:quick,mode={mode}")
    model = config.model.to_dict()
    if basis:
        model["spectrum"]["basis"] = basis
    mcfg = ModelConfig.from_dict({**model, "depth": 2})
    if train.is_text(config):
        make = lambda: CausalLM(mcfg, 11, 8, rngs=nnx.Rngs(0))
        x, y = jnp.zeros((4, 8), jnp.int32), jnp.zeros((4, 8), jnp.int32)
    else:
        make = lambda: ViT(mcfg, 10, (8, 8, 1), 2, rngs=nnx.Rngs(0))
        x, y = jnp.zeros((4, 8, 8, 1), jnp.float32), jnp.zeros((4,), jnp.int32)
    graphdef, abs_params = nnx.split(nnx.eval_shape(make), nnx.Param)
    tx = optim.make_optimizer(config.opt, abs_params)

    def init():
        return new_state(nnx.to_pure_dict(nnx.split(make(), nnx.Param)[1]), tx, seed=config.train.seed)

    state = jax.eval_shape(init)
    kw = dict(dropout=True, spectral=mcfg.spectrum is not None, num_classes=10)
    texts = [jax.jit(init).lower().as_text()]
    for stats in (False, True):
        step = train.make_train_step(graphdef, tx, optim.make_schedule(config.opt), with_stats=stats, **kw)
        texts.append(jax.jit(step).lower(state, x, y).as_text())
    profile = lambda p: nnx.merge(graphdef, p).forward(x, stats="full", deterministic=True)
    texts.append(jax.jit(profile).lower(state["params"]).as_text())
    texts.append(jax.jit(train.make_eval_step(graphdef)).lower(state["params"], x, y, 4).as_text())
    full_stats = jax.jit(metrics.layer_stats, static_argnames="full")
    texts.append(full_stats.lower(jnp.zeros((4, 8, 16), jnp.float32), full=True).as_text())
    return texts


# Which kernels a program calls depends on spectral vs unconstrained and the basis, not on the sign (every
# mode composes H the same way, tests/test_spectral.py): every config in its own mode, the default config
# unconstrained and with the general basis.
CASES = [(n, "sharpen", None) for n in cli.config_names()] + [
    ("digits", "none", None),
    ("digits", "sharpen", "general"),
]


@pytest.mark.parametrize("name, mode, basis", CASES)
def test_no_program_calls_a_pool_blocking_lapack_kernel(name, mode, basis, monkeypatch):
    """jaxlib 0.10's `lapack_*_ffi` CPU kernels block a pool thread on tasks queued on the same pool; with
    one per device running at once, nothing is left to run them. The trainer's programs must route their
    QR / triangular solves / SVDs through jaxsmooth.linalg instead, which takes the host path with several
    CPU devices (forced here: this test process has one)."""
    monkeypatch.setenv(linalg.ENV, "host")
    for text in _programs(name, mode, basis):
        assert "lapack_" not in text, f"{name} mode={mode}: a jaxlib LAPACK kernel is called"


def test_the_check_can_fail():
    """The property above is not vacuous: jnp.linalg's QR does lower to such a kernel on CPU."""
    assert "lapack_sgeqrf" in jax.jit(jnp.linalg.qr).lower(jnp.eye(4)).as_text()


# One run of 40 steps: before the fix every run hung within its first steps (3 of 3), each step being a
# fresh chance for the four devices to meet in the QR; a second run only recompiled (host-callback
# programs are never read from the persistent cache), costing a minute of CI for no new chance.
RUNS = 1
RUN_LIMIT_S = 300  # compiling takes about a minute on 2 busy cores


def test_default_config_on_four_devices_finishes_every_time(tmp_path):
    """The README's main job on 4 simulated CPU devices (the command that hung in 3 of 3 runs), in its own
    process and within a time limit: a hang fails the test, not the suite."""
    env = {**os.environ, **XLA_CACHE_ENV, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    cmd = [sys.executable, "-m", "jaxsmooth", "train", "--config.train.steps=40"]
    for i in range(RUNS):
        t0 = time.perf_counter()
        try:
            args = [*cmd, "--workdir", str(tmp_path / f"run{i}")]
            proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=RUN_LIMIT_S)
        except subprocess.TimeoutExpired as e:
            pytest.fail(
                f"run {i + 1} of {RUNS} did not finish in {RUN_LIMIT_S} s:\n{(e.stderr or '')[-2000:]}"
            )
        assert proc.returncode == 0, f"run {i + 1}: {proc.stderr[-3000:]}"
        assert "over 4 cpu device(s)" in proc.stdout, proc.stdout
        assert "test accuracy" in proc.stdout
        print(f"run {i + 1}: {time.perf_counter() - t0:.1f} s")
