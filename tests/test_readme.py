"""The README's Python examples run as written, each in a fresh interpreter (so an example that only works
because an earlier one imported something fails here)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

BLOCKS = re.findall(r"```python\n(.*?)```", (Path(__file__).parents[1] / "README.md").read_text(), re.S)


def test_readme_has_examples():
    assert len(BLOCKS) >= 3


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs_alone(index):
    code = BLOCKS[index]
    if "block.attn.eigenvalues()" in code:  # the NNX example: check what its comment promises
        code += "\nassert float(block.attn.eigenvalues().max()) < 0 and bool(jnp.all(jnp.isfinite(y)))\n"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"README example {index} failed:\n{proc.stderr[-3000:]}"
