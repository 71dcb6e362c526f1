"""Studies: grids of `jaxsmooth train` runs with seeds, committed result records, and reports.

    jaxsmooth study run experiments/studies/depth.py --jobs 2        # run (or resume) every cell
    jaxsmooth study run experiments/studies/depth.py --commit        # ... and git-commit the records
    jaxsmooth study run experiments/studies/depth.py --quick         # the minutes-long smoke version
    jaxsmooth study status experiments/studies/depth.py              # cells done / total
    jaxsmooth study report experiments/studies/depth.py              # markdown tables + PNG figures
    jaxsmooth study reproduce experiments/studies/depth.py --cell KEY  # rerun one recorded cell, compare

A study is a committed spec file whose `get_study(quick)` returns a dict:

    {"name": "depth",                          # results go to <results>/<name>.jsonl
     "config": "fashion_mnist",                # packaged config name or config file (+ ":args")
     "overrides": {"model.d_model": 64, ...},  # study-scale settings shared by every cell
     "variants": {"baseline": {"model.spectrum.mode": "none"}, "sharpen": {...}, ...},
     "grid": [{"model.depth": 2}, {"model.depth": 4}, ...],   # one dict of overrides per grid point
                                               # (+ "tags": {...}: labels that are not config fields)
     "seeds": [0, 1, 2],                       # each sets train.seed and data.seed
     "x": "model.depth",                       # optional: the grid field the report plots against
     "metric": "test_accuracy",                # optional: the headline metric (default by task)
     "report_metrics": [...],                  # optional: the metrics tabulated ("a/b" reaches into a
                                               #   dict field, "a/mean" is the mean of its entries)
     "label": ["trained_on"],                  # optional: the tags that name a grid point in tables
     "profile_point": {"trained_on": "clean"}, # optional: the grid point of the per-layer profile figure
                                               #   (default: the last)
     "curves": {...}}                          # optional: metrics against a value at one grid point,
                                               #   one panel each (`_curve_figure`)

Every cell (variant x grid point x seed) is one `jaxsmooth train` run in its own workdir
`<root>/<study>/<key>`, where the key is a hash of the study name and the cell's full resolved config: two
studies never share a run, and a changed setting is a new cell. Finished cells are skipped; unfinished
ones resume from their checkpoints. `--jobs N` runs N cells at once, each in its own process pinned to
its own cores (`taskset`). When a cell finishes, one compact JSON record (key, the exact command that
reproduces it, seed, tags, wall time, train / validation / test metrics, per-layer profiles at init and
at the end, effective-map spectra, LN-gain signs) is appended to `<results>/<study>.jsonl` with an fsync,
so a lost machine loses at most the cells running at the time. `--commit` git-commits that file (only
it) every `--commit-every N` finished cells (default 10; the message names the study, how many cells and
which) and whenever the runner stops: at the end, when a cell fails, on Ctrl-C or SIGTERM, on any error.
So the history reads one commit per batch, not per cell, and no finished record is left uncommitted.

The report pairs every variant with the baseline of the same grid point and seed (same data split, same
data order) and gives mean +/- std over seeds and the paired difference with a 95% confidence interval
(Student t over the seed-paired differences).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib.util
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from jaxsmooth.train import jsonl, migrate

PROTOCOL = 1  # bumped when what a record means changes (keys of old records then differ)
DEFAULT_ROOT = Path("runs") / "studies"
DEFAULT_RESULTS = Path("experiments") / "results"
COMMIT_EVERY = 10  # default of --commit-every: finished cells per commit of the results file
# summary.json fields copied into a record (whichever exist for the task).
RECORD_FIELDS = (
    "test_accuracy", "test_loss", "test_bpc", "test_examples", "val_accuracy", "val_loss", "val_bpc",
    "train_accuracy", "train_loss", "train_bpc", "best_step", "final_train_loss", "steps", "steps_per_sec",
    "num_params", "test_corrupted", "profile_init", "profile_final", "eff_re_min", "eff_re_max",
    "eff_neg_frac", "eff_wrong_frac", "eig_min", "eig_max", "ln_gain_neg_frac", "diverged",
)  # fmt: skip


class StudyError(ValueError):
    """A bad spec or a cell that failed; the message says which and how to fix it."""


# ------------------------------------------------------------------------------------ specs and cells


@dataclasses.dataclass(frozen=True)
class Cell:
    """One run of a study: a variant at a grid point with a seed."""

    study: str
    variant: str
    point: dict  # the grid point's overrides
    seed: int
    overrides: dict  # every override applied to the base config, in order
    config_spec: str  # the base config argument of `jaxsmooth train --config`
    key: str = ""  # hash of (study, protocol, resolved config); set by `resolve`

    @property
    def tags(self) -> dict:
        return {"variant": self.variant, "seed": self.seed, **self.point}

    def command(self, workdir: str | Path) -> list[str]:
        """The `jaxsmooth train` command that reproduces this cell."""
        args = [f"--config.{k}={_flag_value(v)}" for k, v in self.overrides.items()]
        return ["jaxsmooth", "train", "--config", self.config_spec, "--workdir", str(workdir), *args]


def _flag_value(v: Any) -> str:
    if v is None:
        return "none"
    if isinstance(v, float):
        return repr(v)
    return str(v)


def load_spec(path: str | Path, quick: bool = False) -> dict:
    """The dict of a spec file's `get_study(quick)`, validated."""
    path = Path(path)
    if not path.is_file():
        raise StudyError(f"study spec {path} does not exist (specs live in experiments/studies/)")
    mod_spec = importlib.util.spec_from_file_location(f"study_{path.stem}", path)
    module = importlib.util.module_from_spec(mod_spec)
    try:
        mod_spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 - a broken spec file is a user error, named
        raise StudyError(f"study spec {path} failed to load: {type(e).__name__}: {e}") from e
    if not hasattr(module, "get_study"):
        raise StudyError(f"study spec {path} has no get_study(quick) function")
    try:
        spec = dict(module.get_study(quick))
    except (ValueError, OSError, KeyError) as e:  # e.g. a missing lr.jsonl or data directory, named
        raise StudyError(f"study spec {path}: {e}") from e
    missing = [k for k in ("name", "config", "variants", "grid", "seeds") if k not in spec]
    if missing:
        raise StudyError(f"study spec {path}: get_study() lacks {missing}")
    if not spec["variants"] or not spec["grid"] or not spec["seeds"]:
        raise StudyError(f"study spec {path}: variants, grid and seeds must all be non-empty")
    b = spec.get("baseline")  # absent: "baseline" if there is such a variant; None: no comparisons
    named = {*b, *b.values()} if isinstance(b, dict) else {b} if isinstance(b, str) else set()
    unknown = sorted(named - set(spec["variants"]))
    if unknown:
        raise StudyError(f"study spec {path}: baseline names unknown variant(s) {unknown}; "
                         f"variants are {list(spec['variants'])}")  # fmt: skip
    tags = [point_tags(pt) for pt in spec["grid"]]
    tag_refs = {"label": spec.get("label") or [], "profile_point": spec.get("profile_point") or {},
                "curves.point": (spec.get("curves") or {}).get("point") or {}}  # fmt: skip
    for what, keys in tag_refs.items():
        bad = sorted(k for k in keys if not all(k in t for t in tags))
        if bad:
            raise StudyError(f"study spec {path}: {what} names {bad}, which not every grid point has; "
                             f"its tags are its overrides and its tags ({sorted(tags[0])})")  # fmt: skip
    spec.setdefault("overrides", {})
    spec["spec_path"] = str(path)
    return spec


def point_overrides(point: dict) -> dict:
    """A grid point's config overrides (everything but its "tags")."""
    return {k: v for k, v in point.items() if k != "tags"}


def point_tags(point: dict) -> dict:
    """A grid point's labels: its overrides and its extra "tags"."""
    return {**point_overrides(point), **point.get("tags", {})}


def cells(spec: dict) -> list[Cell]:
    """Every (variant, grid point, seed) of a spec, grid-major so early records cover every variant."""
    out = []
    for point in spec["grid"]:
        for seed in spec["seeds"]:
            for variant, vo in spec["variants"].items():
                overrides = {**spec["overrides"], **vo, **point_overrides(point), "train.seed": seed,
                             "data.seed": seed}  # fmt: skip
                out.append(Cell(spec["name"], variant, point_tags(point), seed, overrides, spec["config"]))
    return out


def _keyed(config: dict) -> dict:
    """The config as a record key holds it: the fields added after study records existed are left out at
    their neutral value (jaxsmooth.train.migrate.STUDY_KEY_NEUTRAL), so adding a field never orphans a
    finished cell."""
    return migrate.study_key_config(config)


def resolve(cell: Cell) -> tuple[Cell, Any]:
    """(the cell with its key, its resolved ConfigDict): the base config with the overrides applied and
    checked exactly as `jaxsmooth train` does."""
    from jaxsmooth import train
    from jaxsmooth.tools import arguments

    argv = ["--config", cell.config_spec] + cell.command("x")[6:]
    try:
        config, _, _ = arguments.parse_train_args(argv)
        config = config.copy_and_resolve_references()
        train.check_config(config)
    except Exception as e:  # noqa: BLE001 - any bad override is the spec's fault; name the cell
        raise StudyError(f"{cell.study} cell {cell.tags}: bad config ({type(e).__name__}: {e})") from e
    text = json.dumps({"study": cell.study, "protocol": PROTOCOL, "config": _keyed(config.to_dict())},
                      sort_keys=True, default=str)  # fmt: skip
    return dataclasses.replace(cell, key=hashlib.sha256(text.encode()).hexdigest()[:16]), config


# ------------------------------------------------------------------------------------ records


def results_path(spec: dict, results_dir: str | Path = DEFAULT_RESULTS) -> Path:
    return Path(results_dir) / f"{spec['name']}.jsonl"


def read_records(path: str | Path) -> list[dict]:
    """The records of a results file ([] if it does not exist). A torn last line from a killed writer is
    skipped with a jsonl.TornLineWarning; a damaged line before it raises jsonl.JsonlError naming it."""
    path = Path(path)
    if not path.is_file():
        return []
    return jsonl.read_jsonl(path)


def append_record(path: Path, record: dict) -> None:
    """One line, appended and fsynced: a crash leaves the earlier records intact. The line starts on a
    fresh line: a torn tail left by a killed writer is first set aside in <path>.torn (jsonl.append_line)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    jsonl.append_line(path, json.dumps(record, sort_keys=True), fsync=True)


def make_record(cell: Cell, workdir: Path, wall_s: float, config, cores: int | None = None) -> dict:
    """The compact record of a finished cell, from its summary.json (cores: how many CPUs its process was
    pinned to; XLA's CPU reductions, and so the last digits, depend on it)."""
    summary = json.loads((workdir / "summary.json").read_text())
    rec = {
        "key": cell.key, "study": cell.study, "protocol": PROTOCOL, "variant": cell.variant,
        "seed": cell.seed, "tags": cell.tags,
        "command": " ".join(cell.command(f"runs/studies/{cell.study}/{cell.key}")),
        "wall_s": round(wall_s, 1), "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "depth": config.model.depth, "d_model": config.model.d_model,
        "jaxsmooth_version": _version(),
    }  # fmt: skip
    if cores is not None:
        rec["cores"] = cores
    rec["cpu"] = cpu_model()
    rec.update({k: _round(_compact(summary[k])) for k in RECORD_FIELDS if k in summary})
    rec.update(_derived(rec))
    rec.update(training_time(workdir / "metrics.jsonl"))
    return rec


def cpu_model() -> str:
    """The processor's model name (records carry it: XLA's CPU kernels differ between processors, so a
    cell rerun on another one matches its record only to within float rounding grown over the run)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine() or "unknown"


def training_time(metrics_path: Path) -> dict:
    """{"train_s", "s_per_step"}: the run's training time from its own log, summed over every process that
    worked on it: steps redone after a restart count as often as they ran; the gap of a restart and each
    process's compilation before its first logged step do not count. Empty if no two logged steps follow
    each other in one process."""
    total, steps, last = 0.0, 0, None
    try:
        records = jsonl.read_jsonl(metrics_path)  # a torn last line is skipped, with a warning
    except OSError:
        return {}
    for r in records:
        if r.get("type") == "event" and r.get("event") == "resumed":
            last = None  # the next record starts a new process: no interval across the restart
        elif r.get("type") == "train":
            if last is not None and r["step"] > last[0]:
                total, steps = total + r["time"] - last[1], steps + r["step"] - last[0]
            last = (r["step"], r["time"])
    return {"train_s": round(total, 1), "s_per_step": float(f"{total / steps:.4g}")} if steps else {}


MAX_LAYER_POINTS = 65  # per-layer arrays of deeper stacks keep this many evenly spaced layers


def _compact(v: Any) -> Any:
    """Per-layer arrays of very deep stacks thinned to MAX_LAYER_POINTS evenly spaced layers (the kept
    indices are recorded), so a 1000-layer record stays a few KB."""
    if isinstance(v, dict) and v and all(isinstance(x, list) for x in v.values()):
        n = max(len(x) for x in v.values())
        if n > MAX_LAYER_POINTS:
            idx = sorted({round(i * (n - 1) / (MAX_LAYER_POINTS - 1)) for i in range(MAX_LAYER_POINTS)})
            return {"layers": idx, **{k: [x[i] for i in idx] for k, x in v.items()}}
        return v
    if isinstance(v, list) and len(v) > MAX_LAYER_POINTS:
        idx = sorted({round(i * (len(v) - 1) / (MAX_LAYER_POINTS - 1)) for i in range(MAX_LAYER_POINTS)})
        return [v[i] for i in idx]
    return v


def _derived(rec: dict) -> dict:
    """Scalars the reports use: the last layer's smoothing at init and at the end, the mean fraction of
    negative LN1 gains and of effective eigenvalues on the wrong side."""
    out = {}
    for when in ("init", "final"):
        prof = rec.get(f"profile_{when}") or {}
        for k, short in (("token_cosine", "cos"), ("hfc_lfc", "hfc_lfc"), ("effective_rank", "erank")):
            if prof.get(k):
                out[f"{short}_{when}_last"] = prof[k][-1]
    if rec.get("ln_gain_neg_frac"):
        ln1 = [row[0] for row in rec["ln_gain_neg_frac"]]
        out["ln1_neg_frac_mean"] = _round(sum(ln1) / len(ln1))
    if rec.get("eff_wrong_frac"):
        w = [x for x in rec["eff_wrong_frac"] if x is not None]
        out["eff_wrong_frac_mean"] = _round(sum(w) / len(w)) if w else None
    return out


def _round(v: Any) -> Any:
    """Floats to 5 significant digits (records stay small; seed noise is far larger)."""
    if isinstance(v, float):
        return float(f"{v:.5g}") if math.isfinite(v) else None
    if isinstance(v, list):
        return [_round(x) for x in v]
    if isinstance(v, dict):
        return {k: _round(x) for k, x in v.items()}
    return v


def _version() -> str:
    import jaxsmooth

    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             timeout=10, cwd=Path(__file__).parent)  # fmt: skip
        return (
            f"{jaxsmooth.__version__}+{rev.stdout.strip()}" if rev.returncode == 0 else jaxsmooth.__version__
        )
    except OSError:
        return jaxsmooth.__version__


# ------------------------------------------------------------------------------------ running


@dataclasses.dataclass
class _Job:
    cell: Cell
    config: Any
    workdir: Path
    proc: subprocess.Popen
    started: float
    cores: tuple[int, ...]
    log: Path


def _core_groups(jobs: int) -> list[tuple[int, ...]]:
    """Split this process's CPUs into `jobs` groups (one per concurrent cell)."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = list(range(os.cpu_count() or 1))
    jobs = max(1, min(jobs, len(cpus)))
    size = len(cpus) // jobs
    return [tuple(cpus[i * size : (i + 1) * size]) for i in range(jobs)]


def _cost(config) -> float:
    """Relative training cost of a cell for the ETA: steps x depth x width^2."""
    m = config.model
    return float(config.train.steps) * m.depth * m.d_model**2


def hours_left(done: Sequence[tuple[float, float]], todo: Sequence[float]) -> float:
    """Hours of runs the cells of cost `todo` will take, from finished cells' (cost, wall seconds): wall
    time fitted as a + b * cost by least squares (a: start-up, compilation and evaluation, which do not
    shrink with depth; b: training), or proportional to cost while the finished cells all cost the same.
    NaN before any cell has finished."""
    if not done:
        return float("nan")
    n = len(done)
    mc, mw = sum(c for c, _ in done) / n, sum(w for _, w in done) / n
    var = sum((c - mc) ** 2 for c, _ in done)
    b = sum((c - mc) * (w - mw) for c, w in done) / var if var > 0 else 0.0
    a = mw - b * mc
    if var == 0 or b <= 0 or a < 0:  # one cost, or a fit that makes no sense: proportional
        a, b = 0.0, mw / mc if mc > 0 else 0.0
    return sum(a + b * c for c in todo) / 3600


def _timings(all_cells: list[tuple[Cell, Any]], records: list[dict]) -> tuple[list, list[float]]:
    """([(cost, wall seconds)] of the finished cells that record a wall time, [cost] of the cells not
    finished): what `hours_left` takes."""
    walls = {r["key"]: r.get("wall_s") for r in records}
    done = [(_cost(cfg), walls[c.key]) for c, cfg in all_cells if walls.get(c.key)]
    return done, [_cost(cfg) for c, cfg in all_cells if c.key not in walls]


def run(
    spec: dict,
    *,
    jobs: int = 1,
    root: str | Path = DEFAULT_ROOT,
    results_dir: str | Path = DEFAULT_RESULTS,
    commit: bool = False,
    commit_every: int = COMMIT_EVERY,
    only: Sequence[str] | None = None,
    keep_workdirs: bool = True,
    say=print,
) -> list[dict]:
    """Run every unfinished cell of `spec` (see the module docstring); returns all records of the study.

    Args:
      spec: a `load_spec` dict.
      jobs: cells run at once, each pinned to its own share of the CPUs.
      root: where the cells' workdirs go (`<root>/<study>/<key>`).
      results_dir: where `<study>.jsonl` is; each finished cell's record is appended to it at once.
      commit: git-commit the results file every `commit_every` finished cells and whenever the runner
        stops (at the end, when a cell fails, on KeyboardInterrupt or SIGTERM, on any error).
      commit_every: finished cells per commit (>= 1).
      only: run just the cells whose variant is listed.
      keep_workdirs: False deletes a finished cell's workdir (checkpoints) once its record is written.
      say: where progress lines go.
    Returns:
      Every record of the study (also those of earlier invocations). Raises StudyError if a cell failed
      (after the other cells have run); a SIGTERM raises KeyboardInterrupt, after the commit.
    """
    if commit_every < 1:
        raise StudyError(f"commit_every={commit_every} must be >= 1")
    results = results_path(spec, results_dir)
    records = read_records(results)
    todo, done_keys = [], {r["key"] for r in records}
    all_cells = [resolve(c) for c in cells(spec)]
    for cell, config in all_cells:
        if cell.key in done_keys or (only and cell.variant not in only):
            continue
        todo.append((cell, config))
    total = len(all_cells)
    n_done = sum(c.key in done_keys for c, _ in all_cells)
    left_out = total - n_done - len(todo)
    others = f"; {left_out} of other variants left out by --only" if left_out else ""
    say(f"study {spec['name']}: {n_done} of {total} cells done, {len(todo)} to run "
        f"({jobs} at a time{others}), results in {results}")  # fmt: skip
    if not todo:
        return read_records(results)
    remaining = {c.key: _cost(cfg) for c, cfg in todo}
    progress = _Progress(n_done, total, _timings(all_cells, records)[0], remaining, len(_core_groups(jobs)))
    committer = _Committer(results, spec, commit_every if commit else 0, progress)
    try:
        with _sigterm_raises_keyboard_interrupt():
            failures = _run_cells(
                spec, todo, jobs, Path(root), results, keep_workdirs, progress, committer, say
            )
    except BaseException as e:  # Ctrl-C, SIGTERM, a full disk...: commit what finished, then stop
        committer.flush("runner interrupted" if isinstance(e, KeyboardInterrupt) else
                        f"runner stopped by {type(e).__name__}")  # fmt: skip
        raise
    committer.flush()
    if failures:
        raise StudyError(
            f"{len(failures)} cell(s) of {spec['name']} failed (their logs are named above); fix and rerun: "
            "finished cells are kept and skipped"
        )
    return read_records(results)


def _run_cells(
    spec: dict,
    todo: list[tuple[Cell, Any]],
    jobs: int,
    root: Path,
    results: Path,
    keep_workdirs: bool,
    progress: _Progress,
    committer: _Committer,
    say,
) -> list[Cell]:
    """Run the (cell, config) pairs of `todo`, `jobs` at a time; as each one exits, append its record to
    `results`, count it in `progress` and hand it to `committer` (or report its failure). Returns the
    cells that failed."""
    free = _core_groups(jobs)
    running: list[_Job] = []
    failures = []
    while todo or running:
        while todo and free:
            cell, config = todo.pop(0)
            running.append(_launch(cell, config, root / cell.study / cell.key, free.pop(0)))
        time.sleep(0.5)
        for job in [j for j in running if j.proc.poll() is not None]:
            running.remove(job)
            free.append(job.cores)
            wall = time.time() - job.started
            if job.proc.returncode != 0 or not (job.workdir / "summary.json").is_file():
                tail = job.log.read_text()[-1500:] if job.log.is_file() else ""
                failures.append(job.cell)
                say(f"  FAILED {job.cell.tags} (rc {job.proc.returncode}); log {job.log}:\n{tail}")
                committer.flush(f"then {_label(spec, job.cell)} failed")
                continue
            record = make_record(job.cell, job.workdir, wall, job.config, cores=len(job.cores))
            committer.add(job.cell)  # before the append: a stop right after it still commits the record
            append_record(results, record)
            eta = progress.finish(job.cell, wall)
            committer.commit_if_due()
            if not keep_workdirs:
                shutil.rmtree(job.workdir, ignore_errors=True)
            say(f"  [{progress.done}/{progress.total}] {_label(spec, job.cell)}: "
                f"{_headline(record)} in {wall:.0f} s; study ETA {_hms(eta)}")  # fmt: skip
    return failures


@dataclasses.dataclass
class _Progress:
    """Cells done of the study's total, and what the ETA is fitted on."""

    done: int
    total: int
    finished: list[tuple[float, float]]  # (cost, wall seconds) of the finished cells (`hours_left`)
    remaining: dict[str, float]  # key -> cost of the cells still to run
    parallel: int  # cells run at once

    def finish(self, cell: Cell, wall: float) -> float:
        """Count `cell` as done in `wall` seconds; returns the study's ETA in seconds."""
        self.finished.append((self.remaining.pop(cell.key), wall))
        self.done += 1
        return hours_left(self.finished, list(self.remaining.values())) * 3600 / max(1, self.parallel)


class _Committer:
    """Git commits of a study's results file, one per `every` finished cells (0: no commits) plus one
    whenever `flush` is called with cells pending: a readable history, and no finished cell left out."""

    def __init__(self, path: Path, spec: dict, every: int, progress: _Progress):
        self.path, self.spec, self.every, self.progress = path, spec, every, progress
        self.pending: list[Cell] = []  # finished cells whose records are not committed yet

    def add(self, cell: Cell) -> None:
        if self.every:
            self.pending.append(cell)

    def commit_if_due(self) -> None:
        if self.every and len(self.pending) >= self.every:
            self.flush()

    def flush(self, why: str = "") -> None:
        """Commit the pending cells' records now (`why`: the reason, in the commit message). A failed
        commit keeps them pending: the next commit holds and names them."""
        if self.pending and _git_commit(self.path, self.message(why)):
            self.pending = []

    def message(self, why: str = "") -> str:
        """`study NAME: K cells (D of T done[; why])`, then one line per cell: its label and key."""
        n, p = len(self.pending), self.progress
        subject = f"study {self.spec['name']}: {n} cell{'s' if n != 1 else ''} ({p.done} of {p.total} done"
        subject += f"; {why})" if why else ")"
        return subject + "\n\n" + "".join(f"{_label(self.spec, c)} ({c.key})\n" for c in self.pending)


@contextmanager
def _sigterm_raises_keyboard_interrupt() -> Iterator[None]:
    """Inside the block, SIGTERM raises KeyboardInterrupt (as Ctrl-C does), so the runner's cleanup runs:
    the finished cells are committed before it stops. Only the main thread can set handlers; elsewhere
    SIGTERM keeps its handler."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def _launch(cell: Cell, config, workdir: Path, cores: tuple[int, ...]) -> _Job:
    workdir = workdir.absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "study_cell.json").write_text(json.dumps({"key": cell.key, "tags": cell.tags}) + "\n")
    cmd = [sys.executable, "-m", "jaxsmooth", *cell.command(workdir)[1:]]
    env = dict(os.environ)
    if len(cores) < (os.cpu_count() or 1) and shutil.which("taskset"):
        cmd = ["taskset", "-c", ",".join(map(str, cores)), *cmd]
    log = workdir / "study.log"
    with log.open("a") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    return _Job(cell, config, workdir, proc, time.time(), cores, log)


# Record fields that say when, where and how fast a run went, not what it measured: `reproduce` does not
# compare them.
CIRCUMSTANTIAL_FIELDS = ("wall_s", "finished", "jaxsmooth_version", "steps_per_sec", "train_s", "s_per_step",
                         "cores", "cpu")  # fmt: skip


def compare_records(recorded: dict, reproduced: dict) -> tuple[list[tuple[str, Any, Any]], list[str]]:
    """(differences, unrecorded): every measured field whose value differs between a committed record and
    a rerun of its cell, as (field, recorded, reproduced); and the fields only the rerun has (a record made
    before the field existed), which are not differences. Values are compared as recorded (floats at 5
    significant digits), so identical means the rerun matched to the record's precision."""
    diffs, unrecorded = [], []
    for k in sorted(set(recorded) | set(reproduced)):
        if k in CIRCUMSTANTIAL_FIELDS:
            continue
        if k not in recorded:
            unrecorded.append(k)
        elif recorded[k] != reproduced.get(k):
            diffs.append((k, recorded[k], reproduced.get(k)))
    return diffs, unrecorded


def reproduce(
    spec: dict,
    key: str,
    *,
    root: str | Path = Path("runs") / "reproduce",
    results_dir: str | Path = DEFAULT_RESULTS,
    cores: int | None = None,
    keep: bool = False,
    say=print,
) -> list[tuple[str, Any, Any]]:
    """Rerun the finished cell whose key starts with `key` in a fresh workdir under `root` (the study's own
    workdirs and records are not touched), pinned to as many CPUs as the record says it ran on (1 for
    records older than that field: the runner pins each cell to cores // jobs, and the committed studies
    ran one cell per core), and compare the new record with the committed one. Returns the differences
    (empty: reproduced)."""
    path = results_path(spec, results_dir)
    records = {r["key"]: r for r in read_records(path)}
    matches = sorted(k for k in records if k.startswith(key))
    if not key or not matches:
        raise StudyError(f"no record of {spec['name']} has a key starting with {key!r} (in {path}); "
                         "`jaxsmooth study status` lists the cells, the records name their keys")  # fmt: skip
    if len(matches) > 1:
        raise StudyError(f"key {key!r} matches {len(matches)} records of {spec['name']}: give more of it")
    recorded = records[matches[0]]
    found = [(c, cfg) for c, cfg in (resolve(c) for c in cells(spec)) if c.key == recorded["key"]]
    if not found:
        raise StudyError(f"record {recorded['key']} ({recorded.get('tags')}) is not a cell of the spec as it "
                         f"is now (the spec or the config changed since); check out the code it names "
                         f"({recorded.get('jaxsmooth_version')}) to rerun it")  # fmt: skip
    cell, config = found[0]
    n = cores or recorded.get("cores", 1)
    cpus = _core_groups(1)[0]  # every CPU this process may use
    if n > len(cpus):
        raise StudyError(f"the record ran on {n} CPUs and this process may use {len(cpus)}: rerun it where "
                         f"{n} are free, or pass --cores (last digits may then differ)")  # fmt: skip
    Path(root).mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix=f"{spec['name']}-{cell.key}-", dir=root))
    say(f"reproducing {spec['name']} {_label(spec, cell)} ({cell.key}) on {n} CPU(s) in {workdir}")
    here, there = cpu_model(), recorded.get("cpu")
    other_cpu = there != here
    if other_cpu:
        say(f"  note: the record ran on {there or 'a processor it does not name (older record)'}, this is "
            f"{here}; on another processor XLA's kernels round differently and the fields may differ by "
            "about seed noise (rerun on the record's processor for an exact check)")  # fmt: skip
    job = _launch(cell, config, workdir, tuple(cpus[-n:]))
    job.proc.wait()
    if job.proc.returncode != 0 or not (workdir / "summary.json").is_file():
        tail = job.log.read_text()[-1500:] if job.log.is_file() else ""
        raise StudyError(f"the rerun failed (rc {job.proc.returncode}); log {job.log}:\n{tail}")
    reproduced = make_record(cell, workdir, time.time() - job.started, config, cores=n)
    diffs, unrecorded = compare_records(recorded, reproduced)
    same = len(set(recorded) - set(CIRCUMSTANTIAL_FIELDS)) - len(diffs)
    if diffs:
        say(f"NOT reproduced: {len(diffs)} of {same + len(diffs)} recorded fields differ:")
        for k, a, b in diffs:
            say(f"  {k}: recorded {_short(a)}, rerun {_short(b)}")
        if other_cpu:
            say("  (on another processor than the record's: see the note above)")
    else:
        say(f"reproduced: all {same} recorded fields identical (test metrics, per-layer profiles, spectra)")
    if unrecorded:
        say(f"  (fields the record predates, not compared: {', '.join(unrecorded)})")
    if not keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return diffs


def _short(v: Any) -> str:
    text = json.dumps(v)
    return text if len(text) <= 80 else text[:77] + "..."


def _git_commit(path: Path, message: str) -> bool:
    """Commit the results file (only it) to the repository that holds it; True if that worked. A failure
    is reported, never fatal: the records are on disk."""
    where = ["git", "-C", str(path.parent)]
    try:
        subprocess.run([*where, "add", path.name], check=True, capture_output=True, timeout=60)
        subprocess.run([*where, "commit", "-q", "-m", message, "--", path.name], check=True,
                       capture_output=True, timeout=60)  # fmt: skip
    except (subprocess.SubprocessError, OSError) as e:
        err = getattr(e, "stderr", None) or b""
        print(f"  (could not commit {path}: {e} {err.decode(errors='replace').strip()})", file=sys.stderr)
        return False
    return True


def _label(spec: dict, cell: Cell) -> str:
    """How progress lines and commit messages name a cell: its variant, its grid point as the tables
    name it (spec["label"]), its seed."""
    point = point_label(spec, cell.point)
    return f"{cell.variant} {point} seed {cell.seed}" if point else f"{cell.variant} seed {cell.seed}"


def _headline(record: dict) -> str:
    for k in ("test_accuracy", "test_bpc", "test_loss"):
        if record.get(k) is not None:
            return f"{k} {record[k]:.4f}"
    return "done"


def _hms(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "unknown"
    h, rem = divmod(int(seconds), 3600)
    return f"{h}h{rem // 60:02d}m"


# ------------------------------------------------------------------------------------ statistics


def t_quantile_975(dof: int) -> float:
    """The 0.975 quantile of Student's t (two-sided 95%) for dof >= 1."""
    table = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
             10: 2.228, 15: 2.131, 20: 2.086, 30: 2.042}  # fmt: skip
    if dof in table:
        return table[dof]
    if dof > 30:
        return 1.96 + 2.4 / dof  # within 1e-3 of the exact value above 30
    lower = max(k for k in table if k < dof)
    upper = min(k for k in table if k > dof)
    w = (dof - lower) / (upper - lower)
    return table[lower] * (1 - w) + table[upper] * w


def mean_std(values: Iterable[float]) -> tuple[float, float, int]:
    v = [x for x in values if x is not None and math.isfinite(x)]
    if not v:
        return math.nan, math.nan, 0
    m = sum(v) / len(v)
    s = math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else math.nan
    return m, s, len(v)


def paired_difference(a: dict[int, float], b: dict[int, float]) -> tuple[float, float, int]:
    """Mean of a[seed] - b[seed] over the seeds both have, and the 95% CI half-width (t, n - 1 dof)."""
    d = [a[s] - b[s] for s in a if s in b and a[s] is not None and b[s] is not None]
    m, s, n = mean_std(d)
    half = t_quantile_975(n - 1) * s / math.sqrt(n) if n > 1 else math.nan
    return m, half, n


def _get(record: dict, metric: str) -> float | None:
    """A metric of a record; "a/b" reaches into a dict field (e.g. test_corrupted/gaussian_noise:3), and
    "a/mean" is the mean of a dict field's numeric entries (e.g. over every corrupted test set)."""
    head, _, rest = metric.partition("/")
    v = record.get(head)
    if rest and isinstance(v, dict):
        if rest == "mean" and "mean" not in v:
            nums = [x for x in v.values() if isinstance(x, int | float)]
            return sum(nums) / len(nums) if nums else None
        v = v.get(rest)
    elif rest:
        return None
    return v if isinstance(v, int | float) else None


def _matches(record: dict, point: dict) -> bool:
    return all(record["tags"].get(k) == v for k, v in point.items())


def point_label(spec: dict, point: dict) -> str:
    """How a table names a grid point: the tags in spec["label"] (default: every tag), short names."""
    keys = spec.get("label") or list(point)
    return ", ".join(f"{k.split('.')[-1]}={point[k]}" for k in keys if k in point)


def baselines(spec: dict) -> dict[str, str]:
    """variant -> the variant it is compared with: spec["baseline"] is one variant's name (default
    "baseline"), a dict {variant: its baseline}, or None (no comparisons)."""
    b = spec.get("baseline", "baseline")
    if b is None:
        return {}
    if isinstance(b, dict):
        return {v: w for v, w in b.items() if v in spec["variants"] and w in spec["variants"]}
    return {v: b for v in spec["variants"] if v != b and b in spec["variants"]}


def table(records: list[dict], spec: dict, metric: str, fmt: str = ".4f") -> str:
    """Markdown: one row per grid point, one column per variant: mean +/- std over seeds, and below each
    compared variant its seed-paired difference to its baseline (`baselines`) with a 95% CI (* when it
    excludes 0). A grid point where no record has the metric (a corruption it was not tested on) has no
    row."""
    variants = list(spec["variants"])
    compare = baselines(spec)
    lines = ["| grid point | " + " | ".join(variants) + " |", "|---" * (len(variants) + 1) + "|"]
    for point in map(point_tags, spec["grid"]):
        recs = [r for r in records if _matches(r, point)]
        by = {v: {r["seed"]: _get(r, metric) for r in recs if r["variant"] == v} for v in variants}
        if recs and all(x is None for b in by.values() for x in b.values()):
            continue
        cells_ = []
        for v in variants:
            m, s, n = mean_std(by[v].values())
            text = "n/a" if n == 0 else f"{m:{fmt}} ± {s:{fmt}}" if n > 1 else f"{m:{fmt}}"
            if v in compare and n:
                d, half, k = paired_difference(by[v], by[compare[v]])
                if k > 1:
                    star = "*" if abs(d) > half else ""
                    text += f"<br>Δ {d:+{fmt}} ± {half:{fmt}}{star}"
            cells_.append(f"{text} (n={n})" if n and n < len(spec["seeds"]) else text)
        lines.append(f"| {point_label(spec, point)} | " + " | ".join(cells_) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ report


def report(
    spec: dict, records: list[dict], out_dir: str | Path, metrics: Sequence[str] | None = None
) -> Path:
    """`<out_dir>/<study>.md` (tables of every metric) and `<study>_*.png` figures; returns the md path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = spec["name"]
    metric = spec.get("metric") or ("test_bpc" if any("test_bpc" in r for r in records) else "test_accuracy")
    metrics = list(metrics or spec.get("report_metrics") or [metric, "train_accuracy", "val_accuracy"])
    metrics = list(dict.fromkeys(metrics))  # each metric tabulated once, in the order first named
    metrics = [m for m in metrics if any(_get(r, m) is not None for r in records)]
    source = spec.get("spec_path", "")
    intro = f"{len(records)} runs from `{source}`; mean ± std over seeds{_compared(spec)}"
    parts = [f"## Study `{name}`", "", intro, ""]
    for m in metrics:
        parts += [f"### {m}", "", table(records, spec, m), ""]
    wall = sum(r.get("wall_s", 0) for r in records)
    parts.append(f"Total training wall time: {wall / 3600:.2f} h (sum over runs).")
    figs = _figures(spec, records, out_dir, metric)
    parts += ["", *[f"![{f.stem}]({f.name})" for f in figs]]
    path = out_dir / f"{name}.md"
    path.write_text("\n".join(parts) + "\n")
    return path


def _compared(spec: dict) -> str:
    against = sorted({f"`{b}`" for b in baselines(spec).values()})
    if not against:
        return "."
    return (f"; under each compared variant, its seed-paired difference to {', '.join(against)} with a 95% "
            "confidence interval (* = the interval excludes 0).")  # fmt: skip


def _figures(spec: dict, records: list[dict], out_dir: Path, metric: str) -> list[Path]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    paths = []
    x_field = spec.get("x")
    variants = list(spec["variants"])
    if x_field:
        fig = Figure(figsize=(6, 4), layout="constrained")
        ax = fig.subplots()
        for v in variants:
            xs, ms, ss = [], [], []
            for point in map(point_tags, spec["grid"]):
                vals = [_get(r, metric) for r in records if r["variant"] == v and _matches(r, point)]
                m, s, n = mean_std(vals)
                if n:
                    xs.append(point[x_field]), ms.append(m), ss.append(0.0 if n < 2 else s)
            if xs:
                ax.errorbar(xs, ms, yerr=ss, marker="o", capsize=3, label=v)
        ax.set(xlabel=x_field, ylabel=metric, title=f"{spec['name']}: {metric} (mean ± std over seeds)")
        if spec.get("log_x"):
            ax.set_xscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        paths.append(out_dir / f"{spec['name']}_{metric.replace('/', '_')}.png")
        FigureCanvasAgg(fig).print_png(str(paths[-1]))
    if spec.get("curves"):
        paths.append(_curve_figure(spec, records, out_dir))
    # Per-layer token cosine at init and at the end, for the largest grid point (or the spec's
    # profile_point), averaged over seeds.
    point = spec.get("profile_point") or point_tags(spec["grid"][-1])
    recs = [r for r in records if _matches(r, point)]
    if any(r.get("profile_final") for r in recs):
        fig = Figure(figsize=(10, 4), layout="constrained")
        axes = fig.subplots(1, 2)
        for ax, when in zip(axes, ("profile_init", "profile_final"), strict=True):
            for v in variants:
                profs = [r[when] for r in recs if r["variant"] == v and r.get(when)]
                prof = [p["token_cosine"] for p in profs]
                if prof:
                    n = min(len(p) for p in prof)
                    xs = profs[0].get("layers", range(n))[:n]  # thinned deep profiles keep their indices
                    ax.plot(xs, [sum(p[i] for p in prof) / len(prof) for i in range(n)], "o-", ms=3,
                            label=v)  # fmt: skip
            ax.set(xlabel="layer (0 = input)", ylabel="token cosine", title=f"{when.split('_')[1]} ({point})")
            ax.grid(alpha=0.3)
        axes[1].legend(fontsize=8)
        paths.append(out_dir / f"{spec['name']}_profiles.png")
        FigureCanvasAgg(fig).print_png(str(paths[-1]))
    return paths


def _curve_figure(spec: dict, records: list[dict], out_dir: Path) -> Path:
    """`<study>_curves.png`: spec["curves"] = {"point": {tag: value}, "xlabel": str, "ylabel": str,
    "panels": {title: [(x, metric), ...]}}; one panel per title, the records at that grid point, one line
    per variant (mean ± std over seeds) through its metrics at their x (e.g. accuracy against severity,
    one panel per corruption)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    c = spec["curves"]
    recs = [r for r in records if _matches(r, c.get("point", {}))]
    panels = c["panels"]
    fig = Figure(figsize=(3.2 * len(panels), 3.4), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False, sharey=True)[0]
    for ax, (title, pts) in zip(axes, panels.items(), strict=True):
        for v in spec["variants"]:
            xs, ms, ss = [], [], []
            for x, metric in pts:
                m, s, n = mean_std(_get(r, metric) for r in recs if r["variant"] == v)
                if n:
                    xs.append(x), ms.append(m), ss.append(0.0 if n < 2 else s)
            if xs:
                ax.errorbar(xs, ms, yerr=ss, marker="o", ms=3, capsize=2, label=v)
        ax.set(title=title, xlabel=c.get("xlabel", ""))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(c.get("ylabel", "mean ± std over seeds"))
    axes[-1].legend(fontsize=7)
    path = out_dir / f"{spec['name']}_curves.png"
    FigureCanvasAgg(fig).print_png(str(path))
    return path


# ------------------------------------------------------------------------------------ CLI


def main(argv: list[str]) -> int:
    """`jaxsmooth study ...`: 0 on success, 2 on a user error (printed). A torn last line that a read of a
    results file skipped is said on stderr as one plain "jaxsmooth study: warning: ..." line."""
    with warnings.catch_warnings():
        # Shown once per file and line, whatever the user's warning filters say: it is about records.
        warnings.simplefilter("default", jsonl.TornLineWarning)
        show = warnings.showwarning

        def show_plain(message, category, *args, **kwargs):
            if issubclass(category, jsonl.TornLineWarning):
                print(f"jaxsmooth study: warning: {message}", file=sys.stderr, flush=True)
            else:  # anything else (a library's warning) as Python shows it
                show(message, category, *args, **kwargs)

        warnings.showwarning = show_plain  # restored by catch_warnings on the way out
        return _main(argv)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jaxsmooth study", description=__doc__.split("\n\n")[0])
    p.add_argument("action", choices=["run", "status", "report", "reproduce"])
    p.add_argument("spec", help="a study spec file (experiments/studies/<name>.py)")
    p.add_argument("--quick", action="store_true", help="the spec's quick version (minutes)")
    p.add_argument("--jobs", type=int, default=1, help="cells run at once, each pinned to its own cores")
    p.add_argument("--root", default=str(DEFAULT_ROOT), help="where cell workdirs go (default runs/studies)")
    p.add_argument("--results", default=str(DEFAULT_RESULTS), help="where <study>.jsonl records go")
    p.add_argument("--out", default=None, help="report output directory (default: --results)")
    p.add_argument("--commit", action="store_true",
                   help="git-commit the results file every --commit-every finished cells and when the "
                   "runner stops (at the end, on a failed cell, Ctrl-C or SIGTERM)")  # fmt: skip
    p.add_argument("--commit-every", type=int, default=None, metavar="N",
                   help=f"finished cells per commit (default {COMMIT_EVERY}; implies --commit)")  # fmt: skip
    p.add_argument("--only", default=None, help="comma-separated variants to run (default all)")
    p.add_argument("--baseline", default=None,
                   help="report: compare every variant with this one instead of the spec's baseline "
                   "(writes <study>_vs_<variant>.md)")  # fmt: skip
    p.add_argument("--cell", default=None, help="reproduce: the key (or a unique prefix) of a recorded cell")
    p.add_argument(
        "--cores",
        type=int,
        default=None,
        help="reproduce: CPUs to pin the rerun to (default: as many as the record ran on)",
    )
    p.add_argument("--keep", action="store_true", help="reproduce: keep the rerun's workdir")
    return p


def _main(argv: list[str]) -> int:
    p = _parser()
    args = p.parse_args(argv)
    if args.jobs < 1:
        p.error(f"--jobs={args.jobs} must be >= 1")
    if args.commit_every is not None and args.commit_every < 1:
        p.error(f"--commit-every={args.commit_every} must be >= 1")
    try:
        spec = load_spec(args.spec, args.quick)
        if args.quick:
            spec["name"] += "_quick"
        if args.action == "run":
            only = args.only.split(",") if args.only else None
            commit = args.commit or args.commit_every is not None
            run(spec, jobs=args.jobs, root=args.root, results_dir=args.results, commit=commit,
                commit_every=args.commit_every or COMMIT_EVERY, only=only)  # fmt: skip
        elif args.action == "reproduce":
            if not args.cell:
                raise StudyError("reproduce needs --cell KEY (a record's key, or a unique prefix of it)")
            root = args.root if args.root != str(DEFAULT_ROOT) else str(Path("runs") / "reproduce")
            diffs = reproduce(spec, args.cell, root=root, results_dir=args.results, cores=args.cores,
                              keep=args.keep)  # fmt: skip
            return 1 if diffs else 0
        elif args.action == "status":
            _print_status(spec, args.results, args.jobs)
        else:
            records = read_records(results_path(spec, args.results))
            if not records:
                raise StudyError(f"no records for {spec['name']} in {args.results}: run the study first")
            if args.baseline is not None:
                if args.baseline not in spec["variants"]:
                    raise StudyError(f"--baseline {args.baseline!r} is not a variant of {spec['name']}: "
                                     f"choose one of {list(spec['variants'])}")  # fmt: skip
                spec = dict(spec, baseline=args.baseline, name=f"{spec['name']}_vs_{args.baseline}")
                records = [dict(r, study=spec["name"]) for r in records]
            path = report(spec, records, args.out or args.results)
            print(f"wrote {path}")
    except (StudyError, jsonl.JsonlError) as e:  # JsonlError: a damaged line of a results file, named
        print(f"jaxsmooth study: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM while running: the finished cells are recorded
        saved = "recorded and committed" if args.commit or args.commit_every else "recorded"
        how = str(e) or "Ctrl-C"
        print(f"jaxsmooth study: interrupted ({how}); the finished cells are {saved}; rerun to continue "
              "(unfinished cells resume from their checkpoints)", file=sys.stderr)  # fmt: skip
        return 130
    return 0


def _print_status(spec: dict, results_dir: str, jobs: int) -> None:
    """`jaxsmooth study status`: cells done of the total, hours of runs done and left, the cells to run."""
    records = read_records(results_path(spec, results_dir))
    keys = {r["key"] for r in records}
    all_cells = [resolve(c) for c in cells(spec)]
    done, todo = _timings(all_cells, records)
    left = hours_left(done, todo)
    n_done = sum(c.key in keys for c, _ in all_cells)
    line = f"study {spec['name']}: {n_done} of {len(all_cells)} cells done"
    line += f" ({sum(w for _, w in done) / 3600:.2f} h of runs)"
    if left > 0:
        line += f"; about {left:.1f} h of runs left"
        line += f" ({left / jobs:.1f} h with --jobs {jobs})" if jobs > 1 else ""
    print(line)
    for c, _ in all_cells:
        if c.key not in keys:
            print(f"  to run: {_label(spec, c)}  ({c.key})")
