"""jaxsmooth.train.workdir without training: the workdir lock (a second holder refused and named, a dead
holder's
lock taken over), atomic metadata writes that keep the old file on failure, damaged metadata named,
start-up checks of the path, and which config changes may resume a checkpoint."""

import errno
import json
import os
import signal
import subprocess
import sys
import time

import ml_collections
import pytest

from jaxsmooth.config import ModelConfig
from jaxsmooth.tools import cli
from jaxsmooth.train import runtime
from jaxsmooth.train import workdir as wd


def _packaged(name: str, arg: str = "quick") -> ml_collections.ConfigDict:
    return cli.load_config_file(f"{cli.configs_dir() / (name + '.py')}:{arg}")


def _resolved(config: ml_collections.ConfigDict) -> dict:
    d = json.loads(config.to_json_best_effort())
    return wd.resolved_config(d, ModelConfig.from_dict(d["model"]))


# ---------------------------------------------------------------------------------------- the lock


def test_second_lock_is_refused_naming_the_holder(tmp_path):
    with wd.WorkdirLock(tmp_path) as first:
        assert first.took_over is None
        with pytest.raises(wd.WorkdirLockedError, match=f"pid {os.getpid()} on host .*started"):
            with wd.WorkdirLock(tmp_path):
                pass
    with wd.WorkdirLock(tmp_path) as again:  # released: free again, and nothing to take over
        assert again.took_over is None
    assert (tmp_path / wd.LOCK_FILE).read_text() == ""


def test_lock_of_a_killed_process_is_taken_over(tmp_path):
    """A real process takes the lock and is SIGKILLed: the kernel drops its lock, the details stay; the
    next holder takes over with a message naming the dead one. While it lived, it was refused."""
    code = (
        "import sys, time; from pathlib import Path; from jaxsmooth import workdir as wd\n"
        "lock = wd.WorkdirLock(Path(sys.argv[1])).__enter__(); print('locked', flush=True); time.sleep(60)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        assert wd.live_holder(tmp_path)["pid"] == proc.pid  # the CLI's early refusal sees it
        with pytest.raises(wd.WorkdirLockedError, match=f"pid {proc.pid}"):
            wd.WorkdirLock(tmp_path).__enter__()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert wd.live_holder(tmp_path) is None
    with wd.WorkdirLock(tmp_path) as lock:
        assert f"pid {proc.pid}" in lock.took_over and "no longer holds it" in lock.took_over


# ---------------------------------------------------------------------------------------- files


def test_atomic_write_keeps_the_old_file_when_the_write_fails(tmp_path, monkeypatch):
    path = tmp_path / "config.json"
    wd.atomic_write_json(path, {"a": 1})
    real_fsync = os.fsync

    def full(fd):  # the disk fills up while the new content is flushed
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(wd.DiskFullError, match="disk full while writing .*config.json"):
        wd.atomic_write_json(path, {"a": 2, "long": "x" * 10000})
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert json.loads(path.read_text()) == {"a": 1}  # the old file, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]  # no temp file left


@pytest.mark.parametrize("content", [b"", b'{"model": {"depth"', b"\xff\xfe"])
def test_damaged_metadata_is_named(tmp_path, content):
    path = tmp_path / "config.json"
    path.write_bytes(content)
    with pytest.raises(wd.MetadataError, match=f"{path} is damaged: .*; restore it"):
        wd.read_json(path, "restore it")


def test_prepare_workdir_refuses_bad_paths(tmp_path):
    with pytest.raises(wd.WorkdirError, match="--workdir is empty"):
        wd.prepare_workdir("")
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    with pytest.raises(wd.WorkdirError, match="is a file, not a directory"):
        wd.prepare_workdir(a_file)
    with pytest.raises(wd.WorkdirError, match=f"cannot create workdir .*: {a_file} is a file"):
        wd.prepare_workdir(a_file / "run")
    made = wd.prepare_workdir(tmp_path / "new" / "run")
    assert made.is_dir() and not list(made.iterdir())  # created, and the write probe cleaned up


def test_prepare_workdir_refuses_a_read_only_directory(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    if os.geteuid() == 0:  # root writes through permissions: use a read-only mount
        r = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(ro)], capture_output=True
        )
        if r.returncode != 0:
            pytest.skip("root, and no read-only mount possible here")
    else:
        ro.chmod(0o500)
    try:
        with pytest.raises(wd.WorkdirError, match=f"workdir {ro} is not writable"):
            wd.prepare_workdir(ro)
        with pytest.raises(wd.WorkdirError, match="cannot create workdir"):
            wd.prepare_workdir(ro / "sub")
    finally:
        if os.geteuid() == 0:
            subprocess.run(["umount", str(ro)], check=False)
        else:
            ro.chmod(0o700)


def test_free_space_check(tmp_path):
    wd.check_free_space(tmp_path, 1, "a byte")
    with pytest.raises(wd.WorkdirError, match="MiB free .*needs about .*lower train.max_to_keep"):
        wd.check_free_space(tmp_path, 1 << 62, "an exabyte")


def test_archive_previous_run_keeps_everything(tmp_path):
    for name in ("metrics.jsonl", "summary.json", "config.json"):
        (tmp_path / name).write_text(name)
    (tmp_path / "checkpoints" / "5").mkdir(parents=True)
    moved = wd.archive_previous_run(tmp_path)
    assert "metrics.jsonl -> metrics.1.jsonl" in moved and "checkpoints -> checkpoints.1" in moved
    assert (tmp_path / "metrics.1.jsonl").read_text() == "metrics.jsonl"
    assert (tmp_path / "checkpoints.1" / "5").is_dir()
    (tmp_path / "metrics.jsonl").write_text("second")
    assert wd.archive_previous_run(tmp_path) == ["metrics.jsonl -> metrics.2.jsonl"]  # never overwritten
    assert (tmp_path / "metrics.1.jsonl").read_text() == "metrics.jsonl"
    assert wd.archive_previous_run(tmp_path) == []


# ---------------------------------------------------------------------------------------- config


def test_non_finite_values_are_refused():
    c = _packaged("digits")
    wd.check_finite(c.to_dict())
    c.opt.lr = float("inf")
    with pytest.raises(ValueError, match="opt.lr=inf must be a finite number"):
        wd.check_finite(c.to_dict())
    c = _packaged("digits", "quick,mode=free")
    c.model.spectrum.lo = float("-inf")  # mode free: unbounded is meaningful
    wd.check_finite(c.to_dict())
    c.model.ln_eps = float("nan")
    with pytest.raises(ValueError, match="model.ln_eps=nan"):
        wd.check_finite(c.to_dict())


def test_harmless_changes_may_resume():
    base = _packaged("digits")
    c = _packaged("digits")
    c.model.spectrum.lo = -1.0  # the default of mode sharpen, given explicitly
    c.model.remat = "full"
    c.model.scan = False
    c.train.log_every = 1
    c.train.checkpoint_every = 5
    c.train.num_devices = 1
    c.data.eval_batch_size = 7
    c.name = "other"
    assert wd.config_differences(_resolved(base), _resolved(c)) == []


@pytest.mark.parametrize(
    "field, value",
    [("data.seed", 1), ("data.batch_size", 16), ("data.train_fraction", 0.5), ("model.depth", 3),
     ("model.spectrum.mode", "neutral"), ("model.spectrum.lo", -0.5), ("opt.lr", 1e-4), ("train.seed", 1),
     ("model.dropout", 0.1), ("data.kwargs.test_fraction", 0.3)],
)  # fmt: skip
def test_trajectory_changes_are_listed(field, value):
    base, c = _packaged("digits"), _packaged("digits")
    *sections, name = field.split(".")
    node = c
    for s in sections:
        node = node[s]
    node[name] = value
    diffs = wd.config_differences(_resolved(base), _resolved(c))
    assert any(d.startswith(f"{field}: checkpoint has ") for d in diffs), diffs


def test_more_steps_change_a_decaying_schedule_but_not_a_constant_one():
    base, c = _packaged("digits"), _packaged("digits")
    c.train.steps = base.train.steps + 50  # opt.decay_steps follows it by reference
    diffs = wd.config_differences(_resolved(base), _resolved(c))
    assert diffs == [
        f"opt.decay_steps: checkpoint has {base.train.steps}, config has {c.train.steps} (it follows "
        f"train.steps; pin it with --config.opt.decay_steps={base.train.steps} to continue)"
    ]
    c.opt.decay_steps = base.train.steps  # pinned: more steps at the final learning rate
    assert wd.config_differences(_resolved(base), _resolved(c)) == []
    base.opt.schedule = c.opt.schedule = "constant"
    c.opt.decay_steps = base.train.steps + 50
    assert wd.config_differences(_resolved(base), _resolved(c)) == []


def test_a_field_unknown_to_the_checkpoint_is_a_difference():
    """A field added to the config later (e.g. a new ModelConfig option) is compared by default."""
    base = _resolved(_packaged("digits"))
    old = json.loads(json.dumps(base))
    del old["model"]["value_norm"]
    assert wd.config_differences(old, base) == [
        f"model.value_norm: checkpoint has (no such field), config has {base['model']['value_norm']!r}"
    ]


def test_an_added_field_at_its_old_behaviour_may_resume():
    """A checkpoint from before stochastic depth / augmentation existed resumes under a config that has
    them off, and is refused with them on."""
    base = _resolved(_packaged("digits"))
    old = json.loads(json.dumps(base))
    del old["model"]["drop_path"], old["data"]["mixup_alpha"], old["train"]["label_smoothing"]
    assert wd.config_differences(old, base) == []
    base["data"]["mixup_alpha"] = 0.8
    assert wd.config_differences(old, base) == ["data.mixup_alpha: checkpoint has 0.0, config has 0.8"]


# ---------------------------------------------------------------------------------------- CLI


def _train_cli(capsys, *args) -> tuple[int, str, str]:
    """`jaxsmooth train ARGS` in this process (the same code path as the command, minus the allocator
    re-exec): (exit status, stdout, stderr)."""
    capsys.readouterr()
    rc = cli.train_main(list(args))
    out, err = capsys.readouterr()
    return rc, out, err.strip()


def test_cli_errors_are_one_or_two_lines(tmp_path, capsys):
    broken = tmp_path / "broken.py"
    broken.write_text("def get_config(:\n")
    raising = tmp_path / "raising.py"
    raising.write_text("def get_config():\n    return {}['x']\n")
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    cases = [
        (["--config.foo=1"], "unknown config field 'foo' in --config.foo; the config has: data, model"),
        (["--config.model.foo=1"], "unknown config field 'model.foo' in --config.model.foo; model has: "),
        (["--config.opt.lr=inf"], "opt.lr=inf must be a finite number"),
        (["--config.train.steps=abc"], "flag --config.train.steps=abc: invalid literal"),
        (["--config", str(tmp_path / "missing.py")], "missing.py does not exist"),
        (["--config", str(broken)], f"config file {broken} has a syntax error at line 1"),
        (["--config", str(raising)], f"config file {raising} failed (line 2): KeyError: 'x'"),
        (["--config", "digits:foo"], "unknown config args ['foo']"),
        (["--workdir", ""], "--workdir is empty"),
        (["--workdir", str(a_file)], f"workdir {a_file} is a file, not a directory"),
        (["--config", "shakespeare_char:quick", "--config.data.name=char_file"],
         "needs --config.data.kwargs.path"),
    ]  # fmt: skip
    for args, expected in cases:
        workdir = [] if "--workdir" in args else ["--workdir", str(tmp_path / "w")]
        rc, _, err = _train_cli(capsys, *args, *workdir)
        assert rc == 2, (args, err)
        assert expected in err and "Traceback" not in err and len(err.splitlines()) <= 2, (args, err)


def test_cli_non_utf8_corpus_and_char_file_override(tmp_path, capsys):
    """jaxsmooth/configs/shakespeare_char.py documents --config.data.name=char_file
    --config.data.kwargs.path=FILE."""
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\u00e9 au lait ".encode("latin-1") * 20)
    base = [
        "--config",
        "shakespeare_char:quick",
        "--config.data.name=char_file",
        "--workdir",
        str(tmp_path / "w"),
    ]
    rc, out, err = _train_cli(capsys, *base, f"--config.data.kwargs.path={bad}", "--print_config")
    assert rc == 0 and f"path: {bad}" in out, err  # the override is accepted
    rc, _, err = _train_cli(capsys, *base, f"--config.data.kwargs.path={bad}")
    assert rc == 2 and err == f"jaxsmooth train: error: {bad} is not UTF-8 text (byte 0xe9 at offset 3): " \
        "convert it, e.g. `iconv -f latin1 -t utf-8`, or leave it out"  # fmt: skip


def test_cli_configs_lists_every_packaged_config(capsys):
    assert cli.main(["configs"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line and not line.startswith("run one")]
    assert [line.split()[0] for line in lines] == cli.config_names()
    assert all(len(line.split(None, 1)[1]) > 20 for line in lines)  # a summary, from the docstring
    assert "The default run" in next(line for line in lines if line.startswith("digits"))


def test_cli_print_config_resolves_and_does_not_train(tmp_path, capsys):
    args = ["--config", "digits:quick", "--config.train.steps=77", "--workdir", str(tmp_path / "w")]
    rc, out, err = _train_cli(capsys, *args, "--print_config")
    assert rc == 0, err
    assert "decay_steps: 77" in out and "steps: 77" in out  # the reference, resolved
    assert "# model as built: ModelConfig(" in out and "lo=-1.0" in out
    assert not (tmp_path / "w").exists()
    rc, _, err = _train_cli(capsys, *args, "--config.opt.lr=inf", "--dry_run")
    assert rc == 2 and "opt.lr=inf must be a finite number" in err


def test_cli_ctrl_c_exits_cleanly_at_any_point(tmp_path):
    """SIGINT during start-up (the allocator re-exec, imports) and during compilation (no compilation
    cache: it really compiles) ends with status 130 and one message: no traceback, no segfault (without
    the handler, 3 of 4 Ctrl-C during start-up and compilation segfaulted), the lock released."""
    workdir = tmp_path / "w"
    args = ["train", "--config", "digits:quick", "--workdir", str(workdir), "--config.model.depth=1",
            "--config.model.d_model=24"]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
    for phase in ("imports", "compilation"):
        proc = subprocess.Popen([sys.executable, "-m", "jaxsmooth", *args], env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
        if phase == "imports" and runtime.find_allocator() is not None:
            # Printed just before the allocator re-exec: the signal lands while the new interpreter starts.
            assert "allocator" in proc.stderr.readline()
        elif phase == "imports":
            time.sleep(0.5)  # past the interpreter's own start-up (Python raises KeyboardInterrupt there)
        else:  # the lock is taken just before the checkpoints are inspected and the model compiled
            deadline = time.time() + 60
            lock = workdir / wd.LOCK_FILE
            while time.time() < deadline and not (lock.exists() and lock.read_text().strip()):
                time.sleep(0.05)
            time.sleep(1.0)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 130, (phase, proc.returncode, err[-2000:])
        assert "Traceback" not in err and "stopped by SIGINT" in err, (phase, err)
        assert not (workdir / "checkpoints").exists() or not list((workdir / "checkpoints").iterdir())
        if phase == "compilation":
            assert (workdir / wd.LOCK_FILE).read_text() == ""  # released, nothing to take over
