"""Studies: cells are keyed by their full resolved config (and the study), a quick study runs end to end in
parallel pinned processes and appends one record per cell, a rerun skips finished cells, `--commit`
commits the records in batches and whenever the runner stops, the report pairs variants with the
baseline, and the statistics are right."""

import json
import math
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import XLA_CACHE_ENV

from jaxsmooth.tools import study

SPECS = Path(__file__).parents[1] / "experiments" / "studies"


def test_cell_keys_follow_the_resolved_config_and_the_study():
    spec = study.load_spec(SPECS / "lr.py", quick=True)
    cells = [study.resolve(c)[0] for c in study.cells(spec)]
    assert len(cells) == len(spec["variants"]) * len(spec["grid"]) * len(spec["seeds"])
    assert len({c.key for c in cells}) == len(cells)  # every cell its own workdir
    again = [study.resolve(c)[0] for c in study.cells(study.load_spec(SPECS / "lr.py", quick=True))]
    assert [c.key for c in again] == [c.key for c in cells]  # stable
    other = dict(spec, name="lr_other")  # the same configs in another study: other keys
    assert {study.resolve(c)[0].key for c in study.cells(other)}.isdisjoint({c.key for c in cells})
    changed = dict(spec, overrides={**spec["overrides"], "train.steps": 21})
    assert {study.resolve(c)[0].key for c in study.cells(changed)}.isdisjoint({c.key for c in cells})
    # A value equal to the default resolves to the same config, hence the same key.
    same = dict(
        spec, overrides={**spec["overrides"], "model.mlp_ratio": spec["overrides"]["model.mlp_ratio"]}
    )
    assert [study.resolve(c)[0].key for c in study.cells(same)] == [c.key for c in cells]
    cmd = cells[0].command("W")
    assert cmd[:4] == ["jaxsmooth", "train", "--config", "fashion_mnist"] and "--config.train.seed=0" in cmd


def test_bad_spec_names_the_problem(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def get_study(quick):\n    return {'name': 'x', 'config': 'digits', 'variants': {}, "
                   "'grid': [{}], 'seeds': [0]}\n")  # fmt: skip
    with pytest.raises(study.StudyError, match="non-empty"):
        study.load_spec(bad)
    typo = tmp_path / "typo.py"
    typo.write_text("def get_study(quick):\n    return {'name': 'x', 'config': 'digits', 'variants': "
                    "{'a': {'model.depht': 2}}, 'grid': [{}], 'seeds': [0]}\n")  # fmt: skip
    with pytest.raises(study.StudyError, match="depht"):
        [study.resolve(c) for c in study.cells(study.load_spec(typo))]
    with pytest.raises(study.StudyError, match="does not exist"):
        study.load_spec(tmp_path / "missing.py")
    wrong = tmp_path / "wrong.py"
    wrong.write_text("def get_study(quick):\n    return {'name': 'x', 'config': 'digits', 'variants': "
                     "{'a': {}, 'b': {}}, 'grid': [{}], 'seeds': [0], 'baseline': {'b': 'c'}}\n")  # fmt: skip
    with pytest.raises(study.StudyError, match=r"unknown variant\(s\) \['c'\]"):
        study.load_spec(wrong)
    label = tmp_path / "label.py"
    label.write_text("def get_study(quick):\n    return {'name': 'x', 'config': 'digits', 'variants': "
                     "{'a': {}}, 'grid': [{'model.depth': 2}], 'seeds': [0], "
                     "'label': ['depht']}\n")  # fmt: skip
    with pytest.raises(study.StudyError, match=r"label names \['depht'\]"):
        study.load_spec(label)


def test_every_spec_loads_and_names_its_comparisons(tmp_path, monkeypatch):
    """Each committed spec loads (quick: no lr.jsonl needed), every cell's config passes the trainer's
    checks, and its comparisons pair variants that exist; depth_stability compares each residual type's
    spectral model with its own unconstrained one."""
    monkeypatch.setenv("JAXSMOOTH_CIFAR_DIR", str(tmp_path))  # depth_full's data (only named, not read)
    for path in sorted(SPECS.glob("[!_]*.py")):
        spec = study.load_spec(path, quick=True)
        for cell in study.cells(spec):
            study.resolve(cell)
        for v, b in study.baselines(spec).items():
            assert v in spec["variants"] and b in spec["variants"] and v != b
    spec = study.load_spec(SPECS / "depth_stability.py")
    assert study.baselines(spec) == {f"{r}/spectral": f"{r}/none" for r in ("deepnorm", "post_ln", "pre_ln")}
    assert {c.overrides["model.depth"] for c in study.cells(spec)} == {100, 300, 1000}


def test_statistics():
    m, s, n = study.mean_std([1.0, 2.0, 3.0])
    assert (m, n) == (2.0, 3) and s == pytest.approx(1.0)
    # Paired differences: the CI half-width is t_{0.975, n-1} * sd / sqrt(n).
    a = {0: 0.90, 1: 0.92, 2: 0.91, 3: 0.93}
    b = {0: 0.88, 1: 0.91, 2: 0.88, 3: 0.92, 9: 0.5}  # seed 9 has no partner: ignored
    d, half, k = study.paired_difference(a, b)
    diffs = np.array([0.02, 0.01, 0.03, 0.01])
    assert k == 4 and d == pytest.approx(diffs.mean())
    assert half == pytest.approx(3.182 * diffs.std(ddof=1) / 2, rel=1e-3)
    assert study.t_quantile_975(1) == pytest.approx(12.706) and study.t_quantile_975(100) == pytest.approx(
        1.984, abs=2e-3
    )
    assert math.isnan(study.paired_difference({0: 1.0}, {0: 0.5})[1])  # one pair: no interval


def test_quick_study_runs_skips_finished_cells_and_reports(tmp_path, monkeypatch):
    for k, v in XLA_CACHE_ENV.items():  # the cells' subprocesses share the test-wide compile cache
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("JAXSMOOTH_CACHE", str(tmp_path / "cache"))
    spec = study.load_spec(SPECS / "lr.py", quick=True)
    spec["name"] = "lr_quick"
    results, root = tmp_path / "results", tmp_path / "runs"
    lines = []
    n = len(spec["variants"]) * len(spec["grid"]) * len(spec["seeds"])
    nb = len(spec["grid"]) * len(spec["seeds"])  # the baseline's cells
    # --only runs one variant's cells; the others are neither run nor counted as done.
    records = study.run(spec, jobs=2, root=root, results_dir=results, only=["baseline"], say=lines.append)
    assert [r["variant"] for r in records] == ["baseline"] * nb
    assert lines[0].startswith(f"study lr_quick: 0 of {n} cells done, {nb} to run (2 at a time; {n - nb} of "
                               "other variants left out by --only)")  # fmt: skip
    assert lines[-1].startswith(f"  [{nb}/{n}] baseline")
    lines.clear()
    records = study.run(spec, jobs=2, root=root, results_dir=results, say=lines.append)
    assert len(records) == n and len({r["key"] for r in records}) == n
    assert any("ETA" in line for line in lines) and lines[0].startswith(f"study lr_quick: {nb} of {n}")
    rec = records[0]
    keys = ("command", "seed", "wall_s", "test_accuracy", "val_accuracy", "train_accuracy", "profile_init",
            "profile_final", "ln_gain_neg_frac", "cos_final_last")  # fmt: skip
    for key in keys:
        assert key in rec, key
    assert rec["command"].startswith("jaxsmooth train --config fashion_mnist")
    assert len(rec["profile_final"]["effective_rank"]) == spec["overrides"]["model.depth"] + 1
    # The record file is one JSON object per line.
    assert len((results / "lr_quick.jsonl").read_text().splitlines()) == n
    # Rerunning skips every finished cell (nothing is trained again).
    lines.clear()
    study.run(spec, jobs=2, root=root, results_dir=results, say=lines.append)
    assert lines == [f"study lr_quick: {n} of {n} cells done, 0 to run (2 at a time), results in "
                     f"{results / 'lr_quick.jsonl'}"]  # fmt: skip
    md = study.report(spec, study.read_records(results / "lr_quick.jsonl"), tmp_path / "report")
    text = md.read_text()
    assert "| grid point | baseline | sharpen |" in text and "Δ" in text and "val_accuracy" in text
    assert (tmp_path / "report" / "lr_quick_val_accuracy.png").is_file()
    assert json.loads((results / "lr_quick.jsonl").read_text().splitlines()[0])["study"] == "lr_quick"
    assert rec["train_s"] > 0 and rec["s_per_step"] > 0  # the run's own training time
    # The same records against another variant (the controls' view: sign vs parameterisation).
    argv = ["report", str(SPECS / "lr.py"), "--quick", "--results", str(results), "--out", str(tmp_path)]
    assert study.main([*argv, "--baseline", "sharpen"]) == 0
    vs = (tmp_path / "lr_quick_vs_sharpen.md").read_text()
    assert "seed-paired difference to `sharpen`" in vs and "Δ" in vs
    assert study.main([*argv, "--baseline", "nope"]) == 2
    # Rerunning one recorded cell in a fresh workdir reproduces its record, field for field.
    lines.clear()
    rerun = tmp_path / "rerun"
    diffs = study.reproduce(spec, rec["key"][:8], root=rerun, results_dir=results, say=lines.append)
    assert diffs == [] and lines[-1].startswith("reproduced: all"), lines
    assert rec["cores"] == 1 and not any(rerun.iterdir())  # the scratch workdir is removed
    assert rec["cpu"] == study.cpu_model() and not any("note:" in line for line in lines)  # same processor
    with pytest.raises(study.StudyError, match="no record"):
        study.reproduce(spec, "zzzz", root=rerun, results_dir=results)


# ------------------------------------------------------------------------------------ committing


def fake_launch(fail=frozenset()):
    """study._launch without training (a fraction of a second per cell instead of minutes): the cell's
    workdir gets the summary.json a finished run writes (a test accuracy made up from its variant and
    seed) and its process is `true`; for the (variant, seed) pairs in `fail` it is `false`, no summary."""

    def launch(cell, config, workdir, cores):
        workdir.mkdir(parents=True, exist_ok=True)
        failed = (cell.variant, cell.seed) in fail
        if not failed:
            acc = 0.8 + 0.01 * cell.seed + 0.05 * (cell.variant == "sharpen")
            (workdir / "summary.json").write_text(json.dumps({"test_accuracy": acc, "steps": 20}))
        proc = subprocess.Popen(["false" if failed else "true"])
        return study._Job(cell, config, workdir, proc, time.time(), cores, workdir / "study.log")

    return launch


@pytest.fixture
def repo(tmp_path):
    """(a fresh git repository with one empty commit, git(*args) -> stdout run in it)."""
    root = tmp_path / "repo"
    root.mkdir()

    def git(*args):
        return subprocess.run(["git", "-C", str(root), *args], check=True, capture_output=True,
                              text=True).stdout  # fmt: skip

    git("init", "-q")
    for key, value in (("user.name", "study test"), ("user.email", "study@test.invalid"),
                       ("commit.gpgsign", "false")):  # fmt: skip
        git("config", key, value)
    git("commit", "-q", "--allow-empty", "-m", "start")
    return root, git


@pytest.fixture
def six_cells():
    """The quick lr study with three seeds: 2 variants x 1 grid point x 3 seeds."""
    spec = study.load_spec(SPECS / "lr.py", quick=True)
    return dict(spec, name="lr_commit", seeds=[0, 1, 2])


def study_commits(git) -> list[tuple[str, list[str], list[str]]]:
    """(message, keys of the records it added, files it changed) of every commit after the first, oldest
    first."""
    out = []
    for sha in git("rev-list", "--reverse", "HEAD").split()[1:]:
        diff = git("show", "--format=", "--unified=0", sha)
        added = [json.loads(line[1:])["key"] for line in diff.splitlines() if line.startswith("+{")]
        files = git("show", "--format=", "--name-only", sha).split()
        out.append((git("show", "-s", "--format=%B", sha), added, files))
    return out


def measured(records: list[dict]) -> list[dict]:
    """The records without when, where and how fast they ran, in key order."""
    out = [{k: v for k, v in r.items() if k not in study.CIRCUMSTANTIAL_FIELDS} for r in records]
    return sorted(out, key=lambda r: r["key"])


@pytest.mark.parametrize("every", [1, 4, 10])
def test_commit_every_k_cells_makes_ceil_n_over_k_commits(six_cells, repo, tmp_path, monkeypatch, every):
    """6 cells committed every k: ceil(6 / k) commits, each changing only the results file, adding the
    records of k cells (the last one: the rest, at the end of the run) and naming exactly those cells."""
    root, git = repo
    monkeypatch.setattr(study, "_launch", fake_launch())
    results = root / "results"
    study.run(six_cells, jobs=2, root=tmp_path / "runs", results_dir=results, commit=True,
              commit_every=every, say=lambda line: None)  # fmt: skip
    commits = study_commits(git)
    assert len(commits) == math.ceil(6 / every)
    assert [len(added) for _, added, _ in commits] == [min(every, 6 - i * every) for i in range(len(commits))]
    done = 0
    for message, added, files in commits:
        done += len(added)
        subject, _, body = message.partition("\n\n")
        plural = "s" if len(added) > 1 else ""
        assert subject == f"study lr_commit: {len(added)} cell{plural} ({done} of 6 done)"
        assert sorted(re.findall(r"seed \d \(([0-9a-f]{16})\)", body)) == sorted(added)
        assert files == ["results/lr_commit.jsonl"]
    assert git("show", "HEAD:results/lr_commit.jsonl") == (results / "lr_commit.jsonl").read_text()
    assert git("status", "--porcelain", "results") == ""


def test_batched_commits_leave_the_records_as_they_were(six_cells, repo, tmp_path, monkeypatch):
    """The same cells run with and without --commit write the same records (all but timings and dates),
    one line per cell as each finishes, in the cells' order with one job."""
    root, git = repo
    monkeypatch.setattr(study, "_launch", fake_launch())
    say = lambda line: None
    committed = study.run(six_cells, root=tmp_path / "a", results_dir=root / "results", commit=True,
                          commit_every=4, say=say)  # fmt: skip
    plain = study.run(six_cells, root=tmp_path / "b", results_dir=tmp_path / "plain", say=say)
    assert measured(committed) == measured(plain) and len(plain) == 6
    assert [r["key"] for r in committed] == [study.resolve(c)[0].key for c in study.cells(six_cells)]
    assert {r["test_accuracy"] for r in committed} == {0.8, 0.81, 0.82, 0.85, 0.86, 0.87}
    assert [len(added) for _, added, _ in study_commits(git)] == [4, 2]


@pytest.mark.parametrize("how", ["ctrl_c", "sigterm"])
def test_an_interrupted_runner_commits_the_cells_it_finished(six_cells, repo, tmp_path, monkeypatch, how):
    """Ctrl-C (KeyboardInterrupt) or SIGTERM after 3 of 6 cells, with commits due every 10: those 3 are
    committed before the runner stops (SIGTERM is raised as KeyboardInterrupt, and its handler restored),
    and a rerun runs and commits the other 3."""
    root, git = repo
    monkeypatch.setattr(study, "_launch", fake_launch())
    before = signal.getsignal(signal.SIGTERM)

    def say(line):
        if line.startswith("  [3/6]"):
            if how == "ctrl_c":
                raise KeyboardInterrupt
            # Never kill the test process: the runner must have replaced the handler.
            assert signal.getsignal(signal.SIGTERM) not in (before, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises as soon as the signal arrives

    kw = dict(jobs=1, root=tmp_path / "runs", results_dir=root / "results", commit=True, commit_every=10)
    with pytest.raises(KeyboardInterrupt):
        study.run(six_cells, say=say, **kw)
    assert signal.getsignal(signal.SIGTERM) is before
    ((message, added, _),) = study_commits(git)
    assert message.startswith("study lr_commit: 3 cells (3 of 6 done; runner interrupted)")
    assert len(added) == 3
    assert git("show", "HEAD:results/lr_commit.jsonl") == (root / "results" / "lr_commit.jsonl").read_text()
    records = study.run(six_cells, say=lambda line: None, **kw)
    assert len(records) == 6 and [len(a) for _, a, _ in study_commits(git)] == [3, 3]


def test_a_failed_cell_commits_the_cells_finished_before_it(six_cells, repo, tmp_path, monkeypatch):
    """The 4th of 6 cells fails: the 3 before it are committed then (the message names the failed cell),
    the 2 after it at the end, and the runner reports the failure."""
    root, git = repo
    monkeypatch.setattr(study, "_launch", fake_launch(fail={("sharpen", 1)}))
    with pytest.raises(study.StudyError, match="1 cell\\(s\\) of lr_commit failed"):
        study.run(six_cells, jobs=1, root=tmp_path / "runs", results_dir=root / "results", commit=True,
                  say=lambda line: None)  # fmt: skip
    commits = study_commits(git)
    assert [len(added) for _, added, _ in commits] == [3, 2]
    assert commits[0][0].startswith("study lr_commit: 3 cells (3 of 6 done; then sharpen lr=0.001 seed 1 "
                                    "failed)")  # fmt: skip
    assert len(study.read_records(root / "results" / "lr_commit.jsonl")) == 5


def test_command_line_commit_every(repo, tmp_path, monkeypatch, capsys):
    """`--commit-every N` implies --commit; N < 1 is a usage error."""
    root, git = repo
    monkeypatch.setattr(study, "_launch", fake_launch())
    argv = ["run", str(SPECS / "lr.py"), "--quick", "--root", str(tmp_path / "runs"), "--results",
            str(root / "results")]  # fmt: skip
    assert study.main([*argv, "--commit-every", "3"]) == 0
    assert [len(added) for _, added, _ in study_commits(git)] == [3, 1]  # the quick study's 4 cells
    with pytest.raises(SystemExit):
        study.main([*argv, "--commit-every", "0"])
    assert "--commit-every=0 must be >= 1" in capsys.readouterr().err


def test_compare_records_names_what_a_rerun_changed():
    recorded = {"key": "k", "test_accuracy": 0.8713, "profile_final": {"token_cosine": [0.1, 0.2]},
                "wall_s": 100.0, "jaxsmooth_version": "0.1+abc"}  # fmt: skip
    same = dict(recorded, wall_s=90.0, jaxsmooth_version="0.1+def", train_s=80.0, eff_wrong_frac_mean=0.0,
                cpu="another processor")  # fmt: skip
    assert study.compare_records(recorded, same) == ([], ["eff_wrong_frac_mean"])  # timing is not a result
    changed = dict(recorded, profile_final={"token_cosine": [0.1, 0.21]})
    del changed["test_accuracy"]
    assert study.compare_records(recorded, changed)[0] == [
        ("profile_final", {"token_cosine": [0.1, 0.2]}, {"token_cosine": [0.1, 0.21]}),
        ("test_accuracy", 0.8713, None),
    ]


def test_training_time_counts_each_step_once_across_restarts(tmp_path):
    """A run that crashed after logging step 60 (last checkpoint 40) and resumed: the restart's gap does not
    count, the redone steps 41-60 count twice (they ran twice)."""
    lines = [{"type": "train", "step": s, "time": 100.0 + s} for s in (1, 20, 40, 60)]
    lines += [{"type": "event", "step": 41, "event": "resumed"}]
    lines += [{"type": "train", "step": s, "time": 1000.0 + 2 * s} for s in (41, 60, 80)]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    # first process: steps 1 -> 60 in 59 s; second: 41 -> 80 in 78 s (its own clock, 2 s per step).
    assert study.training_time(path) == {"train_s": 137.0, "s_per_step": round(137 / 98, 4)}
    path.write_text(json.dumps(lines[0]) + "\n")
    assert study.training_time(path) == {}


def test_hours_left_fits_fixed_and_per_cost_time():
    """Deep cells cost more per cell, but every cell pays start-up and evaluation: the estimate fits both, so
    a study measured on shallow cells is not under- (or, proportionally, over-) estimated at depth."""
    done = [(2.0, 25 + 10 * 2.0), (4.0, 25 + 10 * 4.0), (8.0, 25 + 10 * 8.0)]
    assert study.hours_left(done, [32.0, 32.0]) * 3600 == pytest.approx(2 * (25 + 320))
    assert study.hours_left([(4.0, 60.0)], [8.0]) * 3600 == pytest.approx(120.0)  # one cost: proportional
    assert math.isnan(study.hours_left([], [8.0]))


def test_corruption_report_names_points_by_label_and_tabulates_each_metric_once(tmp_path):
    """The corruption spec's report, on made-up records: a grid point is named by its `trained_on` tag, a
    metric named twice is tabulated once, a grid point that was not tested on a corruption has no row in
    its table, "test_corrupted/mean" averages a record's corrupted test sets, and the severity figure is
    drawn."""
    spec = study.load_spec(SPECS / "corruption.py", quick=True)
    assert len(spec["report_metrics"]) > len(set(spec["report_metrics"]))  # the spec names one twice
    records = []
    for point in map(study.point_tags, spec["grid"]):
        for seed in (0, 1):
            for i, v in enumerate(spec["variants"]):
                corr = {c: 0.5 + 0.1 * i + 0.01 * seed for c in point["data.eval_corruptions"].split(",")}
                corr = {k: x - 0.02 * n for n, (k, x) in enumerate(corr.items())}
                records.append({"variant": v, "seed": seed, "tags": {"variant": v, "seed": seed, **point},
                                "test_accuracy": 0.8 + 0.01 * i, "test_corrupted": corr})  # fmt: skip
    clean = [r for r in records if r["tags"]["trained_on"] == "clean"][0]
    mean = np.mean(list(clean["test_corrupted"].values()))
    assert study._get(clean, "test_corrupted/mean") == pytest.approx(mean)
    assert study._get(clean, "test_accuracy/mean") is None  # not a dict field: no value
    text = study.report(spec, records, tmp_path).read_text()
    metrics = [line[4:] for line in text.splitlines() if line.startswith("### ")]
    assert len(metrics) == len(set(metrics)) and "test_corrupted/mean" in metrics
    trained = [p["tags"]["trained_on"] for p in spec["grid"] if p["tags"]["trained_on"] != "clean"]
    blur = text.split("### test_corrupted/defocus_blur:3")[1].split("###")[0]
    assert "| trained_on=clean |" in blur and not any(f"trained_on={t} " in blur for t in trained)
    assert "eval_corruptions=" not in text  # the label names the point, not every override
    cell = [c for c in study.cells(spec) if c.point["trained_on"] != "clean"][0]  # progress lines too
    assert (
        study._label(spec, cell) == f"{cell.variant} trained_on={cell.point['trained_on']} seed {cell.seed}"
    )
    # Sharpen is +0.1 on every corrupted set of every seed: the paired difference says so, exactly.
    assert "Δ +0.1000 ± 0.0000" in text.split("### test_corrupted/mean")[1].split("###")[0]
    assert (tmp_path / "corruption_curves.png").is_file()
    assert not (tmp_path / "corruption_profiles.png").exists()  # these records carry no profiles
