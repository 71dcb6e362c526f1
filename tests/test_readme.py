"""The README's Python examples run as written."""

import re
from pathlib import Path


def test_readme_examples_run():
    text = (Path(__file__).parents[1] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(blocks) >= 3
    namespace: dict = {}
    exec(compile("\n".join(blocks), "README.md", "exec"), namespace)  # noqa: S102
    assert float(namespace["block"].attn.eigenvalues().max()) < 0
