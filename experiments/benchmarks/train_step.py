"""Train-step time of a ViT-Tiny-shaped jaxsmooth classifier against torch.nn.TransformerEncoder.

    python experiments/benchmarks/train_step.py [--steps 15] [--warmup 3] [--batch 64] [--depth 12]
        [--variants f32,spectral,f32+tcmalloc,spectral+tcmalloc] [--torch-variants torch,torch+tcmalloc]
        [--baseline DIR] [--out experiments/benchmarks/results/train_step.json]

Both frameworks train the same model: 32x32x3 images, 4x4 patches (64 + [CLS] = 65 tokens), width 192,
3 heads, MLP 4x (exact GELU), pre-LN (torch: norm_first=True), final LN, linear head, AdamW, softmax
cross-entropy, batch 64.

Each variant (and torch, with torch.set_num_threads(2)) lives in its own worker process, started by this
run; after warmup, every round asks each worker in turn for one timed step, so load from other processes
on the machine hits all of them alike (interleaved), and no framework's idle thread pool (OpenMP spin,
Eigen) sits in the same process as the other's. We report the median and the minimum over rounds, plus
per-step process CPU time (user + sys) and minor page faults, which are much less sensitive to a shared
machine than wall time.

Allocator: a variant name ending in "+tcmalloc" runs its worker with the caching allocator that
`jaxsmooth train` uses (`jaxsmooth.train.runtime`) in LD_PRELOAD, torch as well as jaxsmooth, so each
framework
is compared with the other on the same allocator. Other variants use glibc malloc.

FLOP/s: model FLOPs are counted by hand (matmuls only, backward = 2x forward; `common.hand_flops`); XLA's
cost analysis of the compiled step is reported as well (it counts each scan body once, not once per
layer, so it undercounts a scanned model ~12x). Achieved FLOP/s is divided by the sustained rate of a
1024 x 1024 float32 matmul, measured by a worker of the same run (JAX, and torch for reference).
"""

from __future__ import annotations

import argparse
import statistics

import common
import jax
import numpy as np

from jaxsmooth.train import runtime

VARIANTS = {
    "f32": dict(spectral=False),
    "spectral": dict(spectral=True),
    "bf16": dict(spectral=False, dtype="bfloat16"),
    "spectral_bf16": dict(spectral=True, dtype="bfloat16"),
}


def torch_step(depth: int, b: int, d: int, heads: int, mlp: int, threads: int):
    """A jitless PyTorch train step of the same model; returns a zero-argument callable."""
    import torch
    from torch import nn

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    h, w, c = common.IMAGE
    p, t = common.PATCH, (common.IMAGE[0] // common.PATCH) ** 2

    class TorchViT(nn.Module):
        def __init__(self):
            super().__init__()
            self.patch = nn.Linear(p * p * c, d)
            self.cls = nn.Parameter(torch.zeros(1, 1, d))
            self.pos = nn.Parameter(0.02 * torch.randn(1, t + 1, d))
            layer = nn.TransformerEncoderLayer(
                d, heads, mlp, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
            )
            self.enc = nn.TransformerEncoder(layer, depth, norm=nn.LayerNorm(d), enable_nested_tensor=False)
            self.head = nn.Linear(d, common.CLASSES)

        def forward(self, x_BxHxWxC):
            bb = x_BxHxWxC.shape[0]
            x = x_BxHxWxC.reshape(bb, h // p, p, w // p, p, c).permute(0, 1, 3, 2, 4, 5)
            tok = self.patch(x.reshape(bb, t, p * p * c))
            x = torch.cat([self.cls.expand(bb, 1, d), tok], 1) + self.pos
            return self.head(self.enc(x)[:, 0])

    model = TorchViT()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    xn, yn = common.batch(b)
    x, y = torch.from_numpy(xn), torch.from_numpy(yn.astype(np.int64))

    def step():
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return loss

    return step


def worker(spec: dict) -> None:
    """Child: build one step, then time one step per line read from stdin; JSON per step on stdout."""
    import json
    import resource
    import sys
    import time

    if spec["name"] == "torch":
        cfg = common.vit_tiny(spec["depth"])
        fn = torch_step(
            spec["depth"], spec["batch"], cfg.d_model, cfg.num_heads, cfg.mlp_dim, spec["threads"]
        )
        info = {}
    else:
        mcfg = common.vit_tiny(spec["depth"], **VARIANTS[spec["name"]])
        step, state = common.make_train_step(mcfg)
        x, y = (jax.device_put(a) for a in common.batch(spec["batch"]))
        compiled = step.lower(state, x, y).compile()
        ca = compiled.cost_analysis()
        ca = ca[0] if isinstance(ca, list) else ca
        mem = compiled.memory_analysis()
        info = {"xla_flops": float(ca.get("flops", float("nan"))), "temp_MB": mem.temp_size_in_bytes / 2**20}
        holder = {"state": state}

        def fn():
            holder["state"], loss = compiled(holder["state"], x, y)
            loss.block_until_ready()

    for _ in range(spec["warmup"]):
        fn()
    info["allocator"] = runtime.active_allocator()  # proves the LD_PRELOAD took effect
    print(json.dumps({"ready": True, **info}), flush=True)
    for line in sys.stdin:
        if line.strip() == "matmul":
            print(json.dumps(common.matmul_gflops()), flush=True)
            continue
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        fn()
        wall, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
        cpu = r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime
        sys_t, faults = r1.ru_stime - r0.ru_stime, r1.ru_minflt - r0.ru_minflt
        print(json.dumps({"wall": wall, "cpu": cpu, "sys": sys_t, "faults": faults}), flush=True)


def main(argv=None):
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=15, help="timed rounds (each times every variant once)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--depth", type=int, default=12)
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    ap.add_argument("--variants", default="f32,spectral,f32+tcmalloc,spectral+tcmalloc",
                    help=f"jaxsmooth variants: {', '.join(VARIANTS)}, each optionally +tcmalloc")  # fmt: skip
    ap.add_argument("--torch-variants", default="torch,torch+tcmalloc", help="'' for none")
    ap.add_argument("--no-torch", action="store_true", help="same as --torch-variants ''")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    ap.add_argument(
        "--baseline",
        default=None,
        help="a directory holding another copy of the jaxsmooth package (e.g. the pre-optimisation one: "
        "`git archive <commit> jaxsmooth | tar -x -C DIR`); adds variants base_<v> that run it, interleaved",
    )
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(json.loads(args.worker))
        return

    b, depth = args.batch, args.depth
    variants = [v for v in args.variants.split(",") if v]
    for v in variants:
        if v.removesuffix("+tcmalloc") not in VARIANTS:
            ap.error(f"unknown variant {v!r}; choose from {', '.join(VARIANTS)} (optionally +tcmalloc)")
    names = variants + ([f"base_{v}" for v in variants] if args.baseline else [])
    torches = [] if args.no_torch else [v for v in args.torch_variants.split(",") if v]
    if any(v.removesuffix("+tcmalloc") != "torch" for v in torches):
        ap.error(f"--torch-variants takes torch and torch+tcmalloc, got {args.torch_variants!r}")
    names += torches
    found = runtime.find_allocator()
    if any(n.endswith("+tcmalloc") for n in names) and found is None:
        ap.error("a +tcmalloc variant needs tcmalloc (apt-get install libtcmalloc-minimal4)")
    procs, info = {}, {}
    for name in names:  # built one after another, so compiles do not compete
        env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
        if name.endswith("+tcmalloc"):
            env["LD_PRELOAD"], extra = found
            env.update(extra)
        if name.startswith("base_"):
            env["PYTHONPATH"] = os.pathsep.join(
                [str(Path(args.baseline).resolve()), env.get("PYTHONPATH", "")]
            )
        spec = dict(
            name=name.removeprefix("base_").removesuffix("+tcmalloc"),
            depth=depth, batch=b, threads=args.threads, warmup=args.warmup,
        )  # fmt: skip
        p = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
        )  # fmt: skip
        info[name] = json.loads(p.stdout.readline())
        procs[name] = p

    def ask(name, line="step"):
        procs[name].stdin.write(line + "\n")
        procs[name].stdin.flush()
        return json.loads(procs[name].stdout.readline())

    mm_name = names[0] if not names[0].startswith("torch") else names[-1]
    mm = [ask(mm_name, "matmul")]
    times = {k: [] for k in names}
    for _ in range(args.steps):
        for k in names:
            times[k].append(ask(k))
    mm.append(ask(mm_name, "matmul"))
    for p in procs.values():
        p.stdin.close()
        p.wait()

    cfg = common.vit_tiny(depth)
    t_tok = (common.IMAGE[0] // common.PATCH) ** 2 + 1
    flops = common.hand_flops(depth, b, t_tok, cfg.d_model, cfg.mlp_dim)["train_step"]
    peak = statistics.median([m["jax_gflops"] for m in mm]) * 1e9
    stat = lambda k, f, agg: agg([r[f] for r in times[k]])
    med = {k: stat(k, "wall", statistics.median) for k in names}
    best = {k: stat(k, "wall", min) for k in names}
    jax_names = [k for k in names if not k.startswith("torch")]
    res = {
        "benchmark": "train_step",
        "machine": common.machine(),
        "shape": dict(
            batch=b, depth=depth, width=cfg.d_model, heads=cfg.num_heads, tokens=t_tok, mlp=cfg.mlp_dim
        ),
        "rounds": args.steps,
        "median_ms": {k: 1e3 * v for k, v in med.items()},
        "min_ms": {k: 1e3 * v for k, v in best.items()},
        "median_cpu_ms (user+sys)": {k: 1e3 * stat(k, "cpu", statistics.median) for k in names},
        "median_sys_ms": {k: 1e3 * stat(k, "sys", statistics.median) for k in names},
        "median_page_faults": {k: stat(k, "faults", statistics.median) for k in names},
        "xla_temp_MB": {k: info[k].get("temp_MB") for k in jax_names},
        "allocator in use": {k: info[k].get("allocator") for k in names},
        "matmul_1024_gflops (start, end)": mm,
        "hand_flops_per_step": flops,
        "xla_cost_analysis_flops (scan body counted once)": {k: info[k].get("xla_flops") for k in jax_names},
        "achieved_gflops (hand flops / median)": {k: flops / med[k] / 1e9 for k in names},
        "fraction_of_matmul_peak (median)": {k: flops / med[k] / peak for k in names},
        "fraction_of_matmul_peak (min)": {k: flops / best[k] / peak for k in names},
    }
    res["allocator (+tcmalloc variants)"] = found[0] if found else None
    if torches:  # against torch on the same allocator, and against the fastest torch
        peer = lambda k: "torch+tcmalloc" if k.endswith("+tcmalloc") and "torch+tcmalloc" in med else "torch"
        fastest = min(torches, key=lambda k: med[k])
        for stat_name, d in (("median", med), ("min", best)):
            res[f"jaxsmooth/torch, same allocator ({stat_name})"] = {
                k: d[k] / d[peer(k)] for k in jax_names if peer(k) in d
            }
            res[f"jaxsmooth/fastest torch ({stat_name})"] = {k: d[k] / d[fastest] for k in jax_names}
    pairs = [("spectral", "f32"), ("bf16", "f32"), ("spectral_bf16", "spectral")]
    pairs += [(f"{a}+tcmalloc", f"{b}+tcmalloc") for a, b in pairs]
    pairs += [(f"{v}+tcmalloc", v) for v in [*VARIANTS, "torch"]]
    pairs += [(v, f"base_{v}") for v in variants if args.baseline]
    for num, den in pairs:
        if num in med and den in med:
            res[f"{num}/{den} (median)"] = med[num] / med[den]
            res[f"{num}/{den} (min)"] = best[num] / best[den]
    common.emit(res, args.out)


if __name__ == "__main__":
    main()
