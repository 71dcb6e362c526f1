"""Packaged run configs (`jaxsmooth.configs`).

Each `<name>.py` defines `get_config(arg: str | None) -> ml_collections.ConfigDict` and is loaded by
file path (ml_collections.config_flags) or imported from this package. The configs build their sections
with `jaxsmooth.configs._common` and state only what differs. `jaxsmooth train --config <name>[:args]`
resolves a name here; `jaxsmooth train
--help` lists them (names starting with `_` are not configs).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ml_collections


class ConfigError(ValueError):
    """A config that cannot be found or loaded; the message names it and what would fix it."""


def directory() -> Path:
    """The folder of the packaged configs."""
    return Path(__file__).parent


def names() -> list[str]:
    """The packaged configs' names (`digits`, `deep1000`, ...), sorted."""
    return sorted(p.stem for p in directory().glob("*.py") if not p.stem.startswith("_"))


def resolve(spec: str) -> str:
    """`NAME[:ARGS]` of a packaged config -> `/path/NAME.py[:ARGS]`; file paths are returned unchanged.

    Raises ConfigError for a file that does not exist or an unknown name."""
    name, sep, args = spec.partition(":")
    if name.endswith(".py") or "/" in name or Path(name).is_file():
        if not Path(name).is_file():
            raise ConfigError(
                f"config file {name} does not exist; give a config file or one of {', '.join(names())}"
            )
        return spec
    path = directory() / f"{name}.py"
    if not path.is_file():
        raise ConfigError(f"unknown config {name!r}: not a file, and not one of {', '.join(names())}")
    return f"{path}{sep}{args}"


def load(spec: str = "digits", overrides: Mapping[str, Any] | None = None) -> ml_collections.ConfigDict:
    """A run config, loaded by file path as `jaxsmooth train --config SPEC` (ml_collections.config_flags)
    loads it, then `overrides` applied.

    Args:
      spec: a packaged config's name or a config file, each with optional args after a colon
        (`"digits:quick"`, `"path/to/my_config.py:mode=smooth"`).
      overrides: dotted fields to set, as `--config.train.steps=200` would (`{"train.steps": 200}`).
    Returns:
      The ml_collections.ConfigDict.
    Raises:
      ConfigError naming the file and the problem (missing file, syntax error, no get_config, a bad arg,
      an unknown override field).

    Example::

      config = jaxsmooth.configs.load("digits:quick", {"train.steps": 50})
    """
    path, _, arg = resolve(spec).partition(":")
    module_spec = importlib.util.spec_from_file_location("jaxsmooth_user_config", path)
    if module_spec is None or module_spec.loader is None:
        raise ConfigError(f"config file {path} is not a Python file")
    try:
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        if not hasattr(module, "get_config"):
            raise ConfigError(f"config file {path} has no get_config() function")
        config = module.get_config(arg) if arg else module.get_config()
    except ConfigError:
        raise
    except SyntaxError as e:
        raise ConfigError(f"config file {path} has a syntax error at line {e.lineno}: {e.msg}") from None
    except (ValueError, TypeError) as e:  # the packaged configs' argument and field checks
        raise ConfigError(f"--config {Path(path).name}{':' + arg if arg else ''}: {e}") from None
    except Exception as e:  # noqa: BLE001 - a user's file can raise anything
        tb, line = e.__traceback__, None
        while tb is not None:  # the deepest frame inside the config file
            if tb.tb_frame.f_code.co_filename == str(path):
                line = tb.tb_lineno
            tb = tb.tb_next
        where = f" (line {line})" if line else ""
        raise ConfigError(f"config file {path} failed{where}: {type(e).__name__}: {e}") from None
    for dotted, value in (overrides or {}).items():
        *parents, field = dotted.split(".")
        node = config
        for i, key in enumerate(parents):
            if key not in node:
                raise ConfigError(
                    f"override {dotted}: the config has no section {'.'.join(parents[: i + 1])}"
                )
            node = node[key]
        if field not in node:
            raise ConfigError(f"override {dotted}: no such field; fields there: {', '.join(node)}")
        node[field] = value
    return config
