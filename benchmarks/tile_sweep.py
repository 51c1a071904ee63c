"""Time the Triton compressed-attention kernels under candidate tiles, one kernel at a time (GPU).

The tile table `_TILES` in backends/triton/compressed_attention.py is chosen from this sweep:
for each kernel (fwd, dq, dkv) it times the kernel alone, in the paper setting (bf16, G=16,
D=128, BS=64) at the given T, under each candidate `(query rows, block tile, warps, stages)`.
A candidate that does not compile or launch (shared memory, registers) is reported as failed.
Tiles change only the order of float32 sums, never what is computed.

    python benchmarks/tile_sweep.py --seq-len 65536
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import jax
import jax.numpy as jnp

from ejkernel_nsa import sparsity
from ejkernel_nsa.backends.triton import compressed_attention as cmp
from ejkernel_nsa.problem import token_layout

# The last line of each list: tiles that 16-bit blocks (half the shared memory per stage) made
# worth trying; in this setting each compiles for sm_90 without spills and within 227 KB (dq with
# 256 rows and 64 blocks spills, so it is left out).
CANDIDATES = {
    "fwd": [(64, 32, 4, 2), (128, 32, 8, 2), (128, 64, 8, 2), (256, 32, 8, 2), (128, 64, 4, 2),
            (256, 64, 8, 2), (256, 32, 8, 3), (128, 64, 8, 3), (256, 64, 8, 3)],
    "dq": [(64, 32, 4, 2), (128, 32, 8, 2), (128, 64, 8, 2), (256, 32, 8, 2),
           (128, 32, 8, 3), (128, 64, 8, 3), (256, 32, 8, 3)],
    "dkv": [(32, 32, 8, 2), (64, 32, 8, 2), (128, 32, 8, 2), (32, 64, 8, 2), (64, 64, 8, 2), (32, 32, 4, 2),
            (64, 32, 4, 2), (32, 32, 8, 3),
            (64, 64, 4, 2), (32, 32, 4, 3), (64, 32, 4, 3)],
}


def median_ms(fn, args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-len", type=int, default=65536)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--kernels", default="fwd,dq,dkv", help="which of fwd, dq, dkv to sweep")
    args = parser.parse_args()
    T, HQ, H, D, BS = args.seq_len, 64, 4, 128, 64
    NB = -(-T // BS)
    keys = jax.random.split(jax.random.key(0), 5)
    q = jax.random.normal(keys[0], (1, T, HQ, D), jnp.bfloat16)
    # bf16 blocks: the kernels get mean_pool's float32 output in the query's dtype (`_blocks_for_dots`).
    k_cmp = jax.random.normal(keys[1], (1, NB, H, D), jnp.bfloat16)
    v_cmp = jax.random.normal(keys[2], (1, NB, H, D), jnp.bfloat16)
    d_out = jax.random.normal(keys[3], (1, T, HQ, D), jnp.bfloat16)
    layout = token_layout(T, BS, None)
    viewer_lo, viewer_hi = sparsity.block_viewers(T, BS, None)
    scale = D ** -0.5
    out, lse = jax.jit(lambda *a: cmp._fwd(*a, BS, scale))(q, k_cmp, v_cmp, layout.pos, layout.first_block)
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
    stages = {
        "fwd": (lambda *a: cmp._fwd(*a, BS, scale), (q, k_cmp, v_cmp, layout.pos, layout.first_block)),
        "dq": (lambda *a: cmp._bwd_dq(*a, BS, scale),
               (q, k_cmp, v_cmp, d_out, lse, delta, layout.pos, layout.first_block)),
        "dkv": (lambda *a: cmp._bwd_dkv(*a, BS, scale),
                (q, k_cmp, v_cmp, d_out, lse, delta, layout.pos, layout.first_block, viewer_lo, viewer_hi)),
    }
    print(f"device: {jax.devices()[0].device_kind}; T={T} HQ={HQ} H={H} D={D} BS={BS} bf16", flush=True)
    default_tiles = dict(cmp._TILES)
    best = {}
    for stage, (fn, fn_args) in stages.items():
        if stage not in args.kernels.split(","):
            continue
        for tile in CANDIDATES[stage]:
            cmp._TILES[stage, 128, False] = tile
            label = f"{stage:<4} rows={tile[0]:<3} blocks={tile[1]:<3} warps={tile[2]} stages={tile[3]}"
            try:
                # A new function object each time: jit would otherwise reuse the first trace, and
                # the tile is read when tracing.
                ms = median_ms(jax.jit(lambda *a, fn=fn: fn(*a)), fn_args, args.repeats)
                print(f"{label}: {ms:8.3f} ms", flush=True)
                if stage not in best or ms < best[stage][0]:
                    best[stage] = (ms, label)
            except Exception as error:  # a tile that does not fit fails here; the sweep goes on
                print(f"{label}: failed: {type(error).__name__}: {str(error).splitlines()[0][:160]}", flush=True)
        cmp._TILES.update(default_tiles)
    print("\nbest per kernel:")
    for stage, (ms, label) in best.items():
        print(f"  {label}: {ms:.3f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
