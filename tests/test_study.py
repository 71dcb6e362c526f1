"""Studies: cells are keyed by their full resolved config (and the study), a quick study runs end to end in
parallel pinned processes and appends one record per cell, a rerun skips finished cells, the report pairs
variants with the baseline, and the statistics are right."""

import json
import math
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
