"""The `jaxsmooth train` command line, parsed: config file or packaged name, `--config.a.b=value`
overrides (ml_collections.config_flags), workdir and multi-process flags. Shared by the CLI and the study
runner (which checks each cell's command as `jaxsmooth train` would)."""

from __future__ import annotations

import re

from jaxsmooth import configs

DEFAULT_CONFIG = "digits"


class UsageError(ValueError):
    """A bad command line or config file (exit status 2)."""


def resolve_config(spec: str) -> str:
    """`NAME[:ARGS]` of a packaged config -> `/path/NAME.py[:ARGS]`; file paths are returned unchanged."""
    try:
        return configs.resolve(spec)
    except configs.ConfigError as e:
        raise UsageError(str(e)) from None


def load_config_file(spec: str):
    """Run a resolved `FILE[:ARGS]`'s get_config as config_flags will, so that a broken file fails with
    one line naming it (config_flags prints a long traceback). Returns the ConfigDict."""
    try:
        return configs.load(spec)
    except configs.ConfigError as e:
        raise UsageError(str(e)) from None


def check_overrides(config, argv: list[str]) -> None:
    """Every `--config.a.b=v` must name a field of the config; raise UsageError naming the unknown one
    and the fields that exist there (config_flags reports only `AttributeError: "'b'"`)."""
    for a in argv:
        m = re.match(r"^--?config\.([^=]+)(=|$)", a)
        if not m:
            continue
        node, done = config, []
        for part in m.group(1).split("."):
            keys = list(node.keys()) if hasattr(node, "keys") else None
            if keys is None:
                raise UsageError(f"{a.split('=')[0]}: {'.'.join(done)} is a value, not a section")
            if part not in keys:
                where = ".".join(done) or "the config"
                raise UsageError(
                    f"unknown config field {'.'.join([*done, part])!r} in {a.split('=')[0]}; "
                    f"{where} has: {', '.join(keys)}"
                )
            node, done = node[part], [*done, part]


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
    return parse_train_options(argv)[:3]


def parse_train_options(argv: list[str]):
    """`parse_train_args` plus {"restart": bool, "print_config": bool}."""
    from absl import flags
    from ml_collections import config_flags

    argv = ["jaxsmooth train"] + _normalise_config_flag(list(argv))
    given = [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
    spec = given[-1] if given else resolve_config(DEFAULT_CONFIG)  # absl: the last --config wins
    check_overrides(load_config_file(spec), argv)
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file(
        "config", resolve_config(DEFAULT_CONFIG), "config file or packaged config name", flag_values=fv,
        lock_config=True, sys_argv=argv,
    )  # fmt: skip
    flags.DEFINE_string("workdir", None, "output directory", flag_values=fv)
    flags.DEFINE_string("coordinator_address", None, "multi-process: host:port of process 0", flag_values=fv)
    flags.DEFINE_integer("num_processes", None, "multi-process: number of processes", flag_values=fv)
    flags.DEFINE_integer("process_id", None, "multi-process: this process's id", flag_values=fv)
    flags.DEFINE_boolean("restart", False, "start over from step 0 (previous files kept)", flag_values=fv)
    flags.DEFINE_boolean("print_config", False, "print the resolved config and exit", flag_values=fv)
    flags.DEFINE_alias("dry_run", "print_config", flag_values=fv)
    rest = fv(argv)
    if len(rest) > 1:
        raise flags.Error(f"unexpected arguments {rest[1:]}")
    dist = {k: fv[k].value for k in ("coordinator_address", "num_processes", "process_id")}
    options = {"restart": fv.restart, "print_config": fv.print_config}
    return fv.config, fv.workdir, dist, options
