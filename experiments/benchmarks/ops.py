"""Single-op micro-benchmarks behind the train-step analysis: where XLA:CPU loses to PyTorch.

    python experiments/benchmarks/ops.py [--reps 30] [--out experiments/benchmarks/results/ops.json]

1. Dense layer forward + backward at the ViT-Tiny shapes ([64, 65, D_in] x [D_in, D_out]): autodiff of
   x @ w against `jaxsmooth.attention.dense` (the custom VJP the model uses), and torch.
2. The attention matmuls ([B, H] = [64, 3] batches of 65 x 64 x 65): Q K^T, A V and the backward's A^T dZ,
   in jax and as torch.bmm; plus softmax attention forward + backward (jax; torch's fused
   scaled_dot_product_attention).
3. The 1024 x 1024 float32 matmul both frameworks are measured against.

Each row is the median of `--reps` timed calls after a warm-up, GFLOP/s from the matmul FLOPs. jax and
torch run in this one process, alternately per row, with torch.set_num_threads(2).
"""

from __future__ import annotations

import argparse
import statistics
import time

import common
import jax
import jax.numpy as jnp
import numpy as np

from jaxsmooth.attention import dense

B, H, T, K = 64, 3, 65, 64


def median_time(fn, reps: int) -> float:
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(2)
    rng = np.random.default_rng(0)
    res = {"benchmark": "ops", "machine": common.machine(), "dense_fwd_bwd": {}, "attention": {}}
    blk = lambda tree: jax.block_until_ready(tree)

    for din, dout in [(192, 192), (192, 768), (768, 192)]:
        x = rng.standard_normal((B, T, din), dtype=np.float32)
        w = (0.05 * rng.standard_normal((din, dout))).astype(np.float32)
        c = rng.standard_normal((B, T, dout), dtype=np.float32)
        xj, wj, cj = map(jnp.asarray, (x, w, c))
        flops = 3 * 2 * B * T * din * dout
        row = {}
        for name, f in (("jax autodiff", jnp.matmul), ("jax dense (custom VJP)", dense)):
            g = jax.jit(jax.grad(lambda x, w, f=f, c=cj: jnp.sum(f(x, w) * c), argnums=(0, 1)))
            row[name] = median_time(lambda g=g, x=xj, w=wj: blk(g(x, w)), args.reps)
        xt, wt, ct = (torch.from_numpy(a.copy()).requires_grad_(i < 2) for i, a in enumerate((x, w, c)))

        def torch_step(xt=xt, wt=wt, ct=ct):
            xt.grad = wt.grad = None
            ((xt @ wt) * ct).sum().backward()

        row["torch"] = median_time(torch_step, args.reps)
        res["dense_fwd_bwd"][f"{din}->{dout}"] = {
            k: {"ms": 1e3 * v, "gflops": flops / v / 1e9} for k, v in row.items()
        }

    q, k = (rng.standard_normal((B, H, T, K), dtype=np.float32) for _ in range(2))
    a = rng.standard_normal((B, H, T, T), dtype=np.float32)
    qj, kj, aj = map(jnp.asarray, (q, k, a))
    qt, kt, at = (torch.from_numpy(v).reshape(B * H, *v.shape[2:]) for v in (q, k, a))
    flops = 2 * B * H * T * T * K
    cases = {  # (einsum, jax operands, torch bmm); operands are jit arguments, never folded constants
        "Q K^T": ("bhtk,bhsk->bhts", (qj, kj), lambda: torch.bmm(qt, kt.transpose(1, 2))),
        "A V": ("bhts,bhsk->bhtk", (aj, kj), lambda: torch.bmm(at, kt)),
        "A^T dZ": ("bhts,bhtk->bhsk", (aj, qj), lambda: torch.bmm(at.transpose(1, 2), qt)),
    }
    for name, (eq, ops, tf) in cases.items():
        jfj = jax.jit(lambda x, y, eq=eq: jnp.einsum(eq, x, y))
        tj = median_time(lambda jfj=jfj, ops=ops: blk(jfj(*ops)), args.reps)
        tt = median_time(tf, args.reps)
        res["attention"][name] = {
            "jax": {"ms": 1e3 * tj, "gflops": flops / tj / 1e9},
            "torch": {"ms": 1e3 * tt, "gflops": flops / tt / 1e9},
        }

    def jax_attention(q, k, v):
        p = jax.nn.softmax(jnp.einsum("bhtk,bhsk->bhts", q, k) / np.sqrt(K), axis=-1)
        return jnp.einsum("bhts,bhsk->bhtk", p, v)

    g = jax.jit(jax.grad(lambda q, k, v: jnp.sum(jax_attention(q, k, v)), argnums=(0, 1, 2)))
    qq, kk, vv = (torch.from_numpy(v.copy()).requires_grad_() for v in (q, k, k))

    def torch_sdpa():
        qq.grad = kk.grad = vv.grad = None
        torch.nn.functional.scaled_dot_product_attention(qq, kk, vv).sum().backward()

    res["attention"]["softmax attention fwd+bwd (ms)"] = {
        "jax": 1e3 * median_time(lambda: blk(g(qj, kj, kj)), args.reps),
        "torch sdpa": 1e3 * median_time(torch_sdpa, args.reps),
    }
    res["matmul_1024"] = common.matmul_gflops()
    common.emit(res, args.out)


if __name__ == "__main__":
    main()
