"""What older versions wrote keeps working (jaxsmooth.train.migrate, jaxsmooth.train.settings):

- a checkpoint written by jaxsmooth before the package layout (commit c1983af; tests/data/pre_layout_run,
  made by tests/data/make_pre_layout_run.py) resumes, and the continued run's records are bit-identical
  to the ones the old code wrote when it continued the same run;
- every committed study record keeps its key (no finished cell is orphaned);
- one table of added fields, one rule for value_norm, used by the typed settings, the resume check and
  the run loader alike; a misspelt field is refused, not ignored.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import ml_collections
import pytest

from jaxsmooth import configs
from jaxsmooth.tools import study
from jaxsmooth.train import migrate, settings, state, workdir
from jaxsmooth.train import trainer as trainer_lib

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = Path(__file__).parent / "data" / "pre_layout_run"
RESULTS = ROOT / "experiments" / "results"
SPECS = ROOT / "experiments" / "studies"

pytestmark = pytest.mark.usefixtures("xla_cache")  # conftest: the persistent compilation cache


def test_a_checkpoint_from_before_the_layout_resumes_bit_identically(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(FIXTURE / "stopped", run)
    config = ml_collections.ConfigDict(json.loads((run / "config.json").read_text()))
    summary = trainer_lib.train(config, run, verbose=False)
    assert summary["resumed_from"] == 4
    want = json.loads((FIXTURE / "continued.json").read_text())
    got = [r for r in trainer_lib.read_metrics(run / "metrics.jsonl") if r.get("type") in ("train", "eval")]
    got = [r for r in got if r["step"] > 4]
    drop = lambda r: {k: v for k, v in r.items() if k != "time"}
    assert [drop(r) for r in got] == [drop(r) for r in want["records"]]  # losses, statistics, evals
    assert summary["test_loss"] == want["test_loss"] and summary["test_accuracy"] == want["test_accuracy"]


def test_the_run_loader_reads_a_run_from_before_the_layout():
    loaded = state.load_run(FIXTURE / "stopped")
    assert loaded.step == 4 and loaded.migration_notes == []
    assert loaded.model_config == settings.resolve(loaded.config).model


RECORDED = [p for p in sorted(SPECS.glob("[!_]*.py")) if (RESULTS / f"{p.stem}.jsonl").is_file()]


@pytest.mark.parametrize("path", RECORDED, ids=lambda p: p.stem)
def test_committed_study_records_keep_their_keys(path):
    spec = study.load_spec(path)
    results = RESULTS / f"{spec['name']}.jsonl"
    keys = {study.resolve(cell)[0].key for cell in study.cells(spec)}
    committed = [json.loads(line)["key"] for line in results.read_text().splitlines() if line.strip()]
    orphaned = [k for k in committed if k not in keys]
    assert committed and not orphaned, f"{len(orphaned)} of {len(committed)} records lost their cell"


def test_added_fields_default_as_before_and_today():
    """A config written before the added fields existed resolves to the same settings as today's
    config with those fields at their values (which are today's defaults too)."""
    today = configs.load("digits:quick")
    old = today.to_dict()
    for field in migrate.ADDED_FIELDS:
        section, name = field.split(".")
        old[section].pop(name, None)
    assert settings.resolve(old) == settings.resolve(today).__class__(**{
        **settings.resolve(today).__dict__, "config_dict": json.loads(json.dumps(old))
    })  # fmt: skip
    for field, value in migrate.ADDED_FIELDS.items():
        section, name = field.split(".")
        assert today[section][name] == value, f"{field}: today's default differs from the migrated value"


def test_value_norm_rule_is_one_rule():
    pre_ln_old = {"model": {"residual": "pre_ln", "depth": 2}}
    migrated, notes = migrate.migrate_config(pre_ln_old)
    assert migrated["model"]["value_norm"] == "ln" and len(notes) == 1 and "value_norm" in notes[0]
    assert "value_norm" not in pre_ln_old["model"]  # the input is not modified
    for model in ({"residual": "deepnorm"}, {"residual": "pre_ln", "value_norm": "rms"}):
        out, notes = migrate.migrate_config({"model": model})
        assert out["model"].get("value_norm") == model.get("value_norm") and notes == []


def test_the_run_loader_migrates_a_config_older_than_value_norm(tmp_path, monkeypatch):
    """A run whose checkpoint predates stored configs and whose config.json predates model.value_norm is
    rebuilt with value_norm="ln" (how it was trained), and the loader says so."""
    run = tmp_path / "run"
    shutil.copytree(FIXTURE / "stopped", run)
    raw = json.loads((run / "config.json").read_text())
    del raw["model"]["value_norm"]
    (run / "config.json").write_text(json.dumps(raw))
    monkeypatch.setattr(state.checkpoint, "read_meta", lambda step_dir: (None, None))  # no stored config
    loaded = state.load_run(run)
    assert loaded.model_config.value_norm == "ln" and "value_norm" in loaded.migration_notes[0]
    assert state.load_run(FIXTURE / "stopped").model_config.value_norm == "rms"


def test_unknown_and_missing_fields_are_refused():
    c = configs.load("digits:quick")
    c.train.stepz = 3
    with pytest.raises(ValueError, match=r"train\.stepz is not a field"):
        settings.resolve(c)
    c = configs.load("digits:quick").to_dict()
    del c["opt"]["lr"]
    with pytest.raises(ValueError, match=r"no field opt\.lr"):
        settings.resolve(c)


def test_resume_check_and_settings_share_the_table():
    assert workdir.ADDED_FIELDS is migrate.ADDED_FIELDS
    assert set(migrate.STUDY_KEY_NEUTRAL) <= set(migrate.ADDED_FIELDS)
