"""The trainer end to end on a tiny digits model: one step + checkpoint round trip, exact resume, continuing
a finished run, corrupt-checkpoint fallback, NaN stop, workdir compatibility, and the CLI (with SIGTERM).

Compiling the step takes seconds even for this model, so the module keeps a persistent XLA compilation
cache for its runs (and its subprocesses); every run uses the same programs (constant lr schedule, so
changing train.steps does not change them).
"""

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

from jaxsmooth import configs, train
from jaxsmooth import data as data_lib
from jaxsmooth.tools import cli
from jaxsmooth.train import runtime, settings, trainer
from jaxsmooth.train import workdir as wd
from jaxsmooth.train.checkpoint import CHECKSUM_FILE, META_ITEM, CheckpointError, Checkpoints, verify

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
    c = configs.load("digits:quick", {**TINY, "train.steps": steps, **overrides})
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
    run, state = trainer.setup(settings.resolve(config), tmp_path)
    x, y = run.put(*run.batcher.batch(0))
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
    # TensorBoard (its own reader) sees one continuous run with the same losses, and the layer histograms.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(workdir / "tensorboard"), size_guidance={"scalars": 0, "histograms": 0})
    ea.Reload()
    losses = {e.step: e.value for e in ea.Scalars("train/loss")}
    assert sorted(losses) == list(range(1, N + 1))
    np.testing.assert_allclose([losses[r["step"]] for r in records], [r["loss"] for r in records], rtol=1e-6)
    assert [e.step for e in ea.Histograms("layers/token_cosine")] == [3, 6]
    assert {"test/accuracy", "smoothing/token_cosine_last"} <= set(ea.Tags()["scalars"])
    assert "curves" in ea.Tags()["images"]


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
    # The message's claim about the last checkpoint is checked when it is made.
    with pytest.raises(train.NonFiniteError, match=f"at step {N + 2}.*step {N}, matches its checksums"):
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
    # A second trainer on the same workdir is refused at once, naming the first; the first is unharmed.
    with pytest.raises(wd.WorkdirLockedError, match=f"in use by another trainer \\(pid {proc.pid} on host"):
        train.train(tiny(), workdir, verbose=False)
    assert cli.train_main([*cmd[4:], *overrides]) == 1  # the CLI refuses before importing JAX
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


# ---------------------------------------------------------------------------------------- fault injection


def _steps_on_disk(workdir):
    return sorted(int(p.name) for p in (Path(workdir) / "checkpoints").iterdir() if p.name.isdigit())


def _data_files(step_dir):
    return sorted((p for p in (step_dir / "state").rglob("*") if p.is_file() and "/d/" in str(p)),
                  key=lambda p: -p.stat().st_size)  # fmt: skip


# Run in a subprocess: train the tiny run, SIGKILLed between Orbax's commit of step 4 and its checksum file.
_KILL_BEFORE_CHECKSUM = """
import os, signal, sys
from jaxsmooth import train
from jaxsmooth.train import checkpoint, workdir
from jaxsmooth.tools import cli
config = cli.parse_train_args(sys.argv[2:])[0]
write = workdir.atomic_write_text
def killing(path, text):
    if path.name == checkpoint.CHECKSUM_FILE and path.parent.name == "4":
        os.kill(os.getpid(), signal.SIGKILL)
    write(path, text)
workdir.atomic_write_text = killing
train.train(config, sys.argv[1], verbose=False)
"""


def test_kill_between_commit_and_checksum_then_verified_resume(reference, tmp_path, capsys):
    """SIGKILL after Orbax committed step 4 but before its checksum file: the step is verified by the
    digests saved with it and resumed bit-identically; with a flipped bit in it (no checksum to catch
    it), the rerun falls back to step 2 and still ends bit-identical. The dead trainer's lock is taken
    over with a message."""
    workdir = tmp_path / "killed"
    overrides = [f"--config.{k}={v}" for k, v in TINY.items()]
    cmd = [sys.executable, "-c", _KILL_BEFORE_CHECKSUM, str(workdir), "--config", "digits:quick", *overrides,
           f"--config.train.steps={N}"]  # fmt: skip
    proc = subprocess.Popen(cmd, env={**os.environ, **CACHE_ENV}, stderr=subprocess.PIPE, text=True)
    proc.stderr_text = proc.communicate(timeout=300)[1]
    assert proc.returncode == -signal.SIGKILL, proc.stderr_text
    step4 = workdir / "checkpoints" / "4"
    assert _steps_on_disk(workdir) == [2, 4] and not (step4 / CHECKSUM_FILE).exists()
    flipped = tmp_path / "flipped"
    shutil.copytree(workdir, flipped)

    summary = train.train(tiny(), workdir, verbose=False)
    err = capsys.readouterr().err
    assert f"taking over the lock of {workdir}, left by pid {proc.pid} on host" in err
    assert summary["resumed_from"] == 4 and "corrupt" not in err
    assert logged(train_records(workdir)) == logged(reference[2])

    for victim in _data_files(flipped / "checkpoints" / "4"):  # one bit in each file of arrays
        raw = bytearray(victim.read_bytes())
        raw[len(raw) // 2] ^= 0x01
        victim.write_bytes(bytes(raw))
    summary = train.train(tiny(), flipped, verbose=False)
    assert summary["resumed_from"] == 2 and "checkpoint step 4" in capsys.readouterr().err
    assert logged(train_records(flipped)) == logged(reference[2])
    assert len(list((flipped / "checkpoints_corrupt").iterdir())) == 1


def test_config_mismatch_is_refused_even_without_config_json(reference, tmp_path):
    """The config is stored in every checkpoint: deleting config.json hides nothing. Differences that
    change the model, the data stream or the optimiser are refused with the list; nothing is moved and
    the logs are untouched. Harmless differences resume."""
    workdir = copy_run(reference, tmp_path)
    (workdir / "config.json").unlink()
    metrics = (workdir / "metrics.jsonl").read_bytes()
    refused = {
        "model.depth": 2,  # another shape
        "model.spectrum.mode": "neutral",  # the same shapes: restoring would have "worked"
        "data.seed": 1,
        "data.batch_size": 8,
        "data.train_fraction": 0.5,
        "opt.lr": 1e-4,
    }
    for field, value in refused.items():
        with pytest.raises(
            train.IncompatibleWorkdirError, match=f"(?s)different config.*{field}: checkpoint has"
        ):
            train.train(tiny(**{field: value}), workdir, verbose=False)
    assert _steps_on_disk(workdir) == [2, 4, 6] and not (workdir / "checkpoints_corrupt").exists()
    assert (workdir / "metrics.jsonl").read_bytes() == metrics
    harmless = {"model.spectrum.lo": -1.0, "model.remat": "full", "train.log_every": 2, "train.eval_every": 3}
    summary = train.train(tiny(**harmless), workdir, verbose=False)
    assert summary["resumed_from"] == N and summary["steps_this_run"] == 0
    assert json.loads((workdir / "config.json").read_text())["model"]["remat"] == "full"


def test_all_corrupt_stops_and_restart_keeps_the_old_metrics(reference, tmp_path):
    workdir = copy_run(reference, tmp_path)
    metrics = (workdir / "metrics.jsonl").read_bytes()
    for s in (2, 4, 6):
        victim = _data_files(workdir / "checkpoints" / str(s))[0]
        victim.write_bytes(victim.read_bytes()[:10])
    with pytest.raises(train.NoUsableCheckpointError, match=r"steps \[2, 4, 6\].*--restart"):
        train.train(tiny(), workdir, verbose=False)
    assert len(list((workdir / "checkpoints_corrupt").iterdir())) == 3
    with pytest.raises(train.NoUsableCheckpointError, match="metrics.jsonl records steps up to 6.*--restart"):
        train.train(tiny(), workdir, verbose=False)  # the next run does not start over silently either
    assert (workdir / "metrics.jsonl").read_bytes() == metrics
    summary = train.train(tiny(), workdir, verbose=False, restart=True)
    assert summary["resumed_from"] is None
    assert (workdir / "metrics.1.jsonl").read_bytes() == metrics  # kept, not overwritten
    assert (workdir / "summary.1.json").is_file() and (workdir / "checkpoints.1").is_dir()
    assert logged(train_records(workdir)) == logged(reference[2])


def test_truncated_config_json_and_older_checkpoints(reference, tmp_path):
    """An empty config.json (a crash mid-write, before writes were atomic) does not stop a run whose
    checkpoints carry their config; for checkpoints saved without one, the damaged file is named."""
    workdir = copy_run(reference, tmp_path)
    good = (workdir / "config.json").read_text()
    (workdir / "config.json").write_text("")
    assert train.load_run(workdir).step == N  # the model is rebuilt from the checkpoint's config
    assert train.train(tiny(), workdir, verbose=False)["steps_this_run"] == 0
    assert json.loads((workdir / "config.json").read_text()) == json.loads(good)  # rewritten whole

    for s in (2, 4, 6):  # as an older jaxsmooth saved them: no meta item, checksums of the rest
        step_dir = workdir / "checkpoints" / str(s)
        shutil.rmtree(step_dir / META_ITEM)
        sums = json.loads((step_dir / CHECKSUM_FILE).read_text())
        (step_dir / CHECKSUM_FILE).write_text(
            json.dumps({k: v for k, v in sums.items() if META_ITEM not in k})
        )
    (workdir / "config.json").write_text(good[: len(good) // 2])
    with pytest.raises(wd.MetadataError, match=f"{workdir / 'config.json'} is damaged: not valid JSON"):
        train.train(tiny(), workdir, verbose=False)
    (workdir / "config.json").write_text(good)
    with pytest.raises(train.IncompatibleWorkdirError, match="(?s)predates stored configs.*model.depth"):
        train.train(tiny(**{"model.depth": 2}), workdir, verbose=False)
    (workdir / "config.json").unlink()
    with pytest.raises(
        train.IncompatibleWorkdirError, match="saved without its config.*config.json is missing"
    ):
        train.train(tiny(), workdir, verbose=False)
    assert _steps_on_disk(workdir) == [2, 4, 6]


def test_resume_on_other_host_cpus_says_it_is_not_bit_identical(reference, tmp_path, monkeypatch, capsys):
    workdir = copy_run(reference, tmp_path)
    saved = len(os.sched_getaffinity(0))
    monkeypatch.setattr(trainer.os, "sched_getaffinity", lambda pid: set(range(saved + 1)))
    train.train(tiny(steps=N + 1), workdir, verbose=False)
    err = capsys.readouterr().err
    assert f"{saved} host CPU(s); this run uses" in err and "not be bit-identical" in err
    events = [r["event"] for r in train.read_metrics(workdir / "metrics.jsonl") if r["type"] == "event"]
    assert "resumed_on_other_devices" in events


def test_disk_full_mid_run_then_resume(reference, tmp_path, monkeypatch):
    """A real full disk (tmpfs): too little space is refused before compiling; running out during a save
    stops with one message naming the step and the last good one, and the rerun (after freeing space)
    resumes from it bit-identically."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(disk)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        filler = disk / "filler"
        filler.write_bytes(b"\0" * (6 << 20))
        with pytest.raises(wd.WorkdirError, match="MiB free where .*needs about"):
            train.train(tiny(), disk / "run", verbose=False)  # 6 MiB free < 8 MiB for the logs + checkpoints
        filler.unlink()
        save = Checkpoints.save

        def fill_then_save(self, step, state):
            if step == 4:  # the disk fills up just before this save
                with filler.open("wb") as f:
                    try:
                        while True:
                            f.write(b"\0" * (1 << 16))
                    except OSError:
                        pass
            save(self, step, state)

        monkeypatch.setattr(Checkpoints, "save", fill_then_save)
        with pytest.raises(wd.DiskFullError) as info:
            train.train(tiny(), disk / "run", verbose=False)
        assert "disk full while saving checkpoint step 4" in info.value.strerror
        assert "the last checkpoint, step 2, is untouched" in info.value.strerror
        monkeypatch.setattr(Checkpoints, "save", save)
        filler.unlink()
        summary = train.train(tiny(), disk / "run", verbose=False)
        assert summary["resumed_from"] == 2
        assert logged(train_records(disk / "run")) == logged(reference[2])
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def test_protocol_validation_selection_final_test_profiles(tmp_path, monkeypatch):
    """data.val_size carves a validation split; periodic evaluations use it and train.select=best_val keeps
    the best one's parameters (on disk, across a resume); the test split is evaluated once, at the end,
    clean and corrupted; the summary has train accuracy, per-layer profiles at init and at the end (every
    full statistic, L + 1 points) and the LN-gain sign fractions."""
    monkeypatch.setenv("JAXSMOOTH_CACHE", str(tmp_path / "cache"))
    over = {"data.val_size": 200, "train.select": "best_val", "train.eval_every": 2,
            "train.train_eval_size": 100, "train.profile": True, "data.eval_corruptions": "contrast:3",
            "model.depth": 2}  # fmt: skip
    workdir = tmp_path / "run"
    with pytest.raises(train.Interrupted):
        train.train(tiny(**over), workdir, stop_after=4, verbose=False)
    best = json.loads((workdir / "best" / "best.json").read_text())
    summary = train.train(tiny(**over), workdir, verbose=False)
    evals = [r for r in train.read_metrics(workdir / "metrics.jsonl") if r["type"] == "eval"]
    periodic = [r for r in evals if r.get("split") != "final"]
    assert periodic and all("val_accuracy" in r and "test_accuracy" not in r for r in periodic)
    best_eval = max((r for r in evals if "val_accuracy" in r), key=lambda r: (r["val_accuracy"], -r["step"]))
    assert summary["best_step"] == best_eval["step"] and summary["select"] == "best_val"
    assert summary["best_step"] >= best["step"]  # the pre-resume best was kept and compared against
    assert summary["val_accuracy"] == pytest.approx(best_eval["val_accuracy"])  # the selected parameters
    assert (
        summary["test_examples"] == len(data_lib.load_digits().x_test) and 0 <= summary["test_accuracy"] <= 1
    )
    final = [r for r in evals if r.get("split") == "final"]
    assert len(final) == 1 and final[0]["test_accuracy"] == summary["test_accuracy"]
    assert 0 <= summary["test_corrupted"]["contrast:3"] <= 1 and summary["train_examples"] == 100
    for when in ("profile_init", "profile_final"):
        assert set(summary[when]) >= {"token_cosine", "hfc_lfc", "effective_rank", "sv_ratio"}
        assert all(len(v) == 3 for v in summary[when].values())  # input + 2 layers
    assert summary["profile_init"] != summary["profile_final"]
    assert np.asarray(summary["ln_gain_neg_frac"]).shape == (2, 2)


def test_divergence_is_recorded_when_asked(tmp_path):
    """train.on_nonfinite=record (depth-stability studies): a diverging run ends with a summary that says
    so, instead of an error."""
    summary = train.train(
        tiny(**{"opt.lr": 1e30, "train.on_nonfinite": "record"}), tmp_path / "r", verbose=False
    )
    assert summary["diverged"] is True and "non-finite" in summary["diverged_detail"]
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["diverged"] is True
    with pytest.raises(train.NonFiniteError):
        train.train(tiny(**{"opt.lr": 1e30}), tmp_path / "s", verbose=False)
