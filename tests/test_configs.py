"""Every packaged config loads (with and without `quick`; by file path as config_flags does, and from the
package jaxsmooth.configs), passes the trainer's checks and converts to a valid ModelConfig; every field
is commented (once, in jaxsmooth/configs/_common.py, and where a config sets it); the CLI resolves names and
applies
config_flags overrides; bad values fail before any work with the field's name."""

import ast
import importlib
import importlib.util
import io
import tokenize

import pytest

from jaxsmooth import configs, train
from jaxsmooth.config import ModelConfig
from jaxsmooth.tools import cli

NAMES = ["cifar10", "cifar100", "deep1000", "digits", "fashion_mnist", "mnist", "shakespeare_char"]


def load(name: str, arg: str | None = None):
    """By file path, as ml_collections.config_flags loads a config (no parent package): the module and
    its config."""
    spec = importlib.util.spec_from_file_location(f"cfg_{name}", configs.directory() / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, module.get_config(arg)


def common_module():
    return importlib.import_module("jaxsmooth.configs._common")


def comment_lines(source: str) -> set[int]:
    return {
        tok.start[0]
        for tok in tokenize.generate_tokens(io.StringIO(source).readline)
        if tok.type == tokenize.COMMENT
    }


def commented(node: ast.AST, comments: set[int]) -> bool:
    return bool(comments & set(range(node.lineno, node.end_lineno + 1)))


def test_all_configs_are_listed():
    assert cli.config_names() == NAMES


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("arg", [None, "quick", "quick,mode=none", "mode=smooth"])
def test_config_loads_and_validates(name, arg):
    module, c = load(name, arg)
    mcfg = train.check_config(c)  # the trainer's pre-flight checks (no data needed)
    assert isinstance(mcfg, ModelConfig)
    assert mcfg == ModelConfig.from_dict(c.model.to_dict())
    assert (mcfg.spectrum is None) == (arg is not None and "mode=none" in arg)
    assert c.opt.decay_steps == c.train.steps  # the schedule follows train.steps
    assert c.name and set(c) == {"name", "model", "data", "opt", "train"}
    assert f"--config {name}" in module.__doc__  # the exact command is in the docstring
    c.train.steps = 123
    assert c.opt.decay_steps == 123  # ... also when train.steps is changed afterwards
    for ref in (c.model.spectrum.get_ref("lo"), c.model.spectrum.get_ref("hi")):
        assert ref.get_type() is float and ref.get() is None  # typed placeholders: settable from the CLI


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("arg", [None, "quick"])
def test_config_loads_by_path_and_from_the_package(name, arg):
    path_module, by_path = load(name, arg)
    module = importlib.import_module(f"jaxsmooth.configs.{name}")
    from_package = module.get_config(arg)
    assert module.common is path_module.common is common_module()
    resolved = cli.resolve_config(name + (f":{arg}" if arg else ""))  # what `--config NAME[:ARGS]` loads
    assert resolved.startswith(str(cli.configs_dir() / f"{name}.py"))
    via_cli, _, _ = cli.parse_train_args(["--config", resolved])  # config_flags: by path
    want = by_path.to_json_best_effort(sort_keys=True)
    assert from_package.to_json_best_effort(sort_keys=True) == want
    assert via_cli.to_json_best_effort(sort_keys=True) == want


def test_a_copied_config_loads_anywhere(tmp_path):
    """A copy of a packaged config outside jaxsmooth/configs/ (`--config path/to/my_config.py`) uses the
    package."""
    copy = tmp_path / "my_config.py"
    copy.write_text((cli.configs_dir() / "cifar100.py").read_text())
    config, _, _ = cli.parse_train_args([f"--config={copy}:quick", "--config.train.steps=5"])
    assert config.name == "cifar100_quick" and config.opt.decay_steps == 5


def test_cifar100_is_cifar10_with_other_data():
    for arg in (None, "quick,mode=none,depth=3,fraction=0.5,dir=/data/cifar"):
        c10, c100 = load("cifar10", arg)[1].to_dict(), load("cifar100", arg)[1].to_dict()
        assert c100["data"].pop("name") == "cifar100" and c10["data"].pop("name") == "cifar10"
        assert c100.pop("name").startswith("cifar100") and c10.pop("name").startswith("cifar10")
        assert c10 == c100


@pytest.mark.parametrize("name", NAMES)
def test_quick_is_smaller(name):
    _, full = load(name)
    _, quick = load(name, "quick")
    assert quick.train.steps < full.train.steps
    assert quick.model.depth * quick.model.d_model <= full.model.depth * full.model.d_model


def test_every_shared_field_is_commented_once():
    source = (cli.configs_dir() / "_common.py").read_text()
    comments = comment_lines(source)
    fields, uncommented = {}, []
    for fn in ast.parse(source).body:
        if not isinstance(fn, ast.FunctionDef):
            continue
        for node in ast.walk(fn):
            if isinstance(node, ast.Assign) and ast.unparse(node.targets[0]).startswith("c."):
                field = ast.unparse(node.targets[0])[2:]
                fields.setdefault(fn.name, []).append(field)
                if not commented(node, comments):
                    uncommented.append(f"{fn.name}: {field}")
    assert not uncommented, uncommented
    assert all(len(set(f)) == len(f) for f in fields.values())  # each field set once
    assert sum(map(len, fields.values())) > 40
    # Every field of every config is one of these (so none escapes the comments).
    sections = {"config": (), "model": ("model",), "spectrum": ("model", "spectrum")}
    sections |= {"data": ("data",), "train": ("train",), "opt": ("opt",)}
    for name in NAMES:
        for arg in (None, "quick"):
            c = load(name, arg)[1]
            for fn, path in sections.items():
                section = c
                for key in path:
                    section = section[key]
                assert set(section) == set(fields[fn]), (name, arg, fn)


@pytest.mark.parametrize("name", NAMES)
def test_every_field_a_config_sets_has_a_comment(name):
    source = (cli.configs_dir() / f"{name}.py").read_text()
    comments = comment_lines(source)
    settings = []  # keyword (and non-variable positional) arguments of calls to the _common builders
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and ast.unparse(node.func).startswith("common."):
            settings += node.keywords + [a for a in node.args if not isinstance(a, ast.Name)]
    assert settings
    uncommented = [ast.unparse(n) for n in settings if not commented(n, comments)]
    assert not uncommented, uncommented
    assigned = [ast.unparse(n.targets[0]) for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Assign)]
    assert not [a for a in assigned if a.startswith("c.")]  # fields are set through the builders only


def test_parse_args():
    parse = common_module().parse_args
    known = {"quick": False, "mode": "sharpen", "depth": int, "fraction": 1.0}
    assert parse(None, known) == {"quick": False, "mode": "sharpen", "fraction": 1.0}
    assert parse("quick,mode=smooth,depth=12,fraction=0.5", known) == {
        "quick": True, "mode": "smooth", "depth": 12, "fraction": 0.5
    }  # fmt: skip
    assert parse("quick=0,depth=3", known) == {"quick": False, "mode": "sharpen", "fraction": 1.0, "depth": 3}
    with pytest.raises(
        ValueError, match=r"unknown config args \['quik'\]; known: quick, mode=..., depth=..."
    ):
        parse("quik", known)
    with pytest.raises(ValueError, match="depth='twelve': expected int"):
        parse("depth=twelve", known)
    with pytest.raises(ValueError, match="mode needs a value"):
        parse("mode", known)


def test_misspelt_builder_field_is_rejected():
    common = common_module()
    with pytest.raises(TypeError, match="config section model has no field 'dpeth'"):
        common.model(depth=2, d_model=8, num_heads=2, spectrum=common.spectrum("sharpen"), dpeth=3)


def test_unknown_config_arg_is_rejected():
    with pytest.raises(ValueError, match="unknown config args"):
        load("digits", "quik")


def test_cli_resolves_names_and_overrides():
    config, workdir, dist = cli.parse_train_args(
        ["--config", "digits:quick", "--workdir", "/tmp/x", "--config.train.steps=7",
         "--config.model.spectrum.mode=smooth", "--config.model.spectrum.hi=0.5", "--config.model.depth=3"]
    )  # fmt: skip
    assert workdir == "/tmp/x" and dist["coordinator_address"] is None
    assert config.train.steps == 7 and config.opt.decay_steps == 7
    assert config.model.spectrum.mode == "smooth" and config.model.spectrum.hi == 0.5
    assert config.model.depth == 3 and config.name == "digits_quick"
    mcfg = train.check_config(config)
    assert mcfg.spectrum.hi == 0.5 and mcfg.depth == 3


def test_cli_default_config_is_digits():
    config, workdir, _ = cli.parse_train_args([])
    assert config.name == "digits" and workdir is None


@pytest.mark.parametrize("name", NAMES)
def test_cli_config_file_path_with_args(name):
    path = str(cli.configs_dir() / f"{name}.py")
    config, _, _ = cli.parse_train_args(
        [f"--config={path}:quick,mode=none", "--config.train.steps=7", "--config.model.spectrum.lo=-0.5"]
    )
    assert config.name == f"{name}_quick" and config.model.spectrum.mode == "none"
    assert config.train.steps == 7 and config.opt.decay_steps == 7
    assert config.model.spectrum.lo == -0.5 and config.model.spectrum.hi is None


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["--config", "nosuch"], "unknown config 'nosuch'"),
        (["--config.model.nosuch=1"], "nosuch"),
        (["--frobnicate"], "frobnicate"),
    ],
)
def test_cli_bad_arguments(argv, needle, capsys):
    assert cli.main(["train", *argv]) == 2
    assert needle in capsys.readouterr().err


def test_cli_unknown_command_lists_commands(capsys):
    assert cli.main(["frobnicate"]) == 2
    err = capsys.readouterr().err
    assert "unknown command 'frobnicate'" in err and "train" in err and "audit" in err


@pytest.mark.parametrize(
    "override,field",
    [
        ("--config.model.num_heads=3", "model.num_heads"),  # does not divide d_model=32
        ("--config.data.patch_size=3", "data.patch_size"),  # does not divide the 8x8 digits
        ("--config.model.spectrum.mode=sideways", "spectrum.mode"),
        ("--config.train.steps=-5", "train.steps"),
        ("--config.data.name=imagenet", "data.name"),
        ("--config.opt.schedule=exp", "opt.schedule"),
        ("--config.train.checkpoint_every=0", "train.checkpoint_every"),
    ],
)
def test_bad_config_fails_before_any_work_naming_the_field(override, field, tmp_path, capsys):
    workdir = tmp_path / "run"
    assert cli.main(["train", "--config", "digits:quick", "--workdir", str(workdir), override]) == 2
    assert field in capsys.readouterr().err
    assert not workdir.exists()  # nothing was created, let alone trained
