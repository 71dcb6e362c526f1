"""The packages are the layers, and imports point one way only (docs/design.md, "Layout"):

    core (jaxsmooth/*.py) <- modules (jaxsmooth.nnx, jaxsmooth.linen) | data (jaxsmooth.data, .configs)
                          <- trainer (jaxsmooth.train) <- tools (jaxsmooth.tools)

Read from the source (every import statement, also those inside functions), so a lazy import cannot hide
an upward dependency. Also: no import cycles between modules, no module reaching into another module's
private (`_name`) names, and nothing inside the package importing a moved module by its old path.
"""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest

import jaxsmooth

ROOT = Path(jaxsmooth.__file__).parent
CORE = {"jaxsmooth", "config", "spectral", "attention", "metrics", "theory", "linalg"}
# Each group and its rank: a module may import its own group, and groups of a lower rank (`python -m
# jaxsmooth`, the entry point, sits above the tools).
RANK = {"__main__": 4, "core": 0, "nnx": 1, "linen": 1, "data": 1, "configs": 1, "train": 2, "tools": 3}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def group(name: str) -> str:
    parts = name.split(".")
    if len(parts) == 1 or parts[1] in CORE:
        return "core"
    return parts[1]


def is_package(name: str) -> bool:
    return (ROOT.parent / name.replace(".", "/") / "__init__.py").is_file()


def resolve(name: str) -> str:
    """A dotted name under jaxsmooth -> the module that holds it (`jaxsmooth.train.train` -> the package)."""
    while name.count(".") and not (
        is_package(name) or (ROOT.parent / f"{name.replace('.', '/')}.py").is_file()
    ):
        name = name.rsplit(".", 1)[0]
    return name


def imports(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, imported module, names taken from it) for every jaxsmooth import in a file."""
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name, []) for a in node.names if a.name.split(".")[0] == "jaxsmooth"]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            if base.split(".")[0] != "jaxsmooth":
                continue
            names = [a.name for a in node.names]
            for n in names:  # `from jaxsmooth.train import checkpoint`: the submodule is imported
                sub = f"{base}.{n}"
                if is_package(sub) or (ROOT.parent / f"{sub.replace('.', '/')}.py").is_file():
                    out.append((node.lineno, sub, []))
                else:
                    out.append((node.lineno, base, [n]))
    return out


FILES = sorted(ROOT.rglob("*.py"))


def edges():
    for path in FILES:
        me = module_name(path)
        for line, target, names in imports(path):
            yield path, me, line, target, names


def test_imports_point_down_the_layers():
    bad = []
    for path, me, line, target, _ in edges():
        if jaxsmooth.MOVED.get(target):
            continue  # reported by the next test
        mine, theirs = group(me), group(resolve(target))
        if mine != theirs and RANK[theirs] >= RANK[mine]:
            bad.append(f"{path.relative_to(ROOT.parent)}:{line}: {mine} imports {theirs} ({target})")
    assert not bad, "upward or sideways imports:\n" + "\n".join(bad)


def test_no_old_module_paths_inside_the_package():
    bad = [
        f"{path.relative_to(ROOT.parent)}:{line}: {target} (now {jaxsmooth.MOVED[target]})"
        for path, _, line, target, _ in edges()
        if target in jaxsmooth.MOVED
    ]
    assert not bad, "\n".join(bad)


def test_no_cross_module_private_names():
    bad = []
    for path in FILES:
        me = module_name(path)
        aliases = {}  # local name -> jaxsmooth module
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("jaxsmooth"):
                for a in node.names:
                    target = f"{node.module}.{a.name}"
                    private = a.name.startswith("_") and not a.name.startswith("__")
                    # A private module of the same package (configs/_common.py) is the package's own.
                    own = resolve(target) == target and target.rsplit(".", 1)[0] == me.rsplit(".", 1)[0]
                    if private and resolve(target) != me and not own:
                        bad.append(f"{path.relative_to(ROOT.parent)}:{node.lineno}: imports {target}")
                    if resolve(target) == target:
                        aliases[a.asname or a.name] = target
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.startswith("jaxsmooth") and a.asname:
                        aliases[a.asname] = a.name
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in aliases
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
            ):
                bad.append(
                    f"{path.relative_to(ROOT.parent)}:{node.lineno}: {aliases[node.value.id]}.{node.attr}"
                )
    assert not bad, "private names used across modules:\n" + "\n".join(bad)


def test_no_import_cycles():
    graph: dict[str, set[str]] = {}
    for _, me, _, target, _ in edges():
        target = resolve(jaxsmooth.MOVED.get(target, target))
        if target != me and not me.startswith(target + "."):  # a module may import its own package
            graph.setdefault(me, set()).add(target)
    seen, stack, cycles = set(), [], []

    def visit(node):
        if node in stack:
            cycles.append(" -> ".join([*stack[stack.index(node) :], node]))
            return
        if node in seen:
            return
        seen.add(node)
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            visit(nxt)
        stack.pop()

    for node in sorted(graph):
        visit(node)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


@pytest.mark.parametrize("old", sorted(jaxsmooth.MOVED))
def test_old_import_paths_still_work(old):
    """Users' code and the README's keep importing the moved modules by their old paths."""
    module = importlib.import_module(old)
    assert module is importlib.import_module(jaxsmooth.MOVED[old])
    assert getattr(jaxsmooth, old.split(".")[1]) is module


def test_the_checker_catches_what_it_forbids(tmp_path, monkeypatch):
    """Control: an upward import and a private import in a core module are reported."""
    fake = ROOT / "_layout_probe.py"
    assert not fake.exists()
    fake.write_text("from jaxsmooth.train import trainer\nfrom jaxsmooth.spectral import _private\n")
    try:
        monkeypatch.setattr(__import__(__name__), "FILES", [fake])
        CORE.add("_layout_probe")
        with pytest.raises(AssertionError, match="core imports train"):
            test_imports_point_down_the_layers()
        with pytest.raises(AssertionError, match="_private"):
            test_no_cross_module_private_names()
    finally:
        CORE.discard("_layout_probe")
        fake.unlink()


# Functions allowed past MAX_LINES, each with its reason (none today).
LONG_FUNCTIONS: dict[str, str] = {}
MAX_LINES = 80


def test_no_function_is_over_80_lines():
    """Code lines of every function in the package (its docstring not counted), nested ones included."""
    long = []
    for path in FILES:
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            n = node.end_lineno - node.lineno + 1
            doc = node.body[0] if node.body and isinstance(node.body[0], ast.Expr) else None
            if doc is not None and isinstance(doc.value, ast.Constant) and isinstance(doc.value.value, str):
                n -= doc.end_lineno - doc.lineno + 1
            name = f"{module_name(path)}.{node.name}"
            if n > MAX_LINES and name not in LONG_FUNCTIONS:
                long.append(f"{path.relative_to(ROOT.parent)}:{node.lineno}: {node.name} ({n} lines)")
    assert not long, "functions over 80 lines (split them, or list them with a reason):\n" + "\n".join(long)
