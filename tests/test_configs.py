"""Every packaged config loads (with and without `quick`), passes the trainer's checks and converts to a
valid ModelConfig; every field is commented; the CLI resolves names and applies config_flags overrides;
bad values fail before any work with the field's name."""

import ast
import importlib.util
import io
import tokenize

import pytest

from jaxsmooth import cli, train
from jaxsmooth.config import ModelConfig

NAMES = ["cifar10", "cifar100", "deep1000", "digits", "fashion_mnist", "mnist", "shakespeare_char"]


def load(name: str, arg: str | None = None):
    spec = importlib.util.spec_from_file_location(f"cfg_{name}", cli.configs_dir() / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, module.get_config(arg)


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


@pytest.mark.parametrize("name", NAMES)
def test_quick_is_smaller(name):
    _, full = load(name)
    _, quick = load(name, "quick")
    assert quick.train.steps < full.train.steps
    assert quick.model.depth * quick.model.d_model <= full.model.depth * full.model.d_model


@pytest.mark.parametrize("name", NAMES)
def test_every_field_has_a_comment(name):
    source = (cli.configs_dir() / f"{name}.py").read_text()
    comment_lines = {
        tok.start[0]
        for tok in tokenize.generate_tokens(io.StringIO(source).readline)
        if tok.type == tokenize.COMMENT
    }
    fields = [
        node
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Assign) and ast.unparse(node.targets[0]).startswith("c.")
    ]
    assert len(fields) > 40
    uncommented = [
        ast.unparse(n.targets[0])
        for n in fields
        if not comment_lines & set(range(n.lineno, n.end_lineno + 1))
    ]
    assert not uncommented, uncommented


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


def test_cli_config_file_path_with_args():
    path = str(cli.configs_dir() / "mnist.py")
    config, _, _ = cli.parse_train_args([f"--config={path}:quick,mode=none"])
    assert config.name == "mnist_quick" and config.model.spectrum.mode == "none"


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
