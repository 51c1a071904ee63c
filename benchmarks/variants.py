"""Time design variants of the Triton pieces on one GPU: loop orders and tiles, each piece alone.

Where `nsa_bench.py` compares our automatic choice with the peers, this script answers "which
design, which tiles" (benchmarks/NOTES.md records what it printed). Every variant is checked
against the default one first (same inputs; relative L2), then timed: median of `--repeats`
synchronised runs after a warm-up. Tiles are passed explicitly to each piece's `run(tiles=...)`.

  python benchmarks/variants.py --groups 1,4,16 --seq-len 65536 --json $OUT/variants.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

import ejkernel_nsa as nsa
from ejkernel_nsa import sparsity
from ejkernel_nsa.backends.triton import selected_attention as slc
from ejkernel_nsa.backends.triton import selection as sel_kernel
from ejkernel_nsa.problem import token_layout

from bench_timing import median_ms  # noqa: E402 (benchmarks/ is the script's folder)

SHAPES = {1: (32, 32), 2: (32, 16), 4: (32, 8), 8: (64, 8), 16: (64, 4)}  # G -> (HQ, H)


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def inputs(group: int, seq_len: int, head_dim: int, block_size: int, num_slots: int, dtype, seed: int = 0,
           geometry: dict | None = None):
    """Fresh random q, k, v and cotangent, and the compression, lse and selection computed from
    them (`geometry`: SPEC 9's `compress_block_size` / `compress_stride`, default none)."""
    geometry = geometry or {}
    num_q_heads, num_kv_heads = SHAPES[group]
    keys = jax.random.split(jax.random.key(seed), 5)
    q = jax.random.normal(keys[0], (1, seq_len, num_q_heads, head_dim), dtype)
    k = jax.random.normal(keys[1], (1, seq_len, num_kv_heads, head_dim), dtype)
    v = jax.random.normal(keys[2], (1, seq_len, num_kv_heads, head_dim), dtype)
    d_out = jax.random.normal(keys[3], (1, seq_len, num_q_heads, head_dim), dtype)
    k_cmp, v_cmp = nsa.mean_pool(k, v, block_size, **geometry)
    _, lse = nsa.compressed_attention(q, k_cmp, v_cmp, block_size, **geometry)
    indices = nsa.select_blocks(q, k_cmp, lse, num_slots, block_size, **geometry)
    return dict(q=q, k=k, v=v, d_out=d_out, k_cmp=k_cmp, lse=lse, indices=jax.block_until_ready(indices))


JSON_PATH: str | None = None


def record(rows, **fields):
    rows.append(fields)
    print(json.dumps(fields), flush=True)
    # Written after every record: a run cut by a time limit keeps what it measured.
    if JSON_PATH:
        with open(JSON_PATH, "w") as f:
            json.dump(rows, f, indent=1)


def selected_fns(args):
    """Jitted selected attention with the given tiles: forward, and the gradients of a
    cotangent-weighted sum (q, k, v)."""
    scale = args.head_dim**-0.5

    def fwd(tiles):
        return jax.jit(lambda q, k, v, i: slc.run(q, k, v, i, args.num_slots, block_size=args.block_size,
                                                   scale=scale, segments=None, tiles=tiles))

    def fwd_bwd(tiles):
        def loss(q, k, v, i, do):
            out = slc.run(q, k, v, i, args.num_slots, block_size=args.block_size, scale=scale, segments=None,
                          tiles=tiles)
            return jnp.sum(out.astype(jnp.float32) * do.astype(jnp.float32))
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))

    return fwd, fwd_bwd


def measure_selected(rows, args, group, name, mode, fn, operands, reference: list, error_key: str):
    """Time one selected-attention variant `fn(*operands)` and record it with its relative error
    against `reference` (the first variant's results when it starts empty: it is filled then). A
    variant that fails is a result, recorded with its error, not the end of the sweep."""
    try:
        result = fn(*operands)
        values = list(result) if isinstance(result, (tuple, list)) else [result]
        if not reference:
            reference.extend(np.asarray(v, np.float32) for v in values)
        err = max(rel(v, r) for v, r in zip(values, reference))
        ms = median_ms(fn, *operands, repeats=args.repeats)
        record(rows, piece="selected_attention", mode=mode, G=group, T=args.seq_len, variant=name, median_ms=ms,
               **{error_key: err})
    except Exception as error:  # noqa: BLE001
        record(rows, piece="selected_attention", mode=mode, G=group, T=args.seq_len, variant=name,
               error=f"{type(error).__name__}: {str(error)[:300]}")


def selected_variants(args, group, x, rows):
    bs, itemsize = args.block_size, jnp.dtype(args.dtype).itemsize

    fwd, fwd_bwd = selected_fns(args)

    operands = (x["q"], x["k"], x["v"], x["indices"])
    base_fwd = np.asarray(fwd(slc.Tiles(loop_order="token"))(*operands), np.float32)
    fwd_block = slc.block_config(bs, args.head_dim, args.head_dim, itemsize)
    bwd_block = slc.block_config(bs, args.head_dim, args.head_dim, itemsize, backward=True)
    forward_variants = [("token", slc.Tiles(loop_order="token")), ("block", slc.Tiles(loop_order="block"))]
    for chunks in (4, 16):
        forward_variants.append((f"block chunks={chunks}",
                                 slc.Tiles(loop_order="block", forward=dataclasses.replace(fwd_block, chunks=chunks))))
    if group >= 8:  # the crossover region: the other variants were measured at G = 1, 4, 16
        forward_variants = forward_variants[:2]
    for name, tiles in forward_variants:
        measure_selected(rows, args, group, name, "fwd", fwd(tiles), operands, [base_fwd], "rel_err_vs_token")
    grads_base = []
    backward_variants = [
        ("block fwd + fused bwd", slc.Tiles(loop_order="block", backward_order="fused")),
        ("token fwd + split bwd", slc.Tiles(loop_order="token", backward_order="split")),
        ("block fwd + split bwd", slc.Tiles(loop_order="block", backward_order="split")),
        ("token fwd + fused bwd", slc.Tiles(loop_order="token", backward_order="fused")),
        ("block fwd + fused bwd tile=32", slc.Tiles(loop_order="block", backward_order="fused",
                                                    backward=dataclasses.replace(bwd_block, block_tile=32,
                                                                                 subs=max(1, bs // 32)))),
        ("block fwd + fused bwd chunks=8", slc.Tiles(loop_order="block", backward_order="fused",
                                                     backward=dataclasses.replace(bwd_block, chunks=8))),
    ]
    for name, tiles in backward_variants:
        measure_selected(rows, args, group, name, "fwd_bwd", fwd_bwd(tiles), operands + (x["d_out"],), grads_base,
                         "rel_err_vs_first")

    # The index alone: what the block-major kernels pay before they start.
    def index(i):
        sb = sparsity.selected_blocks(i, args.num_slots, num_kv_heads=x["k"].shape[2], block_size=bs, segments=None)
        pairs, offsets = sparsity.reader_pairs_by_key_block(sb, bs)
        tiles = sparsity.reader_tiles(offsets, num_tokens=args.seq_len, num_slots=args.num_slots, group=group,
                                      rows=fwd_block.rows, chunks=fwd_block.chunks)
        return pairs, offsets, tiles
    ms = median_ms(jax.jit(index), x["indices"], repeats=args.repeats)
    record(rows, piece="selected_attention", mode="index", G=group, T=args.seq_len, variant="reader pairs + tiles",
           median_ms=ms)


def token_variants(args, group, x, rows):
    """The token-major kernels' launch: warps, key tile and pipeline stages, forward (token
    loop order) and the split backward's token-major dq (its dk/dv kernel at its default)."""
    bs, itemsize = args.block_size, jnp.dtype(args.dtype).itemsize
    base_cfg = slc.token_config(group, bs, args.head_dim, args.head_dim, itemsize)

    def cfg(warps, tile, stages):
        tile = min(tile, base_cfg.block_tile * base_cfg.subs)
        return dataclasses.replace(base_cfg, num_warps=warps, block_tile=tile,
                                   subs=base_cfg.block_tile * base_cfg.subs // tile, num_stages=stages)

    operands = (x["q"], x["k"], x["v"], x["indices"])
    fwd, fwd_bwd = selected_fns(args)

    base = np.asarray(fwd(slc.Tiles(loop_order="token"))(*operands), np.float32)
    grads_base = []
    for warps, tile, stages in ((4, 64, 2), (1, 64, 2), (2, 64, 2), (8, 64, 2), (1, 64, 3), (2, 64, 3),
                                (1, 32, 2), (2, 32, 3), (4, 32, 3)):
        name = f"token warps={warps} tile={tile} stages={stages}"
        tiles = slc.Tiles(loop_order="token", backward_order="split", token=cfg(warps, tile, stages))
        measure_selected(rows, args, group, name, "fwd", fwd(tiles), operands, [base], "rel_err_vs_first")
        measure_selected(rows, args, group, name, "fwd_bwd", fwd_bwd(tiles), operands + (x["d_out"],), grads_base,
                         "rel_err_vs_first")


def backward_variants(args, group, x, rows):
    """The split backward's block-major dk/dv kernel: rows per chunk, chunks per work tile (a
    block with more chunks than a tile takes adds its dk/dv by atomics) and warps; the forward
    and the token-major dq stay at their defaults."""
    bs, itemsize = args.block_size, jnp.dtype(args.dtype).itemsize
    base = slc.block_config(bs, args.head_dim, args.head_dim, itemsize, backward=True)
    _, fwd_bwd = selected_fns(args)
    operands = (x["q"], x["k"], x["v"], x["indices"], x["d_out"])
    grads_base = []
    for rows_, chunks, warps in ((base.rows, base.chunks, base.num_warps), (64, 16, 8), (64, 32, 8), (64, 64, 8),
                                 (128, 8, 8), (128, 32, 8), (64, 32, 4), (64, 64, 4), (128, 32, 4)):
        name = f"split bwd rows={rows_} chunks={chunks} warps={warps}"
        tiles = slc.Tiles(backward_order="split",
                          backward=dataclasses.replace(base, rows=rows_, chunks=chunks, num_warps=warps))
        measure_selected(rows, args, group, name, "fwd_bwd", fwd_bwd(tiles), operands, grads_base, "rel_err_vs_first")


def selection_variants(args, group, x, rows):
    scale = args.head_dim**-0.5
    bs = args.block_size
    layout_counts = args.num_slots

    def select(tiles):
        return jax.jit(lambda q, kc, lse: sel_kernel.run(q, kc, lse, block_counts=layout_counts,
                                                          num_slots=args.num_slots, block_size=bs, scale=scale,
                                                          segments=None, tiles=tiles, **args.geometry))

    operands = (x["q"], x["k_cmp"], x["lse"])
    base = np.asarray(select(None)(*operands))
    num_out = args.num_slots
    default = sel_kernel.default_tiles(group, args.head_dim, num_out, args.dtype)
    variants = [("default (narrow keys)", None), ("64-bit keys", dataclasses.replace(default, narrow_keys=False))]
    for rows_, blocks, warps in ((128, 32, 8), (64, 64, 4), (64, 16, 4), (256, 32, 8), (128, 16, 8), (256, 16, 8)):
        variants.append((f"rows={rows_} blocks={blocks} warps={warps}",
                         sel_kernel.default_tiles(group, args.head_dim, num_out, args.dtype, rows=rows_,
                                                  blocks=blocks, num_warps=warps)))
    for name, tiles in variants:
        try:
            fn = select(tiles)
            got = np.asarray(fn(*operands))
            agree = float(np.mean(np.sort(got, -1) == np.sort(base, -1)))
            ms = median_ms(fn, *operands, repeats=args.repeats)
            record(rows, piece="selection", mode="fwd", G=group, T=args.seq_len, variant=name, median_ms=ms,
                   slot_agreement=agree, tiles=dataclasses.asdict(tiles) if tiles else None)
        except Exception as error:  # noqa: BLE001
            record(rows, piece="selection", mode="fwd", G=group, T=args.seq_len, variant=name,
                   error=f"{type(error).__name__}: {str(error)[:300]}")


def whole_call(args, group, x, rows):
    num_q_heads = x["q"].shape[2]
    gates = jax.nn.sigmoid(jax.random.normal(jax.random.key(9), (3, 1, args.seq_len, num_q_heads), jnp.float32))
    gates = gates.astype(args.dtype)
    for window in (512, 0):
        opts = dict(block_counts=args.num_slots, block_size=args.block_size, window_size=window)

        def call(q, k, v, g):
            return nsa.native_sparse_attention(q, k, v, g[0], g[1], g_swa=g[2] if window else None, **opts)

        def loss(q, k, v, g, do):
            return jnp.sum(call(q, k, v, g).astype(jnp.float32) * do.astype(jnp.float32))

        fwd = jax.jit(call)
        grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))
        for mode, fn, operands in (("fwd", fwd, (x["q"], x["k"], x["v"], gates)),
                                   ("fwd_bwd", grad, (x["q"], x["k"], x["v"], gates, x["d_out"]))):
            try:
                ms = median_ms(fn, *operands, repeats=args.repeats)
                record(rows, piece=None, mode=mode, G=group, T=args.seq_len, variant=f"automatic W={window}",
                       median_ms=ms)
            except Exception as error:  # noqa: BLE001
                record(rows, piece=None, mode=mode, G=group, T=args.seq_len, variant=f"automatic W={window}",
                       error=f"{type(error).__name__}: {str(error)[:300]}")


def check_against_xla(args, rows):
    """The new kernels against the XLA backend on the GPU, at a size the tests do not reach."""
    for dtype, group in (("bfloat16", 1), ("bfloat16", 4), ("float32", 2), ("bfloat16", 16)):
        x = inputs(group, 4096, 128, 64, 16, dtype, seed=3)
        operands = (x["q"], x["k"], x["v"], x["indices"])
        want = nsa.apply_native_sparse_attention(*operands, 16, 64, backend="xla")

        def loss(backend, q, k, v, i, do):
            out = nsa.apply_native_sparse_attention(q, k, v, i, 16, 64, backend=backend)
            return jnp.sum(out.astype(jnp.float32) * do.astype(jnp.float32))

        grads_want = jax.grad(loss, argnums=(1, 2, 3))("xla", *operands, x["d_out"])
        for order in ("block", "token"):
            got = slc.run(*operands, 16, block_size=64, scale=128**-0.5, segments=None,
                          tiles=slc.Tiles(loop_order=order))
            grads = jax.grad(lambda q, k, v: jnp.sum(slc.run(q, k, v, x["indices"], 16, block_size=64,
                                                             scale=128**-0.5, segments=None,
                                                             tiles=slc.Tiles(loop_order=order)).astype(jnp.float32)
                                                     * x["d_out"].astype(jnp.float32)), argnums=(0, 1, 2))(
                x["q"], x["k"], x["v"])
            record(rows, piece="selected_attention", mode="check", G=group, dtype=dtype, variant=order,
                   out_rel_err=rel(got, want), grad_rel_err=[rel(g, w) for g, w in zip(grads, grads_want)],
                   finite=bool(jnp.all(jnp.isfinite(got))))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", default="1,4,16")
    parser.add_argument("--seq-len", type=int, default=65536)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--num-slots", type=int, default=16)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--parts", default="check,selected,selection,whole")
    parser.add_argument("--json", default=None)
    parser.add_argument("--compress", default=None, metavar="L,D",
                        help="SPEC 9's compression geometry for the selection sweep, e.g. 32,16 (default l = d = block)")
    args = parser.parse_args(argv)
    args.geometry = {}
    if args.compress:
        length, stride = (int(x) for x in args.compress.split(","))
        args.geometry = dict(compress_block_size=length, compress_stride=stride)
    global JSON_PATH
    JSON_PATH = args.json
    parts = set(args.parts.split(","))
    rows: list[dict] = []
    print("device:", jax.devices()[0].device_kind, flush=True)
    try:
        if "check" in parts:
            check_against_xla(args, rows)
        for group in (int(g) for g in args.groups.split(",")):
            x = inputs(group, args.seq_len, args.head_dim, args.block_size, args.num_slots, args.dtype,
                       geometry=args.geometry)
            if "selected" in parts:
                selected_variants(args, group, x, rows)
            if "token" in parts:
                token_variants(args, group, x, rows)
            if "backward" in parts:
                backward_variants(args, group, x, rows)
            if "selection" in parts:
                selection_variants(args, group, x, rows)
            if "whole" in parts:
                whole_call(args, group, x, rows)
            del x
    finally:
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=1)
        for r in rows:
            if "median_ms" in r:
                print(f"{r['piece'] or 'whole'}\t{r['mode']}\tG={r['G']}\t{r['variant']:36s}\t{r['median_ms']:9.3f} ms")
            elif "error" in r:
                print(f"{r['piece'] or 'whole'}\t{r['mode']}\tG={r.get('G')}\t{r['variant']:36s}\tERROR {r['error'][:120]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
