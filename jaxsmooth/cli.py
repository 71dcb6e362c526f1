"""The `jaxsmooth` command: `jaxsmooth <verb> ...` (also `python -m jaxsmooth`).

    jaxsmooth train [--config FILE[:ARGS] | NAME[:ARGS]] [--workdir DIR] [--config.<field>=<value> ...]
                    [--coordinator_address HOST:PORT --num_processes N --process_id I]
    jaxsmooth audit ...        (jaxsmooth.audit.main)

`--config` takes a config file (`configs/x.py:quick`) or the name of a packaged config (`digits:quick`,
see `jaxsmooth train --help`); overrides follow ml_collections.config_flags (`--config.train.steps=200`,
`--config.model.spectrum.mode=smooth`). Without --config, train runs the default config (digits).
Without --workdir, the run goes to ./runs/<config.name>. Rerunning with the same workdir resumes.

Heavy imports (jax, the trainer) happen only once a verb needs them, so `--help` is instant.
"""

from __future__ import annotations

import importlib.util
import signal
import sys
from pathlib import Path

DEFAULT_CONFIG = "digits"
VERBS = {
    "train": "train a model from a config (resumes in an existing workdir)",
    "audit": "measure and predict per-layer smoothing of a run or a pretrained model (jaxsmooth.audit)",
}

TRAIN_USAGE = """usage: jaxsmooth train [--config FILE[:ARGS] | NAME[:ARGS]] [--workdir DIR] [--config.X=V]

  --config        a config file (configs/x.py:quick) or a packaged config name (default: digits)
  --workdir       output and checkpoint directory (default: ./runs/<config.name>); rerun to resume
  --config.a.b=v  override one field, e.g. --config.train.steps=200 --config.model.spectrum.mode=smooth
  --coordinator_address, --num_processes, --process_id
                  multi-process run (or env JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID)

packaged configs: {names}
"""


def configs_dir() -> Path:
    """Where the packaged configs live: the `jaxsmooth.configs` package of an installed wheel, else the
    repository's top-level configs/ (a source checkout or an editable install without the mapping)."""
    try:
        spec = importlib.util.find_spec("jaxsmooth.configs")
    except ModuleNotFoundError:
        spec = None
    if spec is not None and spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0])
    return Path(__file__).resolve().parent.parent / "configs"


def config_names() -> list[str]:
    return sorted(p.stem for p in configs_dir().glob("*.py") if not p.stem.startswith("_"))


def resolve_config(spec: str) -> str:
    """`NAME[:ARGS]` of a packaged config -> `/path/NAME.py[:ARGS]`; file paths are returned unchanged."""
    name, sep, args = spec.partition(":")
    if name.endswith(".py") or "/" in name or Path(name).is_file():
        return spec
    path = configs_dir() / f"{name}.py"
    if not path.is_file():
        raise ValueError(f"unknown config {name!r}: not a file, and not one of {', '.join(config_names())}")
    return f"{path}{sep}{args}"


def _normalise_config_flag(argv: list[str]) -> list[str]:
    """`--config X` -> `--config=<resolved X>` (config_flags reads the value from the same argv)."""
    out, i = [], 0
    while i < len(argv):
        a = argv[i]
        if a in ("--config", "-config") and i + 1 < len(argv):
            out.append("--config=" + resolve_config(argv[i + 1]))
            i += 2
            continue
        if a.startswith(("--config=", "-config=")):
            a = "--config=" + resolve_config(a.split("=", 1)[1])
        out.append(a)
        i += 1
    return out


def parse_train_args(argv: list[str]):
    """(config, workdir or None, distributed dict) from `train`'s arguments (absl/config_flags)."""
    from absl import flags
    from ml_collections import config_flags

    argv = ["jaxsmooth train"] + _normalise_config_flag(list(argv))
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file(
        "config", resolve_config(DEFAULT_CONFIG), "config file or packaged config name", flag_values=fv,
        lock_config=True, sys_argv=argv,
    )  # fmt: skip
    flags.DEFINE_string("workdir", None, "output directory", flag_values=fv)
    flags.DEFINE_string("coordinator_address", None, "multi-process: host:port of process 0", flag_values=fv)
    flags.DEFINE_integer("num_processes", None, "multi-process: number of processes", flag_values=fv)
    flags.DEFINE_integer("process_id", None, "multi-process: this process's id", flag_values=fv)
    rest = fv(argv)
    if len(rest) > 1:
        raise flags.Error(f"unexpected arguments {rest[1:]}")
    dist = {k: fv[k].value for k in ("coordinator_address", "num_processes", "process_id")}
    return fv.config, fv.workdir, dist


def train_main(argv: list[str]) -> int:
    if any(a in ("-h", "--help", "-help") for a in argv):
        print(TRAIN_USAGE.format(names=", ".join(config_names())))
        return 0
    from absl import flags

    try:
        config, workdir, dist = parse_train_args(argv)
    except (flags.Error, ValueError, KeyError, AttributeError, TypeError) as e:
        # config_flags reports an unknown --config.<field> as KeyError/AttributeError, a bad type as
        # TypeError/ValueError: all are usage errors here.
        print(f"jaxsmooth train: error: {type(e).__name__}: {e}\n", file=sys.stderr)
        print(TRAIN_USAGE.format(names=", ".join(config_names())), file=sys.stderr)
        return 2

    from jaxsmooth import data, parallel, train

    try:
        parallel.initialize(**dist)
        workdir = Path(workdir) if workdir else Path("runs") / config.name
        summary = train.train(config, workdir)
    except train.Interrupted as e:
        print(f"jaxsmooth train: {e}; rerun the same command to resume.", file=sys.stderr)
        return 128 + (e.signum or signal.SIGINT)
    except (ValueError, data.DataNotFoundError) as e:
        print(f"jaxsmooth train: error: {e}", file=sys.stderr)
        return 2
    except train.NonFiniteError as e:
        print(f"jaxsmooth train: error: {e}", file=sys.stderr)
        return 1
    print_summary(summary)
    return 0


def print_summary(s: dict) -> None:
    from jax import process_index

    if process_index() != 0:
        return
    wd = Path(s["workdir"])
    lines = [f"done: {s['name']}, {s['steps']} steps"]
    if "test_accuracy" in s:
        lines.append(f"  test accuracy    {s['test_accuracy']:.4f}   (test loss {s['test_loss']:.4f})")
    else:
        lines.append(f"  test loss        {s['test_loss']:.4f} nats/char = {s['test_bpc']:.4f} bits/char")
    if s.get("token_cosine"):
        cos = s["token_cosine"]  # [L + 1]: the stack's input, then after each layer
        # Deep stacks (deep1000) show about a dozen evenly spaced layers, each labelled with its index.
        shown = (
            sorted({round(i * (len(cos) - 1) / 12) for i in range(13)}) if len(cos) > 13 else range(len(cos))
        )
        lines.append("  token cosine     " + " ".join(f"{i}:{cos[i]:.3f}" for i in shown))
        lines.append("                   (layer: mean pairwise token cosine at the last step; 0 = input)")
    rate = f"{s['steps_per_sec']:.1f} steps/s, " if s.get("steps_per_sec") else ""
    d = s["devices"]
    lines.append(
        f"  time             {s['wall_time_s']:.1f} s ({rate}{d['count']} {d['platform']} device(s), "
        f"{d['processes']} process(es))"
    )
    lines.append(f"  files            {wd / 'summary.json'}\n                   {wd / 'metrics.jsonl'}")
    lines.append(f"                   {wd / 'curves.png'}\n                   {wd / 'checkpoints'}/")
    print("\n".join(lines), flush=True)


def usage() -> str:
    verbs = "\n".join(f"  {v:8s} {h}" for v, h in VERBS.items())
    return f"usage: jaxsmooth <command> [args]\n\ncommands:\n{verbs}\n\n'jaxsmooth train --help' for details."


def main(argv: list[str] | None = None) -> int:
    """Run a verb. From the command line (argv None), `train` first re-executes itself under a caching
    memory allocator when one is installed (`jaxsmooth.runtime`); a call with an explicit argv never does."""
    from_command_line = argv is None
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if argv else 2
    verb, rest = argv[0], argv[1:]
    if verb == "train":
        if from_command_line and not ({"-h", "--help"} & set(rest)):
            from jaxsmooth import runtime

            try:
                runtime.reexec_with_caching_allocator(argv)
            except ValueError as e:
                print(f"jaxsmooth: {e}", file=sys.stderr)
                return 2
        return train_main(rest)
    if verb == "audit":
        from jaxsmooth import audit  # lazily: written separately, imports its own dependencies

        return int(audit.main(rest) or 0)
    print(f"jaxsmooth: unknown command {verb!r}\n\n{usage()}", file=sys.stderr)
    return 2
