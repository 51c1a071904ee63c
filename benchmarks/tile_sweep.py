"""Time the Triton compressed-attention kernels under candidate tiles, one kernel at a time (GPU).

The tile table `TILES` in backends/triton/compressed_attention.py is chosen from this sweep: for
each kernel (fwd, dq, dkv) it times the kernel alone, in the paper setting (bf16, G=16, D=128,
BS=64) at the given T, under each candidate `Tile(query rows, block tile, warps, stages)`, passed
to the kernel's launch as its `tile` argument. A candidate that does not compile or launch
(shared memory, registers) is reported as failed. Tiles change only the order of float32 sums,
never what is computed: each candidate's largest difference from the default tile's result is
printed beside its time.

    python benchmarks/tile_sweep.py --seq-len 65536
    EJKERNEL_NSA_INTERPRET=1 python benchmarks/tile_sweep.py --tiny   # CPU, Triton's interpreter

`--tiny` runs a few small tiles at T=64, G=2, D=16 (float32): a check that the sweep itself
works, on a machine without a GPU; its times mean nothing.
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp

from ejkernel_nsa import sparsity
from ejkernel_nsa.backends.triton import compressed_attention as cmp
from ejkernel_nsa.problem import token_layout

from bench_timing import median_ms  # noqa: E402 (benchmarks/ is the script's folder)

Tile = cmp.Tile

# The last line of each list: tiles that 16-bit blocks (half the shared memory per stage) made
# worth trying; in this setting each compiles for sm_90 without spills and within 227 KB (dq with
# 256 rows and 64 blocks spills, so it is left out).
CANDIDATES = {
    "fwd": [Tile(64, 32, 4, 2), Tile(128, 32, 8, 2), Tile(128, 64, 8, 2), Tile(256, 32, 8, 2), Tile(128, 64, 4, 2),
            Tile(256, 64, 8, 2), Tile(256, 32, 8, 3), Tile(128, 64, 8, 3), Tile(256, 64, 8, 3)],
    "dq": [Tile(64, 32, 4, 2), Tile(128, 32, 8, 2), Tile(128, 64, 8, 2), Tile(256, 32, 8, 2),
           Tile(128, 32, 8, 3), Tile(128, 64, 8, 3), Tile(256, 32, 8, 3)],
    "dkv": [Tile(32, 32, 8, 2), Tile(64, 32, 8, 2), Tile(128, 32, 8, 2), Tile(32, 64, 8, 2), Tile(64, 64, 8, 2),
            Tile(32, 32, 4, 2), Tile(64, 32, 4, 2), Tile(32, 32, 8, 3),
            Tile(64, 64, 4, 2), Tile(32, 32, 4, 3), Tile(64, 32, 4, 3)],
}
# --tiny: tiles of the 16-row minimum and one step up, for T=64, G=2, D=16.
TINY_CANDIDATES = {stage: [Tile(16, 16, 4, 2), Tile(32, 16, 4, 2)] for stage in CANDIDATES}
PAPER_SHAPE = dict(HQ=64, H=4, D=128, BS=64, dtype=jnp.bfloat16)
TINY_SHAPE = dict(HQ=4, H=2, D=16, BS=16, dtype=jnp.float32)


def largest_difference(result, reference) -> float:
    leaves = zip(jax.tree.leaves(result), jax.tree.leaves(reference))
    return max(float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)))) for a, b in leaves)


def kernel_calls(T: int, HQ: int, H: int, D: int, BS: int, dtype):
    """Per kernel, a function of `tile` that launches it alone on fresh inputs of this shape."""
    NB = -(-T // BS)
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (1, T, HQ, D), dtype)
    # Blocks in the query's dtype: the kernels get mean_pool's float32 output cast to it (`_blocks_for_dots`).
    k_cmp = jax.random.normal(keys[1], (1, NB, H, D), dtype)
    v_cmp = jax.random.normal(keys[2], (1, NB, H, D), dtype)
    d_out = jax.random.normal(keys[3], (1, T, HQ, D), dtype)
    layout = token_layout(T, BS, None)
    viewer_lo, viewer_hi = sparsity.block_viewers(T, BS, None)
    scale = D ** -0.5
    geometry = (BS, BS, scale)  # stride, length (SPEC 9: blocks of length l = d), scale
    out, lse = jax.jit(lambda *a: cmp._fwd(*a, *geometry))(q, k_cmp, v_cmp, layout.pos, layout.first_block)
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
    grads = (q, k_cmp, v_cmp, d_out, lse, delta, layout.pos, layout.first_block)
    return {
        "fwd": (lambda tile: jax.jit(lambda *a: cmp._fwd(*a, *geometry, tile=tile)),
                (q, k_cmp, v_cmp, layout.pos, layout.first_block)),
        "dq": (lambda tile: jax.jit(lambda *a: cmp._bwd_dq(*a, *geometry, tile=tile)), grads),
        "dkv": (lambda tile: jax.jit(lambda *a: cmp._bwd_dkv(*a, *geometry, tile=tile)),
                grads + (viewer_lo, viewer_hi)),
    }


def describe(stage: str, tile: Tile) -> str:
    return f"{stage:<4} rows={tile.rows:<3} blocks={tile.block_tile:<3} warps={tile.num_warps} stages={tile.num_stages}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-len", type=int, default=None, help="T (default 65536; 64 with --tiny)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--kernels", default="fwd,dq,dkv", help="which of fwd, dq, dkv to sweep")
    parser.add_argument("--tiny", action="store_true",
                        help="a tiny float32 shape and two small tiles per kernel: checks the sweep on a CPU "
                             "(with EJKERNEL_NSA_INTERPRET=1), times nothing worth reading")
    args = parser.parse_args(argv)
    shape = TINY_SHAPE if args.tiny else PAPER_SHAPE
    candidates = TINY_CANDIDATES if args.tiny else CANDIDATES
    T = args.seq_len or (64 if args.tiny else 65536)
    wanted = args.kernels.split(",")
    unknown = sorted(set(wanted) - set(candidates))
    if unknown:
        parser.error(f"--kernels: unknown kernel(s) {', '.join(unknown)}; choose from fwd, dq, dkv")
    print(f"device: {jax.devices()[0].device_kind}; T={T} HQ={shape['HQ']} H={shape['H']} D={shape['D']} "
          f"BS={shape['BS']} {jnp.dtype(shape['dtype']).name}", flush=True)
    calls = kernel_calls(T, **shape)
    best = {}
    for stage in wanted:
        launch_under, stage_args = calls[stage]
        default = cmp.default_tile(stage, shape["D"], shape["D"], shape["dtype"])
        reference = jax.block_until_ready(launch_under(default)(*stage_args))
        print(f"{describe(stage, default)}: the default tile (reference)", flush=True)
        for tile in candidates[stage]:
            label = describe(stage, tile)
            try:
                # A new jitted function per tile: the tile is read when tracing.
                launch = launch_under(tile)
                result = jax.block_until_ready(launch(*stage_args))  # the first call compiles
                ms = median_ms(launch, *stage_args, repeats=args.repeats, warmup=1)
            except Exception as error:  # a tile that does not fit fails here; the sweep goes on
                print(f"{label}: failed: {type(error).__name__}: {str(error).splitlines()[0][:160]}", flush=True)
                continue
            print(f"{label}: {ms:8.3f} ms  (max |diff| from the default tile {largest_difference(result, reference):.2e})",
                  flush=True)
            if stage not in best or ms < best[stage][0]:
                best[stage] = (ms, label)
    print("\nbest per kernel:")
    for stage, (ms, label) in best.items():
        print(f"  {label}: {ms:.3f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
