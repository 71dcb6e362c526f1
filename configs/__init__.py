"""Packaged run configs, shipped as `jaxsmooth.configs` (see pyproject's [tool.setuptools.package-dir]).

Each `<name>.py` defines `get_config(arg: str | None) -> ml_collections.ConfigDict` and is loaded by
file path (ml_collections.config_flags), so configs never import each other. `jaxsmooth train --config
<name>[:args]` resolves a name here; `jaxsmooth train --help` lists them.
"""
