"""Generation with a KV cache: per-token time is flat in the position, and the program compiles once.

`CausalLM.generate` fills the cache with the prompt in one pass, then a lax.scan decodes one token per
step, each attending to the cache. This script times one token at a time through the same cached decode
(`CausalLM.decode`, jitted once) at several positions, against a naive loop that recomputes the whole
sequence for every new token (what a model without a cache does: time grows with the position, and every
new length compiles a new program), measured in the same run.

    python experiments/benchmarks/generate.py --json experiments/benchmarks/results/generate.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

import jaxsmooth
from jaxsmooth.nnx import CausalLM


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--max_len", type=int, default=512)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--positions", default="16,64,128,256,384,496")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--json")
    args = p.parse_args(argv)
    cfg = jaxsmooth.ModelConfig(depth=args.depth, d_model=args.width, num_heads=4,
                                spectrum=jaxsmooth.Spectrum("sharpen"))  # fmt: skip
    model = CausalLM(cfg, vocab_size=65, max_len=args.max_len, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    positions = [int(x) for x in args.positions.split(",")]

    @jax.jit
    def decode_one(state, tok_B, cache):
        return nnx.merge(graphdef, state).decode(tok_B[:, None], cache)

    @jax.jit
    def full(state, ids_BxT):  # no cache: the whole prefix again (one compile per length)
        return nnx.merge(graphdef, state)(ids_BxT)[:, -1]

    tok = jnp.ones((args.batch,), jnp.int32)
    t0 = time.perf_counter()
    jax.block_until_ready(decode_one(state, tok, model.transformer.init_cache(args.batch, args.max_len)))
    compile_s = time.perf_counter() - t0
    rows = []
    for pos in positions:
        cache = model.transformer.init_cache(args.batch, args.max_len)
        cache = {**cache, "index": jnp.int32(pos)}  # decode the token at this position
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            jax.block_until_ready(decode_one(state, tok, cache))
            times.append(time.perf_counter() - t)
        ids = jnp.ones((args.batch, pos + 1), jnp.int32)
        t = time.perf_counter()
        jax.block_until_ready(full(state, ids))  # includes its compile: a new length is a new program
        naive_first = time.perf_counter() - t
        naive = []
        for _ in range(max(3, args.repeats // 4)):
            t = time.perf_counter()
            jax.block_until_ready(full(state, ids))
            naive.append(time.perf_counter() - t)
        rows.append({"position": pos, "cached_ms": 1e3 * statistics.median(times),
                     "naive_ms": 1e3 * statistics.median(naive),
                     "naive_first_call_ms": 1e3 * naive_first})  # fmt: skip
    n_compiles = decode_one._cache_size()
    print(
        f"cached decode compiled {n_compiles} time(s) ({compile_s:.1f} s); per-token time, median of "
        f"{args.repeats} (ms), depth {args.depth}, width {args.width}, batch {args.batch}:"
    )
    print(f"{'position':>9} {'cached':>8} {'no cache':>9} {'no cache, first call (compiles)':>32}")
    for r in rows:
        c, n, f = r["cached_ms"], r["naive_ms"], r["naive_first_call_ms"]
        print(f"{r['position']:>9} {c:8.2f} {n:9.2f} {f:32.0f}")
    first, last = rows[0]["cached_ms"], rows[-1]["cached_ms"]
    print(
        f"cached: last / first position = {last / first:.2f} (flat = 1); no cache: "
        f"{rows[-1]['naive_ms'] / rows[0]['naive_ms']:.2f}"
    )
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"args": vars(args), "compiles": n_compiles, "rows": rows,
                                   "device": jax.devices()[0].device_kind}, indent=1) + "\n")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
