"""Append-only JSON-lines files lose no record: a writer killed mid-line leaves a torn tail, and the next
append sets its bytes aside in <name>.torn and starts on a fresh line; readers skip a torn last line with a
warning and name a damaged line before it. For each such file: a study's results (study.append_record /
read_records) and a run's metrics.jsonl (runlog.MetricsLog / read_metrics)."""

import json
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest

from jaxsmooth.tools import study
from jaxsmooth.train import jsonl, runlog

LR_RESULTS = Path(__file__).parents[1] / "experiments" / "results" / "lr.jsonl"


def _study_append(path, rec):
    study.append_record(path, rec)


def _metrics_append(path, rec):
    runlog.MetricsLog(path, enabled=True).write(rec)


def _study_record(i):
    return {"key": f"k{i}", "variant": "baseline", "wall_s": 1.0 + i}


def _metrics_record(i):
    return {"type": "train", "step": i, "loss": 1.0 / i}


# (append, read, the i-th record) of each append-only file type.
KINDS = {
    "study": (_study_append, study.read_records, _study_record),
    "metrics": (_metrics_append, runlog.read_metrics, _metrics_record),
}


def _torn(path: Path, make, n: int = 3) -> bytes:
    """n complete records and then a torn one; returns the torn bytes."""
    lines = [json.dumps(make(i)) for i in range(1, n + 2)]
    torn = lines[-1][: len(lines[-1]) // 2].encode()
    path.write_bytes(("\n".join(lines[:-1]) + "\n").encode() + torn)
    return torn


@pytest.mark.parametrize("kind", KINDS)
def test_torn_tail_then_append_keeps_every_record_and_the_torn_bytes(tmp_path, kind, capsys):
    append, read, make = KINDS[kind]
    path = tmp_path / "records.jsonl"
    torn = _torn(path, make)
    append(path, make(9))
    # Every complete record, the new one included, and no warning: the file ends on a newline again.
    assert read(path) == [make(1), make(2), make(3), make(9)]
    assert path.read_bytes().endswith(b"\n")
    side = jsonl.torn_path(path)
    assert side.name == "records.jsonl.torn"
    header, kept, rest = side.read_bytes().split(b"\n")
    assert kept == torn and rest == b""  # the bytes as they were, one line after their header
    assert header.startswith(b"# ") and f"{len(torn)} bytes".encode() in header
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(
        f"warning: {path}: set aside a torn last line ({len(torn)} bytes"
    )
    # A second tear is appended to the same sidecar, after the first.
    with path.open("ab") as f:
        f.write(b'{"half": ')
    append(path, make(10))
    assert read(path)[-2:] == [make(9), make(10)]
    assert side.read_bytes().split(b"\n")[3] == b'{"half": '


@pytest.mark.parametrize("kind", KINDS)
def test_torn_last_line_is_skipped_with_a_warning(tmp_path, kind):
    _, read, make = KINDS[kind]
    path = tmp_path / "records.jsonl"
    before = _torn(path, make)
    torn = r"records\.jsonl: skipped its torn last line 4 .*next append sets it aside in records\.jsonl\.torn"
    with pytest.warns(jsonl.TornLineWarning, match=torn):
        assert read(path) == [make(1), make(2), make(3)]
    assert path.read_bytes().endswith(before)  # reading changes nothing
    # A damaged last line with its newline (no writer of ours leaves one) is skipped too, but an append
    # would leave it mid-file: the warning says to fix it first.
    path.write_bytes(path.read_bytes() + b"\n")
    with pytest.warns(jsonl.TornLineWarning, match="line 4 .*fix or remove line 4 before appending"):
        assert read(path) == [make(1), make(2), make(3)]


@pytest.mark.parametrize("kind", KINDS)
def test_damaged_middle_line_names_file_and_line(tmp_path, kind):
    _, read, make = KINDS[kind]
    path = tmp_path / "records.jsonl"
    lines = [json.dumps(make(i)) for i in (1, 2, 3)]
    lines[1] = lines[1][:10] + lines[2]  # a torn record with the next one glued to it, mid-file
    path.write_text("\n".join(lines) + "\n" + json.dumps(make(4)) + "\n")
    with pytest.raises(jsonl.JsonlError, match=rf"{path}, line 2: not a JSON record.*\nfix or remove line 2"):
        read(path)


@pytest.mark.parametrize("kind", KINDS)
def test_complete_tail_without_newline_just_gets_its_newline(tmp_path, kind, capsys):
    append, read, make = KINDS[kind]
    path = tmp_path / "records.jsonl"
    path.write_text(json.dumps(make(1)) + "\n" + json.dumps(make(2)))
    assert read(path) == [make(1), make(2)]  # a complete last record is read, without a warning
    append(path, make(3))
    assert read(path) == [make(1), make(2), make(3)]
    assert not jsonl.torn_path(path).exists() and capsys.readouterr().err == ""


def test_metrics_resume_sets_the_torn_tail_aside(tmp_path, capsys):
    """MetricsLog.truncate_after (a resumed run) rewrites metrics.jsonl; a torn tail's bytes go to the
    sidecar first instead of vanishing in the rewrite."""
    path = tmp_path / "metrics.jsonl"
    torn = _torn(path, _metrics_record)
    log = runlog.MetricsLog(path, enabled=True)
    log.truncate_after(2)
    assert runlog.read_metrics(path) == [_metrics_record(i) for i in (1, 2)]
    assert jsonl.torn_path(path).read_bytes().split(b"\n")[1] == torn
    assert "metrics.jsonl: set aside a torn last line" in capsys.readouterr().err


def test_results_file_cut_short_then_appended(tmp_path, capsys):
    """The issue's case: 200 bytes cut off the end of a copy of a real results file, then a record appended:
    the appended record is read back, and the cut record's remaining bytes are in the sidecar."""
    path = tmp_path / "lr.jsonl"
    full = LR_RESULTS.read_bytes()
    path.write_bytes(full[:-200])
    records = [json.loads(line) for line in full.splitlines()]
    with pytest.warns(jsonl.TornLineWarning, match=rf"lr\.jsonl: skipped its torn last line {len(records)} "):
        assert study.read_records(path) == records[:-1]
    study.append_record(path, records[-1])
    assert study.read_records(path) == records
    fragment = full[:-200].rsplit(b"\n", 1)[1]
    assert jsonl.torn_path(path).read_bytes().split(b"\n")[1] == fragment
    assert f"set aside a torn last line ({len(fragment)} bytes" in capsys.readouterr().err


def test_study_status_says_what_it_skipped(tmp_path, monkeypatch, capsys):
    """`jaxsmooth study status` names a skipped torn line on stderr, and a damaged middle line as an error
    (exit 2). Cells are resolved by a stand-in: resolving real ones imports the trainer."""
    spec = tmp_path / "tiny.py"
    spec.write_text(
        textwrap.dedent("""
        def get_study(quick):
            return {"name": "tiny", "config": "fashion_mnist", "variants": {"a": {}, "b": {}}, "grid": [{}],
                    "seeds": [0]}
    """)
    )
    config = SimpleNamespace(train=SimpleNamespace(steps=10), model=SimpleNamespace(depth=2, d_model=8))
    monkeypatch.setattr(study, "resolve", lambda c: (study.dataclasses.replace(c, key=c.variant * 4), config))
    results = tmp_path / "results"
    results.mkdir()
    rec = {"key": "aaaa", "wall_s": 5.0}
    (results / "tiny.jsonl").write_text(json.dumps(rec) + '\n{"key": "bbbb", "wa')
    argv = ["status", str(spec), "--results", str(results)]
    assert study.main(argv) == 0
    out, err = capsys.readouterr()
    assert "tiny: 1 of 2 cells done" in out and "to run: " in out
    assert err.startswith(
        f"jaxsmooth study: warning: {results / 'tiny.jsonl'}: skipped its torn last line 2 "
    )
    assert len(err.strip().splitlines()) == 1
    # The next record goes on a fresh line, and status counts it.
    study.append_record(results / "tiny.jsonl", {"key": "bbbb", "wall_s": 6.0})
    capsys.readouterr()
    assert study.main(argv) == 0
    out, err = capsys.readouterr()
    assert "tiny: 2 of 2 cells done" in out and err == ""
    # A damaged line before the last is an error naming it.
    (results / "tiny.jsonl").write_text('{"key": "aa\n' + json.dumps(rec) + "\n")
    assert study.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("jaxsmooth study: error: ") and "line 1" in err and "fix or remove line 1" in err
