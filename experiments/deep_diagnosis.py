"""Why deep DeepNorm stacks collapse: train the packaged `deep1000` config and measure, every few steps,
what one optimiser step does to it.

    PYTHONPATH=$PWD python experiments/deep_diagnosis.py --arg mode=none,depth=1000 --steps 300 \
        --every 10 --out experiments/results/deep/none_d1000.json [--set opt.lr=3e-4 ...]
        [--freeze ln_bias,ln_gain] [--group-lr ln_bias=0.1]

Everything runs through the library: the config is the packaged `deep1000` (jaxsmooth/configs/deep1000.py,
with `--arg` and `--set` overrides), the model `jaxsmooth.train.build_model`, the optimiser
`jaxsmooth.train.optim.make_optimizer`, the train state `jaxsmooth.train.state.new_state`, the step
`jaxsmooth.train.make_train_step` and the batches `jaxsmooth.data.Batcher`, so the loss curve is the
trainer's. At every `--every`-th step (before the update) a second jitted function takes the same batch,
gradients and optax update, and records:

  - grad norms by parameter group (`GROUPS`: W_Q/W_K, W_V/W_O or theta/psi, MLP, LN gains / biases,
    embeddings, head) in total and per layer, the global norm and the clip factor min(1, clip / |g|);
  - the update sizes ||delta theta|| / ||theta|| by group;
  - DeepNet's ||Delta F||: on a fixed probe batch (the first test images), the relative change of each
    block's output caused by the whole update, and of the stack's output (the [CLS] features the head
    reads) caused by the update of one group alone, group by group;
  - the residual stream's token cosine per layer, the eigenvalues of each layer's effective map (H/alpha
    for DeepNorm; exact for spectral layers, host-side numpy for the unconstrained model), and LN
    gain/bias summaries.

Per-layer arrays are summarised (every depth/10-th layer and the last, plus quantiles over all layers;
by group: every depth/4-th), so 30 records at depth 1000 take about 100 KB. `--freeze` zeroes the
updates of the named groups and `--group-lr g=f` multiplies a group's updates by f (hypothesis tests;
both chain after the library optimiser). The output JSON names the command that made it.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import shlex
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxsmooth import configs, train
from jaxsmooth import data as data_lib
from jaxsmooth.train import optim
from jaxsmooth.train.state import new_state

# Parameter groups: name -> predicate on the parameter path (a tuple of keys of the pure-dict params).
GROUPS = {
    "qk": lambda p: p[-1] in ("w_q", "w_k", "b_q", "b_k"),
    "vo": lambda p: p[-1] in ("w_v", "w_o", "b_v", "b_o"),
    "theta": lambda p: p[-1] == "theta",
    "psi": lambda p: p[-1] == "psi",
    "mlp_w": lambda p: p[-2:] in (("mlp", "w1"), ("mlp", "w2")),
    "mlp_b": lambda p: p[-2:] in (("mlp", "b1"), ("mlp", "b2")),
    "ln_gain": lambda p: p[-1] == "gain",
    "ln_bias": lambda p: p[-2:] in (("ln1", "bias"), ("ln2", "bias")),
    "embed": lambda p: p[0] in ("patch_w", "patch_b", "cls", "pos", "tok"),
    "head": lambda p: p[0] in ("head_w", "head_b"),
}
QUANTILES = (0.0, 0.1, 0.5, 0.9, 1.0)


def load_config(arg: str, sets: list[str]):
    """The packaged `deep1000` config (jaxsmooth/configs/deep1000.py) with `arg`, then `--set
    section.field=value` overrides (values read as Python literals, else as strings)."""
    cfg = configs.load(f"deep1000:{arg}" if arg else "deep1000")
    for s in sets:
        key, _, text = s.partition("=")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        node = cfg
        *parents, last = key.split(".")
        for k in parents:
            node = node[k]
        if last not in node:
            raise SystemExit(f"--set {s}: config has no field {key}")
        node[last] = value
    return cfg


def group_of(path: tuple) -> str:
    for name, pred in GROUPS.items():
        if pred(path):
            return name
    raise ValueError(f"parameter {path} is in no group")


def group_tree(params) -> dict:
    """Pure-dict tree of group names, same structure as params."""
    flat = {p: group_of(p) for p in _flat_paths(params)}
    return _unflatten(flat)


def _flat_paths(tree, prefix=()):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _flat_paths(v, (*prefix, k))
    else:
        yield prefix


def _unflatten(flat: dict) -> dict:
    out: dict = {}
    for path, v in flat.items():
        node = out
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = v
    return out


def _leaves_with_paths(tree):
    return [(p, _get(tree, p)) for p in _flat_paths(tree)]


def _get(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def _stacked(path) -> bool:
    return optim.STACK_KEY in path


def wrap_optimizer(tx, groups: dict, freeze: set[str], scale: dict[str, float]):
    """tx, then zero the frozen groups' updates and multiply others by their factor."""
    if not freeze and not scale:
        return tx
    factor = jax.tree.map(lambda g: 0.0 if g in freeze else float(scale.get(g, 1.0)), groups)
    return optax.chain(tx, optax.GradientTransformation(
        lambda p: optax.EmptyState(),
        lambda u, s, p=None: (jax.tree.map(lambda a, f: a * f, u, factor), s),
    ))  # fmt: skip


def sqnorm_by_group_and_layer(tree, groups, depth: int) -> tuple[dict, dict]:
    """({group: sum of squares}, {group: [depth] sums of squares per layer}) of a params-shaped tree;
    float32. Leaves outside the layer stack count in the totals only."""
    names = sorted(set(jax.tree.leaves(groups)))
    tot = {g: jnp.zeros(()) for g in names}
    lay = {g: jnp.zeros((depth,)) for g in names}
    for (path, a), g in zip(_leaves_with_paths(tree), jax.tree.leaves(groups), strict=True):
        a32 = a.astype(jnp.float32)
        tot[g] = tot[g] + jnp.sum(jnp.square(a32))
        if _stacked(path):
            lay[g] = lay[g] + jnp.sum(jnp.square(a32).reshape(depth, -1), axis=1)
    return tot, lay


def make_diagnostics(graphdef, tx, loss_fn_params, groups, depth: int, clip_norm: float, spectral: bool):
    """jitted (params, opt_state, x, y, xp) -> dict of device arrays (see the module docstring)."""
    names = sorted(set(jax.tree.leaves(groups)))
    sqnorm_by_group = lambda tree: sqnorm_by_group_and_layer(tree, groups, depth)

    def stack_features(model, xp):
        """The transformer's output [B, T, D] on the probe batch (what the head reads at [CLS])."""
        return model.transformer(model.embed(xp))

    def per_layer_outputs(params_a, params_b, xp):
        """Relative change of every block's output, and the token cosine per layer (params_a)."""
        ma, mb = nnx.merge(graphdef, params_a), nnx.merge(graphdef, params_b)
        ga, sa = nnx.split(ma.transformer.blocks)
        gb, sb = nnx.split(mb.transformer.blocks)
        x0 = ma.embed(xp)

        def body(carry, states):
            xa, xb = carry
            la, lb = states
            ya, aux = nnx.merge(ga, la)(xa, stats="logged")
            yb, _ = nnx.merge(gb, lb)(xb)
            rel = jnp.sqrt(jnp.sum(jnp.square(yb - ya)) / jnp.sum(jnp.square(ya)))
            return (ya, yb), (rel, aux["token_cosine"])

        _, (rel_L, cos_L) = jax.lax.scan(jax.checkpoint(body), (x0, x0), (sa, sb))
        return rel_L, cos_L

    def diag(params, opt_state, x, y, xp):
        (loss, _), grads = jax.value_and_grad(loss_fn_params, has_aux=True)(params, x, y)
        gnorm = optax.tree.norm(grads)
        updates, _ = tx.update(grads, opt_state, params)
        new = optax.apply_updates(params, updates)
        g_tot, g_lay = sqnorm_by_group(grads)
        u_tot, u_lay = sqnorm_by_group(updates)
        p_tot, p_lay = sqnorm_by_group(params)
        out = {
            "loss": loss,
            "grad_norm": gnorm,
            "clip_factor": jnp.minimum(1.0, clip_norm / gnorm),
            "grad_group": {g: jnp.sqrt(v) for g, v in g_tot.items()},
            "grad_layer": {g: jnp.sqrt(v) for g, v in g_lay.items()},
            "upd_rel_group": {g: jnp.sqrt(u_tot[g] / jnp.maximum(p_tot[g], 1e-30)) for g in names},
            "upd_rel_layer": {g: jnp.sqrt(u_lay[g] / jnp.maximum(p_lay[g], 1e-30)) for g in names},
        }
        model = nnx.merge(graphdef, params)
        f0 = stack_features(model, xp)
        f0_norm = jnp.sqrt(jnp.sum(jnp.square(f0[:, 0])))
        dF = {}
        for g in names + ["all"]:
            upd_g = jax.tree.map(
                lambda u, gg, g=g: u if g in ("all", gg) else jnp.zeros_like(u), updates, groups
            )
            f1 = stack_features(nnx.merge(graphdef, optax.apply_updates(params, upd_g)), xp)
            dF[g] = jnp.sqrt(jnp.sum(jnp.square(f1[:, 0] - f0[:, 0]))) / f0_norm  # [CLS] features
        out["dF_cls_group"] = dF
        rel_L, cos_L = per_layer_outputs(params, new, xp)
        out["dF_layer"] = rel_L
        out["token_cosine"] = cos_L
        # CLS vs patch tokens at the output: how input-dependent is the [CLS] feature?
        cls = f0[:, 0]
        out["cls_batch_std"] = jnp.mean(jnp.std(cls, axis=0)) / jnp.sqrt(jnp.mean(jnp.square(cls)))
        blocks = model.transformer.blocks
        out["ln_gain_mean"] = jnp.stack([jnp.mean(blocks.ln1.effective_gain(), 1),
                                         jnp.mean(blocks.ln2.effective_gain(), 1)], 1)  # fmt: skip
        rms = lambda b: jnp.sqrt(jnp.mean(jnp.square(b[...]), 1))
        out["ln_bias_rms"] = jnp.stack([rms(blocks.ln1.bias), rms(blocks.ln2.bias)], 1)
        alpha = model.transformer.config.alpha_beta[0]
        if spectral:
            lam_LxD = model.transformer.eigenvalues() / alpha
            out["eig_min"], out["eig_max"] = jnp.min(lam_LxD, 1), jnp.max(lam_LxD, 1)
        else:
            out["h_LxDxD"] = model.transformer.effective_h()
        return out

    return jax.jit(diag)


def summarise(arr_L: np.ndarray, stride: int) -> dict:
    """{"every": layers 0, stride, 2 stride, ... and the last; "q": QUANTILES over all layers}."""
    a = np.asarray(arr_L, np.float64)
    idx = sorted({*range(0, len(a), stride), len(a) - 1})
    return {
        "every": [float(f"{v:.4g}") for v in a[idx]],
        "q": [float(f"{v:.4g}") for v in np.quantile(a, QUANTILES)],
    }


def host_record(step: int, m: dict, stride: int, alpha: float) -> dict:
    m = jax.device_get(m)
    r4 = lambda v: float(f"{float(v):.4g}")
    rec = {"step": step, "loss": r4(m["loss"]), "grad_norm": r4(m["grad_norm"]), "clip": r4(m["clip_factor"])}
    rec["grad_group"] = {g: r4(v) for g, v in m["grad_group"].items()}
    rec["upd_rel_group"] = {g: r4(v) for g, v in m["upd_rel_group"].items()}
    rec["dF_cls_group"] = {g: r4(v) for g, v in m["dF_cls_group"].items()}
    # By group and layer: quantiles over the layers, and 5 layers (first, quarters, last).
    coarse = max(1, len(m["dF_layer"]) // 4)
    rec["grad_layer"] = {g: summarise(v, coarse) for g, v in m["grad_layer"].items() if np.any(v)}
    rec["upd_rel_layer"] = {g: summarise(v, coarse) for g, v in m["upd_rel_layer"].items() if np.any(v)}
    rec["dF_layer"] = summarise(m["dF_layer"], stride)
    rec["token_cosine"] = summarise(m["token_cosine"], stride)
    rec["cls_batch_std"] = r4(m["cls_batch_std"])
    rec["ln_gain_mean"] = summarise(np.asarray(m["ln_gain_mean"]).mean(1), stride)
    rec["ln_bias_rms"] = summarise(np.asarray(m["ln_bias_rms"]).mean(1), stride)
    if "h_LxDxD" in m:  # effective map H / alpha; complex eigenvalues on the host
        ev = np.linalg.eigvals(np.asarray(m["h_LxDxD"], np.float64) / alpha)
        m["eig_min"], m["eig_max"] = ev.real.min(1), ev.real.max(1)
        rec["eig_abs_max"] = summarise(np.abs(ev).max(1), stride)
    rec["eig_min"] = summarise(m["eig_min"], stride)
    rec["eig_max"] = summarise(m["eig_max"], stride)
    return rec


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arg", default="", help="jaxsmooth/configs/deep1000.py args, e.g. mode=none,depth=100")
    ap.add_argument("--set", action="append", default=[], help="section.field=value override")
    ap.add_argument("--steps", type=int, default=300, help="optimiser steps (also the schedule length)")
    ap.add_argument("--every", type=int, default=10, help="diagnostics every N steps")
    ap.add_argument("--probe", type=int, default=32, help="probe batch: the first N test images")
    ap.add_argument("--freeze", default="", help="comma-separated groups whose updates are zeroed")
    ap.add_argument("--group-lr", default="", help="comma-separated group=factor update multipliers")
    ap.add_argument("--eval-every", type=int, default=0, help="test accuracy every N steps (0: at the end)")
    ap.add_argument("--out", default=None)
    return ap


def _group_changes(args) -> tuple[set[str], dict[str, float]]:
    """(--freeze groups, --group-lr factors), checked against GROUPS."""
    freeze = {g for g in args.freeze.split(",") if g}
    scale = {k: float(v) for k, v in (kv.split("=") for kv in args.group_lr.split(",") if kv)}
    for g in freeze | set(scale):
        if g not in GROUPS:
            raise SystemExit(f"unknown group {g!r}; groups: {', '.join(GROUPS)}")
    return freeze, scale


def main(argv=None):
    args = _parser().parse_args(argv)
    t0 = time.perf_counter()
    command = "PYTHONPATH=$PWD python " + shlex.join(
        ["experiments/deep_diagnosis.py", *(argv or sys.argv[1:])]
    )
    cfg = load_config(args.arg, [f"train.steps={args.steps}", *args.set])
    mcfg = train.check_config(cfg)
    d = cfg.data
    ds = data_lib.prepare(data_lib.load(d.name, **d.kwargs.to_dict()), d.train_fraction, d.seed)
    model = train.build_model(mcfg, ds, cfg, nnx.Rngs(params=cfg.train.seed))
    graphdef, pstate, _ = nnx.split(model, nnx.Param, ...)
    params = nnx.to_pure_dict(pstate)
    groups = group_tree(params)
    freeze, scale = _group_changes(args)
    tx = wrap_optimizer(optim.make_optimizer(cfg.opt, pstate), groups, freeze, scale)
    spectral = mcfg.spectrum is not None
    schedule = optim.make_schedule(cfg.opt)
    step_fn = jax.jit(train.make_train_step(graphdef, tx, schedule, dropout=False, with_stats=False,
                                            spectral=spectral), donate_argnums=0)  # fmt: skip

    def loss_fn(p, x, y):
        return jnp.mean(train.per_example_loss(nnx.merge(graphdef, p)(x), y)), None

    diag = make_diagnostics(graphdef, tx, loss_fn, groups, mcfg.depth, float(cfg.opt.clip_norm), spectral)
    eval_fn = jax.jit(train.make_eval_step(graphdef))

    def test_accuracy(p):
        correct = n = 0
        for x, y, nv in data_lib.eval_batches(ds, d.eval_batch_size):
            correct += int(eval_fn(p, x, y, jnp.int32(nv))[1])
            n += nv
        return correct / n

    alpha, beta = mcfg.alpha_beta
    stride = max(1, mcfg.depth // 10)
    state = new_state(params, tx, seed=cfg.train.seed)
    batcher = data_lib.Batcher(ds, d.batch_size, d.seed)
    xp = ds.x_test[: args.probe]
    state, trace = _train(args, command, state, step_fn, diag, batcher, xp, stride, alpha, test_accuracy)
    acc = test_accuracy(state["params"])
    losses = trace["loss"]
    out = {
        "command": command,
        "config_arg": args.arg,
        "overrides": args.set,
        "freeze": sorted(freeze),
        "group_lr": scale,
        "depth": mcfg.depth,
        "mode": "none" if not spectral else mcfg.spectrum.mode,
        "alpha": alpha,
        "beta": beta,
        "opt": cfg.opt.to_dict(),
        "layers_every": stride,
        "quantiles": QUANTILES,
        "loss": [round(v, 4) for v in losses],
        **{k: trace[k] for k in ("grad_norm", "lr", "records", "evals")},
        "test_accuracy": acc,
        "loss_mean_last20": float(np.mean(losses[-20:])),
        "any_nonfinite": not all(math.isfinite(v) for v in losses),
        "wall_s": round(time.perf_counter() - t0, 1),
        "train_s": trace["train_s"],
    }
    print(f"test accuracy {acc:.4f}; mean loss of the last 20 steps {out['loss_mean_last20']:.4f}; "
          f"wall {out['wall_s']} s", flush=True)  # fmt: skip
    if args.out:
        write(args.out, out)
    return out


def _train(args, command, state, step_fn, diag, batcher, xp, stride: int, alpha: float, test_accuracy):
    """`args.steps` steps from `state`, the diagnostics every `args.every` steps (and at the last), test
    accuracy every `args.eval_every`. Returns (state, {"loss" (floats), "grad_norm", "lr" (4 digits): per
    step, "records", "evals", "train_s"}); partial results go to `args.out` at every diagnostics step."""
    records, losses, gnorms, lrs, evals = [], [], [], [], []
    t_train = time.perf_counter()
    for step in range(args.steps):
        x, y = batcher.batch(step)
        if step % args.every == 0 or step == args.steps - 1:
            rec = host_record(step, diag(state["params"], state["opt_state"], x, y, xp), stride, alpha)
            records.append(rec)
            if args.out:  # partial results, readable while a long run goes on
                write(args.out, {"command": command, "partial": True, "records": records, "evals": evals})
            print(f"step {step}: loss {rec['loss']:.4f} |g| {rec['grad_norm']:.3g} clip {rec['clip']:.3g} "
                  f"dF {rec['dF_cls_group']['all']:.3g} cos_out {rec['token_cosine']['every'][-1]:.3f}",
                  flush=True)  # fmt: skip
        state, m = step_fn(state, x, y)
        losses.append(m["loss"])
        gnorms.append(m["grad_norm"])
        lrs.append(m["lr"])
        if args.eval_every and (step + 1) % args.eval_every == 0:
            evals.append({"step": step + 1, "test_accuracy": test_accuracy(state["params"])})
            print(f"step {step + 1}: test accuracy {evals[-1]['test_accuracy']:.4f}", flush=True)
    losses = [float(v) for v in jax.device_get(losses)]
    train_s = round(time.perf_counter() - t_train, 1)
    return state, {
        "loss": losses,
        "grad_norm": [float(f"{float(v):.4g}") for v in jax.device_get(gnorms)],
        "lr": [float(f"{float(v):.4g}") for v in jax.device_get(lrs)],
        "records": records,
        "evals": evals,
        "train_s": train_s,
    }


def write(path: str, obj: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(obj, separators=(",", ":")) + "\n")


if __name__ == "__main__":
    main()
