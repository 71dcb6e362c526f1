"""Packaged run configs, shipped as `jaxsmooth.configs` (see pyproject's [tool.setuptools.package-dir]).

Each `<name>.py` defines `get_config(arg: str | None) -> ml_collections.ConfigDict` and is loaded by
file path (ml_collections.config_flags) or imported from this package. The configs build their sections
with `jaxsmooth.configs._common` (the _common.py beside them where the package is not installed) and
state only what differs. `jaxsmooth train --config <name>[:args]` resolves a name here; `jaxsmooth train
--help` lists them (names starting with `_` are not configs).
"""
