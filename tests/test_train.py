"""The trainer end to end on a tiny digits model: one step + checkpoint round trip, exact resume, continuing
a finished run, corrupt-checkpoint fallback, NaN stop, workdir compatibility, and the CLI (with SIGTERM).

Compiling the step takes seconds even for this model, so the module keeps a persistent XLA compilation
cache for its runs (and its subprocesses); every run uses the same programs (constant lr schedule, so
changing train.steps does not change them).
"""

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import XLA_CACHE_ENV

from jaxsmooth import cli, runtime, train
from jaxsmooth import data as data_lib
from jaxsmooth.checkpoint import CheckpointError, Checkpoints, verify

N = 6  # steps of the reference run; checkpoints every 2
CACHE_ENV = XLA_CACHE_ENV  # conftest: the persistent compilation cache, also for the CLI subprocesses
# The tiny run as CLI overrides, so the subprocess test compiles (or finds cached) the same programs.
TINY = {
    "model.depth": 1, "model.d_model": 16, "model.num_heads": 2, "data.batch_size": 16,
    "data.eval_batch_size": 360, "train.log_every": 1, "train.stats_every": 3, "train.eval_every": 4,
    "train.checkpoint_every": 2, "train.max_to_keep": 3, "opt.schedule": "constant", "opt.warmup_steps": 2,
}  # fmt: skip


pytestmark = pytest.mark.usefixtures("xla_cache")  # conftest: the persistent compilation cache


def tiny(steps: int = N, **overrides):
    spec = importlib.util.spec_from_file_location("digits_cfg", cli.configs_dir() / "digits.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config("quick")
    for key, value in {**TINY, "train.steps": steps, **overrides}.items():
        section, field = key.rsplit(".", 1)
        node = c
        for part in section.split("."):
            node = node[part]
        node[field] = value
    return c


def train_records(workdir):
    return [r for r in train.read_metrics(Path(workdir) / "metrics.jsonl") if r["type"] == "train"]


def logged(records, keys=("loss", "lr", "grad_norm", "token_cosine", "hfc_lfc", "eig_min", "eig_max")):
    return {r["step"]: {k: r.get(k) for k in keys} for r in records}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted N-step run: its workdir and its logged records."""
    workdir = tmp_path_factory.mktemp("reference")
    summary = train.train(tiny(), workdir, verbose=False)
    return workdir, summary, train_records(workdir)


def copy_run(reference, tmp_path) -> Path:
    dest = tmp_path / "run"
    shutil.copytree(reference[0], dest)
    return dest


def test_reference_run_outputs(reference):
    workdir, summary, records = reference
    assert [r["step"] for r in records] == list(range(1, N + 1))
    for f in ("metrics.jsonl", "summary.json", "curves.png", "config.json"):
        assert (workdir / f).is_file(), f
    assert json.loads((workdir / "summary.json").read_text())["steps"] == N
    assert 0.0 <= summary["test_accuracy"] <= 1.0 and summary["devices"]["count"] >= 1
    stats = [r for r in records if "token_cosine" in r]
    assert [r["step"] for r in stats] == [3, 6]  # stats_every=3, and always at the last step
    for r in stats:
        assert len(r["token_cosine"]) == len(r["hfc_lfc"]) == len(r["eig_min"]) == 1  # [L], L = 1
        assert -1.0 <= r["eig_min"][0] <= r["eig_max"][0] < 0.0  # mode=sharpen: eigenvalues in [-1, 0)
    assert len(summary["token_cosine"]) == 2  # input + one layer
    evals = [r for r in train.read_metrics(workdir / "metrics.jsonl") if r["type"] == "eval"]
    assert [r["step"] for r in evals] == [4, N]
    assert Checkpoints(workdir, 3).steps() == [2, 4, 6]


def test_one_step_and_checkpoint_round_trip(tmp_path):
    config = tiny()
    run, state = train._setup(config, train.check_config(config), tmp_path, True)
    x, y = train._put(run, *run.batcher.batch(0))
    state, metrics = run.steps[False](state, x, y)
    assert int(state["step"]) == 1 and np.isfinite(float(metrics["loss"]))
    ckpt = Checkpoints(tmp_path, 3)
    ckpt.save(1, state)
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state)
    step, restored = Checkpoints(tmp_path, 3).restore_latest(abstract)
    assert step == 1
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # params, Adam moments, step, rng
    ckpt.close()


def test_exact_resume_is_bit_identical(reference, tmp_path):
    workdir = tmp_path / "run"
    with pytest.raises(train.Interrupted):
        train.train(tiny(), workdir, stop_after=3, verbose=False)
    assert Checkpoints(workdir, 3).steps() == [2, 3]  # periodic + the one at the stop
    assert [r["step"] for r in train_records(workdir)] == [1, 2, 3]
    summary = train.train(tiny(), workdir, verbose=False)  # the same command again
    assert summary["resumed_from"] == 3
    records = train_records(workdir)
    assert [r["step"] for r in records] == list(range(1, N + 1))  # appended, nothing duplicated
    assert logged(records) == logged(reference[2])  # every logged float, bit for bit


def test_continue_finished_run_with_more_steps(reference, tmp_path):
    workdir = copy_run(reference, tmp_path)
    summary = train.train(tiny(steps=N + 3), workdir, verbose=False)
    assert summary["steps"] == N + 3 and summary["resumed_from"] == N
    records = train_records(workdir)
    assert [r["step"] for r in records] == list(range(1, N + 4))
    assert logged(records[:N]) == logged(reference[2])
    with pytest.raises(ValueError, match="train.steps=4 is below the step 9"):
        train.train(tiny(steps=4), workdir, verbose=False)


def test_rerunning_a_finished_run_changes_nothing(reference, tmp_path):
    workdir = copy_run(reference, tmp_path)
    summary = train.train(tiny(), workdir, verbose=False)
    assert summary["steps_this_run"] == 0
    assert (
        train.read_metrics(workdir / "metrics.jsonl")[: len(reference[2])]
        == train.read_metrics(reference[0] / "metrics.jsonl")[: len(reference[2])]
    )
    evals = [r for r in train.read_metrics(workdir / "metrics.jsonl") if r["type"] == "eval"]
    assert [r["step"] for r in evals] == [4, N]  # the final eval is not duplicated


def test_corrupt_checkpoint_falls_back_to_previous(reference, tmp_path, capsys):
    workdir = copy_run(reference, tmp_path)
    step_dir = workdir / "checkpoints" / str(N)
    victim = max((p for p in step_dir.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    raw = victim.read_bytes()
    victim.write_bytes(raw[: len(raw) // 2])  # cut off mid-file
    summary = train.train(tiny(), workdir, verbose=False)
    assert f"checkpoint step {N}" in capsys.readouterr().err  # reported ...
    assert summary["resumed_from"] == N - 2  # ... and the previous checkpoint used
    events = [r for r in train.read_metrics(workdir / "metrics.jsonl") if r["type"] == "event"]
    assert any(e["event"] == "corrupt_checkpoint" for e in events)
    assert logged(train_records(workdir)) == logged(reference[2])  # steps N-1, N re-run identically
    assert Checkpoints(workdir, 3).steps() == [2, 4, 6]
    assert len(list((workdir / "checkpoints_corrupt").iterdir())) == 1


def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(reference, tmp_path, monkeypatch):
    workdir = copy_run(reference, tmp_path)
    before = {s: verify(workdir / "checkpoints" / str(s)) for s in (2, 4, 6)}
    original = data_lib.Batcher.batch

    def poisoned(self, step):  # the batch of step 8 (index 7) carries a NaN pixel
        x, y = original(self, step)
        if step == N + 1:
            x = x.copy()
            x[0, 0, 0, 0] = np.nan
        return x, y

    monkeypatch.setattr(data_lib.Batcher, "batch", poisoned)
    with pytest.raises(train.NonFiniteError, match=f"at step {N + 2}"):
        train.train(tiny(steps=N + 4), workdir, verbose=False)
    assert Checkpoints(workdir, 3).steps() == [2, 4, 6]  # step 8 (a checkpoint step) was not saved
    assert all(verify(workdir / "checkpoints" / str(s)) is None for s in (2, 4, 6)) and not any(
        before.values()
    )
    assert [r["step"] for r in train_records(workdir)] == list(range(1, N + 2))  # step 8 never logged


def test_incompatible_workdir_is_refused(reference, tmp_path):
    workdir = copy_run(reference, tmp_path)
    with pytest.raises(train.IncompatibleWorkdirError, match="model.depth: checkpoint has 1, config has 2"):
        train.train(tiny(**{"model.depth": 2}), workdir, verbose=False)


def test_cli_sigterm_then_resume(tmp_path):
    """`python -m jaxsmooth train` writes the files; SIGTERM saves a checkpoint; rerunning resumes."""
    workdir = tmp_path / "cli"
    overrides = [f"--config.{k}={v}" for k, v in TINY.items()]
    cmd = [sys.executable, "-m", "jaxsmooth", "train", "--config", "digits:quick", "--workdir", str(workdir)]
    env = {**os.environ, **CACHE_ENV}
    proc = subprocess.Popen([*cmd, *overrides, "--config.train.steps=100000"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    metrics = workdir / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(train_records(workdir)) >= 3:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "rerun the same command to resume" in err
    stopped = Checkpoints(workdir, 3).steps()[-1]
    assert stopped == train_records(workdir)[-1]["step"] >= 3  # saved at the step it stopped

    done = subprocess.run([*cmd, *overrides, f"--config.train.steps={stopped + 2}"], env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert f"resumed from step {stopped}" in done.stdout and "test accuracy" in done.stdout
    # From the command line, train re-executes itself under a caching allocator when one is installed.
    found = runtime.find_allocator()
    expect = "system" if found is None else ("jemalloc" if "jemalloc" in found[0] else "tcmalloc")
    assert f"; {expect} allocator" in done.stdout, done.stdout
    assert (found is None) == ("allocator (XLA's per-step buffers" not in done.stderr), done.stderr
    assert f"step {stopped + 2}/{stopped + 2}" in done.stdout  # plain progress lines off a terminal
    for f in ("metrics.jsonl", "summary.json", "curves.png"):
        assert (workdir / f).is_file(), f
    assert [r["step"] for r in train_records(workdir)] == list(range(1, stopped + 3))


def test_load_run_reproduces_the_final_evaluation(reference):
    # The rebuilt model (config.json + read-only restore of the newest checkpoint) scores exactly what the
    # trainer's own evaluation reported at the end of the run.
    workdir, summary, _ = reference
    loaded = train.load_run(workdir)
    assert loaded.step == N and loaded.model_config == train.check_config(tiny())
    ds = loaded.dataset
    logits = loaded.model(jnp.asarray(ds.x_test))
    acc = float(np.mean(np.argmax(np.asarray(logits), -1) == ds.y_test))
    assert acc == pytest.approx(summary["test_accuracy"], abs=1e-9)
    with pytest.raises(CheckpointError, match="no checkpoint for step 5"):
        train.load_run(workdir, step=5)
