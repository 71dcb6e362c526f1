"""Public functions and classes carry Flax-style docstrings with `Args:` / `Returns:` sections.

For every public (no leading `_`) function and class a module defines, and every public method a public
class defines itself (dunders, properties and whatever it inherits, e.g. from flax.nnx, are skipped):

- a docstring exists;
- it has an `Args:` section when the callable takes parameters other than self / cls (a `*args` /
  `**kwargs`-only passthrough needs none); a class documents its constructor's parameters under `Args:`
  or `Attributes:` (dataclasses);
- it has a `Returns:` section (`Yields:` for a generator) when its source returns a value
  (`return <value>`, read with `ast`; nested functions and `return None` do not count).

Every offender is listed in one failure message as `module.name: missing ...`. The `Example::` sections
are run as doctests, so they stay true. To cover another module, add its name to `MODULES`.
"""

from __future__ import annotations

import ast
import dataclasses
import doctest
import functools
import importlib
import inspect
import re
import textwrap
from types import ModuleType

import pytest

MODULES = [
    # core
    "jaxsmooth.config",
    "jaxsmooth.spectral",
    "jaxsmooth.attention",
    "jaxsmooth.metrics",
    "jaxsmooth.theory",
    "jaxsmooth.linalg",
    # modules
    "jaxsmooth.nnx.layers",
    "jaxsmooth.nnx.transformer",
    "jaxsmooth.nnx.models",
    "jaxsmooth.nnx.variables",
    "jaxsmooth.linen",
]

# A section header on a line of its own; "Args (attributes):" also counts as an Args section.
_ARGS = re.compile(r"^\s*Args( \([^)]*\))?:\s*$", re.MULTILINE)
_ATTRIBUTES = re.compile(r"^\s*Attributes:\s*$", re.MULTILINE)
_RETURNS = re.compile(r"^\s*Returns:\s*$", re.MULTILINE)
_YIELDS = re.compile(r"^\s*Yields:\s*$", re.MULTILINE)


def _function(obj):
    """The plain Python function behind obj (jax.jit, jax.custom_jvp, functools.cache all keep
    `__wrapped__`), or None when obj is not a function."""
    fn = inspect.unwrap(obj)
    return fn if inspect.isfunction(fn) else None


def _needs_args(fn, skip_first: bool) -> bool:
    params = list(inspect.signature(fn).parameters.values())
    if skip_first and params:
        params = params[1:]  # self / cls
    variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    return any(p.kind not in variadic for p in params)


def _body_nodes(fn_node):
    """The nodes of a function's body, not descending into nested functions, lambdas or classes."""
    stack = list(fn_node.body)
    while stack:
        node = stack.pop()
        yield node
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef | ast.Lambda):
            stack.extend(ast.iter_child_nodes(node))


def _returns_value(fn) -> tuple[bool, bool]:
    """(returns a value, is a generator), read from fn's source."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    node = next(n for n in tree.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef))
    returns = yields = False
    for n in _body_nodes(node):
        if isinstance(n, ast.Return) and n.value is not None:
            returns |= not (isinstance(n.value, ast.Constant) and n.value.value is None)
        yields |= isinstance(n, ast.Yield | ast.YieldFrom)
    return returns, yields


def function_problems(fn, *, method: bool = False) -> list[str]:
    """What the docstring of function fn lacks: "docstring", "Args", "Returns" (empty: nothing)."""
    doc = inspect.getdoc(fn)
    if not doc:
        return ["docstring"]
    missing = []
    if _needs_args(fn, skip_first=method) and not _ARGS.search(doc):
        missing.append("Args")
    returns, yields = _returns_value(fn)
    if yields and not (_YIELDS.search(doc) or _RETURNS.search(doc)):
        missing.append("Yields")
    elif returns and not yields and not _RETURNS.search(doc):
        missing.append("Returns")
    return missing


def _constructor(cls):
    """The function whose parameters a class's docstring documents: a dataclass's generated __init__,
    or an __init__ the class defines itself; None when it inherits its constructor."""
    if dataclasses.is_dataclass(cls) or "__init__" in vars(cls):
        return _function(cls.__init__)
    return None


def class_problems(cls) -> list[str]:
    """What the docstring of class cls lacks: "docstring", or "Args/Attributes" for its constructor."""
    doc = cls.__doc__
    if not doc or doc.strip().startswith(f"{cls.__name__}("):  # a dataclass's generated signature
        return ["docstring"]
    init = _constructor(cls)
    if init is not None and _needs_args(init, skip_first=True):
        if not (_ARGS.search(doc) or _ATTRIBUTES.search(doc)):
            return ["Args/Attributes"]
    return []


def _methods(cls, module_name: str):
    """(name, function, is a bound method) for the public methods cls defines itself (no properties)."""
    for name, attr in vars(cls).items():
        if name.startswith("_") or isinstance(attr, property | functools.cached_property):
            continue
        bound = not isinstance(attr, staticmethod)
        fn = _function(attr.__func__ if isinstance(attr, staticmethod | classmethod) else attr)
        if fn is not None and fn.__module__ == module_name:
            yield name, fn, bound


def offenders(module: ModuleType) -> list[str]:
    """`module.name: missing ...` for every public function, class and method of module that lacks a
    required docstring section."""
    out = []

    def report(name, missing):
        if missing:
            out.append(f"{module.__name__}.{name}: missing {', '.join(missing)}")

    for name, obj in vars(module).items():
        if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue  # private, or imported from elsewhere
        if inspect.isclass(obj):
            report(name, class_problems(obj))
            for meth_name, fn, bound in _methods(obj, module.__name__):
                report(f"{name}.{meth_name}", function_problems(fn, method=bound))
        elif (fn := _function(obj)) is not None:
            report(name, function_problems(fn))
    return out


def test_public_api_has_args_and_returns_sections():
    bad = [line for name in MODULES for line in offenders(importlib.import_module(name))]
    assert not bad, "no Args: / Returns: sections (docs/design.md, Layout):\n" + "\n".join(bad)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    """The `Example::` sections are doctests: run them, so an example never drifts from the code."""
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} of {result.attempted} doctest examples of {name} failed"


# ------------------------------------------------------------ controls: the checker flags what it should


def _bare(x, y):
    """Adds two numbers."""
    return x + y


def _documented(x, y):
    """Adds two numbers.

    Args:
      x: a number.
      y: another.

    Returns:
      x + y.
    """
    return x + y


def _procedure(*args, **kwargs):
    """Passes everything on; returns nothing (a nested function's return does not count)."""

    def inner():
        return 1

    inner()
    return None


class _Undocumented:
    def __init__(self, n):
        self.n = n

    def twice(self):
        """Twice n."""
        return 2 * self.n


def test_the_checker_flags_missing_sections():
    assert function_problems(_bare) == ["Args", "Returns"]
    assert function_problems(_documented) == []
    assert function_problems(_procedure) == []
    assert function_problems(lambda: None) == ["docstring"]
    assert class_problems(_Undocumented) == ["docstring"]
    assert [(n, function_problems(f, method=b)) for n, f, b in _methods(_Undocumented, __name__)] == [
        ("twice", ["Returns"])
    ]


def test_offenders_lists_every_offender(monkeypatch):
    """The module-level report names each offender as `module.name: missing ...`."""
    module = ModuleType("probe")
    for name, obj in (("bare", _bare), ("documented", _documented), ("Undocumented", _Undocumented)):
        monkeypatch.setattr(obj, "__module__", "probe")
        setattr(module, name, obj)
    monkeypatch.setattr(_Undocumented.twice, "__module__", "probe")
    assert offenders(module) == [
        "probe.bare: missing Args, Returns",
        "probe.Undocumented: missing docstring",
        "probe.Undocumented.twice: missing Returns",
    ]
