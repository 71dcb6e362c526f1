"""Sharded parameters (jaxsmooth.train.parallel): every parameter of every model variant has logical names
that
each rule set maps to a valid mesh spec; invalid specs are refused naming the parameter; and with 4
emulated CPU devices, a spectral ViT trained with its parameters (and Adam moments) split tensor-parallel
over a ("data", "model") = (2, 2) mesh logs the losses of the unsharded run, as does the trainer with
train.param_sharding="fsdp_tp". Device counts are fixed at JAX start-up, hence the subprocess."""

import json
import os
import subprocess
import sys
import textwrap

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import XLA_CACHE_ENV
from flax import nnx
from jax.sharding import PartitionSpec as P

from jaxsmooth import Spectrum, train
from jaxsmooth.config import ModelConfig
from jaxsmooth.nnx import CausalLM, ViT
from jaxsmooth.tools import cli
from jaxsmooth.train import parallel

MESH = {"data": 2, "model": 2}
VARIANTS = [
    ("vit", None, "none"),
    ("vit", Spectrum("sharpen"), "featscale"),
    ("vit", Spectrum("smooth", basis="general"), "attnscale"),
    ("lm", None, "attnscale"),
    ("lm", Spectrum("neutral", basis="general"), "featscale"),
    ("lm", Spectrum("free"), "none"),
]


def _abstract(kind, spectrum, branch_scale, vo_bias=True):
    cfg = ModelConfig(depth=2, d_model=16, num_heads=4, spectrum=spectrum, branch_scale=branch_scale,
                      vo_bias=vo_bias)  # fmt: skip
    if kind == "vit":
        make = lambda: ViT(cfg, 10, (8, 8, 1), 4, rngs=nnx.Rngs(0))
    else:
        make = lambda: CausalLM(cfg, 12, 8, rngs=nnx.Rngs(0))
    return nnx.state(nnx.eval_shape(make), nnx.Param)


@pytest.mark.parametrize("kind, spectrum, branch_scale", VARIANTS)
def test_every_parameter_has_names_and_valid_specs_under_every_rule_set(kind, spectrum, branch_scale):
    state = _abstract(kind, spectrum, branch_scale)
    for name, rules in parallel.RULES.items():
        specs = parallel.specs_summary(parallel.partition_specs(state, rules))
        parallel.check_specs(state, parallel.partition_specs(state, rules), MESH)  # raises if invalid
        split = {k for k, s in specs.items() if any(e is not None for e in s)}
        assert bool(split) == (name != "replicated"), name
        for path, var in nnx.to_flat_state(state):
            names = var.get_metadata()["out_sharding"]
            spec = specs["/".join(map(str, path))]
            # Each dimension gets the mesh axis its logical name maps to, nothing else.
            assert tuple(spec) == tuple(dict(rules)[n] if n else None for n in names), (path, spec)
    tp = parallel.specs_summary(parallel.partition_specs(state, "tensor_parallel"))
    assert tp["transformer/blocks/attn/w_q"] == P(None, None, "model")  # [L, D, heads * K]: by head
    assert tp["transformer/blocks/mlp/w2"] == P(None, "model", None)
    if spectrum is None:
        assert tp["transformer/blocks/attn/w_o"] == P(None, "model", None)
    else:
        assert tp["transformer/blocks/attn/theta"] == P(None, None, "model")  # V's columns = W_V's
        assert tp["transformer/blocks/attn/psi"] == P(None, "model")
    fsdp = parallel.specs_summary(parallel.partition_specs(state, "fsdp"))
    with_embed = [k for k, v in nnx.to_flat_state(state) if "embed" in v.get_metadata()["out_sharding"]]
    assert len(with_embed) > 10
    assert all("data" in fsdp["/".join(map(str, k))] for k in with_embed)


def test_invalid_specs_are_refused_naming_the_parameter():
    state = _abstract("vit", Spectrum("sharpen"), "none")
    both = tuple((n, "model" if n in ("embed", "heads") else None) for n in parallel.LOGICAL_AXES)
    with pytest.raises(ValueError, match=r"attn/theta: spec .* uses a mesh axis twice"):
        parallel.check_specs(state, parallel.partition_specs(state, both), MESH)
    with pytest.raises(ValueError, match=r"mlp/w1: dimension 64 .* does not split over \('model',\) \(3\)"):
        parallel.check_specs(
            state, parallel.partition_specs(state, "tensor_parallel"), {"data": 1, "model": 3}
        )
    with pytest.raises(ValueError, match=r"names mesh axis 'model'"):
        parallel.check_specs(state, parallel.partition_specs(state, "tensor_parallel"), {"data": 4})
    no_mlp = tuple(r for r in parallel.TENSOR_PARALLEL if r[0] != "mlp")
    with pytest.raises(ValueError, match=r"mlp/b1 has logical axis names \['mlp'\]"):
        parallel.partition_specs(state, no_mlp)
    with pytest.raises(ValueError, match="unknown sharding rules 'zero3'.*train.param_sharding"):
        parallel.partition_specs(state, "zero3")

    class Bare(nnx.Module):
        def __init__(self):
            self.w = nnx.Param(jnp.ones((4, 4)))

    bare = nnx.state(Bare(), nnx.Param)
    with pytest.raises(ValueError, match=r"w: logical names None do not name its 2 dimensions"):
        parallel.check_specs(bare, parallel.partition_specs(bare, "fsdp"), MESH)


SCRIPT = textwrap.dedent(
    """
    import json, sys, time
    import jax, jax.numpy as jnp, numpy as np
    import ml_collections
    from flax import nnx
    from jaxsmooth import Spectrum, train
    from jaxsmooth.tools import cli
    from jaxsmooth.train import optim, parallel
    from jaxsmooth.train.state import new_state
    from jaxsmooth.config import ModelConfig
    from jaxsmooth.nnx import ViT

    out = {"devices": jax.device_count()}
    # 1. The library's train step on a spectral ViT, parameters tensor-parallel over heads.
    t0 = time.perf_counter()
    mcfg = ModelConfig(depth=1, d_model=16, num_heads=4, spectrum=Spectrum("sharpen"))
    opt = ml_collections.ConfigDict(dict(lr=1e-2, warmup_steps=1, schedule="constant", decay_steps=10,
        end_lr_fraction=0.1, weight_decay=0.05, clip_norm=1.0, b1=0.9, b2=0.999, eps=1e-8))
    make = lambda: ViT(mcfg, 10, (8, 8, 1), 4, rngs=nnx.Rngs(params=0))
    graphdef, abs_params, _ = nnx.split(nnx.eval_shape(make), nnx.Param, ...)
    tx, schedule = optim.make_optimizer(opt, abs_params), optim.make_schedule(opt)

    def init():
        return new_state(nnx.to_pure_dict(nnx.split(make(), nnx.Param, ...)[1]), tx, seed=0)

    step = train.make_train_step(graphdef, tx, schedule, dropout=False, with_stats=False, spectral=True)
    rng = np.random.default_rng(0)
    xs = rng.normal(size=(4, 8, 8, 8, 1)).astype(np.float32)
    ys = rng.integers(0, 10, size=(4, 8))

    def run(mesh):
        if mesh is None:
            state, f, put = jax.jit(init)(), jax.jit(step), jnp.asarray
        else:
            sh = parallel.state_shardings(mesh, "tensor_parallel", abs_params, jax.eval_shape(init), tx)
            state = jax.jit(init, out_shardings=sh)()
            f = jax.jit(step, out_shardings=(sh, None))
            put = lambda a: jax.device_put(a, parallel.batch_sharding(mesh))
        losses = []
        for x, y in zip(xs, ys):
            state, m = f(state, put(x), put(y))
            losses.append([float(m["loss"]), float(m["grad_norm"])])
        return losses, state

    out["unsharded"], _ = run(None)
    out["sharded"], state = run(parallel.make_mesh(0, model_parallel=2))
    flat = lambda t: {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(t)[0]}
    out["param_specs"] = {k: str(v.sharding.spec) for k, v in flat(state["params"]).items()}
    out["param_split"] = {k: parallel.is_sharded(v) for k, v in flat(state["params"]).items()}
    out["moments_split"] = sum(parallel.is_sharded(v) for v in jax.tree.leaves(state["opt_state"]))

    out["seconds_step"] = time.perf_counter() - t0
    # 2. The trainer with train.param_sharding="fsdp_tp" on a (2, 2) mesh.
    config, _, _ = cli.parse_train_args(["--config", "digits:quick", *sys.argv[2:]])
    with config.unlocked():
        config.train.param_sharding, config.train.model_parallel = "fsdp_tp", 2
    summary = train.train(config, sys.argv[1], verbose=False)
    out["trainer"] = [[r["loss"], r["grad_norm"]] for r in train.read_metrics(f"{sys.argv[1]}/metrics.jsonl")
                      if r["type"] == "train"]
    out["trainer_test_loss"] = summary["test_loss"]
    out["seconds_trainer"] = time.perf_counter() - t0 - out["seconds_step"]
    print("RESULT" + json.dumps(out))
    """
)

TINY = {
    "model.depth": 1, "model.d_model": 16, "model.num_heads": 2, "data.batch_size": 16,
    "data.eval_batch_size": 360, "train.log_every": 1, "train.stats_every": 3, "train.eval_every": 4,
    "train.checkpoint_every": 4, "opt.schedule": "constant", "opt.warmup_steps": 2, "train.steps": 4,
}  # fmt: skip
TINY_ARGS = [f"--config.{k}={v}" for k, v in TINY.items()]


@pytest.fixture(scope="module")
def four_devices(tmp_path_factory):
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_") and k != "XLA_FLAGS"}
    env.update(XLA_CACHE_ENV, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    workdir = tmp_path_factory.mktemp("sharded")
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(workdir), *TINY_ARGS], env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT"))
    return json.loads(line[len("RESULT") :])


def test_tensor_parallel_training_matches_the_unsharded_losses(four_devices):
    r = four_devices
    assert r["devices"] == 4
    np.testing.assert_allclose(r["sharded"], r["unsharded"], rtol=1e-5, atol=1e-6)
    assert r["unsharded"][-1][0] < r["unsharded"][0][0] - 1e-3  # it trained
    # The parameters really are split: heads and MLP units over "model", the rest whole.
    specs, split = r["param_specs"], r["param_split"]
    for name in ("w_q", "w_k", "theta", "psi", "b_q"):
        key = f"['transformer']['blocks']['attn']['{name}']"
        assert split[key] and "'model'" in specs[key], (name, specs[key])
    assert split["['transformer']['blocks']['mlp']['w1']"]
    assert not split["['patch_w']"] and not split["['transformer']['blocks']['ln1']['gain']"]
    assert r["moments_split"] >= 2 * sum(split.values())  # Adam's mu and nu follow their parameter


@pytest.mark.usefixtures("xla_cache")
def test_trainer_with_fsdp_and_tensor_parallel_logs_the_one_device_losses(four_devices, tmp_path):
    config, _, _ = cli.parse_train_args(
        ["--config", "digits:quick", *TINY_ARGS, "--config.train.num_devices=1"]
    )
    train.train(config, tmp_path, verbose=False)
    one = [[r["loss"], r["grad_norm"]] for r in train.read_metrics(tmp_path / "metrics.jsonl")
           if r["type"] == "train"]  # fmt: skip
    assert len(one) == len(four_devices["trainer"]) == TINY["train.steps"]
    np.testing.assert_allclose(four_devices["trainer"], one, rtol=1e-5, atol=1e-6)
