"""Attention over the selected blocks (SPEC section 4) as Mosaic GPU kernels: forward, dq, dk/dv.

Tokens choose their own blocks, yet a wgmma needs 64 rows. A program owns one 64-row tile (`BT`
consecutive tokens x `HP` query heads, `tiles.py`) and walks the **union** of the blocks its
tokens selected, built in XLA (sorted, de-duplicated, static capacity `BT * S`). Each block's
`[BS, D]` keys are loaded once for the whole tile; a row takes part only if its own token chose
that block (its `S` selected block starts are compared with the block's) and the key is not in
its future. Neighbouring tokens share most of their blocks (the forced ones, and similar queries
pick similar blocks), so the union is usually far smaller than `BT * S` and the tile stays full.

Backward: `dq` re-walks the union. `dk, dv`: an inverted index (XLA, static sizes) lists, per key
block, the row tiles whose union holds it; one program per key block walks those tiles (all head
chunks), with the key rows on the wgmma M axis (`K Q^T`, `P^T dO`, `dS^T Q`), and writes its own
`[KT, D]` rows: no atomics, deterministic. `KT = max(BS, 64)` rows are loaded so that the wgmma M
is at least 64; the rows past the block are masked out.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu

from ejkernel_nsa.backends.common import host
from ejkernel_nsa.backends.common.host import NO_BLOCK
from ejkernel_nsa.backends.common.containment import (
    finite_backward_rows,
    finite_or_zero,
    nonfinite_prefix,
    seen_nonfinite,
)
from ejkernel_nsa.backends.common.vjp import attention_delta
from ejkernel_nsa.backends.pallas_mosaic import tiles
from ejkernel_nsa.backends.pallas_mosaic.tiles import LOG2E, ROWS
from ejkernel_nsa.problem import NSAProblem, Piece, Segments, num_compressed_blocks, token_layout

PIECE = Piece.SELECTED_ATTENTION
# The per-tile union lives in shared memory: BT * S entries, 16 KiB at most.
MAX_UNION = 4096
# This piece's row table (`last_key_meta`) keeps the last visible key row where the token was.
META_LAST_KEY = tiles.META_TOKEN


def supports(problem: NSAProblem) -> str | None:
    # float32 runs as two bfloat16 parts per operand (`tiles.split`).
    # Each row compares its S slots with every union block (unrolled), and the [S, 64] slot
    # table is one TMA box (at most 256 rows).
    reason = tiles.common_decline(problem, float32=True) or host.too_many_slots(problem)
    if reason is not None:
        return reason
    tokens = tiles.ROWS // min(problem.group_size, tiles.ROWS)
    if tokens * problem.num_slots > MAX_UNION:
        return (f"{problem.num_slots} slots x {tokens} tokens per 64-row tile exceed the {MAX_UNION}-entry "
                "block union a tile keeps in shared memory")
    shape = _shape(problem.seq_len, problem.num_kv_heads, problem.group_size, problem.head_dim, problem.value_dim,
                   problem.block_size, problem.num_slots, 1.0, problem.num_seqs, problem.dtype)
    return tiles.smem_decline([(name, factory(shape)[1]) for name, factory in (
        ("selected_attention_fwd_kernel", _fwd_kernel), ("selected_attention_bwd_kernel_dq", _dq_kernel),
        ("selected_attention_bwd_kernel_dkv", _dkv_kernel))])


@dataclasses.dataclass(frozen=True)
class Shape(tiles.Operands):
    tiling: tiles.RowTiling
    block_size: int
    num_slots: int
    scale: float
    dk: int
    dv: int
    head_dim: int
    value_dim: int
    union: int  # entries of a tile's union array: 1 (the count) + BT * S, padded to 64
    num_key_blocks: int
    dtype: str


    @property
    def key_rows(self) -> int:  # KT
        return max(self.block_size, ROWS)


def _member(sel_smem, block, load, num_slots):
    """Per row: did the row's token select the packed key block `block`?"""
    hit = load(sel_smem.at[0]) == block
    for slot in range(1, num_slots):
        hit |= load(sel_smem.at[slot]) == block
    return hit


def _block_row(block, block_size):
    """The first row of packed key block `block` in the blocked key layout (`key_rows`): a
    multiple of the block size, so that the TMA box starts on a whole (8, swizzle) smem tile,
    which Mosaic must prove when it lowers the copy."""
    return pl.multiple_of(block * block_size, block_size)


def _union_entry(union_smem, i):
    """The `i`-th packed key block of a tile's union (`[U / 64, 64]`, entry 0 is the count). Kept 2-D
    so that no TMA box dimension exceeds 256 elements."""
    return union_smem[tiles.div(i + 1, ROWS), tiles.rem(i + 1, ROWS)]


def _fwd_kernel(shape: Shape):
    BS, S, dk, dv, HEAD_CHUNKS = shape.block_size, shape.num_slots, shape.dk, shape.dv, shape.tiling.head_chunks
    ot, P = shape.operand, shape.parts
    sw = tiles.swizzle_for(ot, dk, dv, BS)  # one smem tiling for every wgmma operand
    tile_shape = (ROWS, BS)
    # Barrier slots: the first index each group of copies takes (`tiles.issue` takes one per copy,
    # two for a two-part operand); each step's k and v are in flight together.
    ROW_TILE_BARS, K_BARS, V_BARS = 0, 8, 10

    def body(q_ref, k_ref, v_ref, meta_ref, union_ref, sel_ref, o_ref, lse_ref, *, q_smem, k_smem, v_smem, p_smem,
             o_smem, meta_smem, union_smem, sel_smem, lse_smem, bars):
        tile, b, hn, h, rows = tiles.row_tile_program(k_ref.shape[1], HEAD_CHUNKS)
        tiles.fetch([(q_ref.at[b, hn, :, rows], q_smem), (meta_ref.at[tile], meta_smem),
                     (union_ref.at[b, h, tile], union_smem), (sel_ref.at[b, h, tile], sel_smem)], bars, ROW_TILE_BARS)
        last_key = tiles.rows(tiles.load_rows(meta_smem.at[META_LAST_KEY]), tile_shape)

        def step(i, carry):
            acc, m, l = carry
            block = _union_entry(union_smem, i)
            start = _block_row(block, BS)
            k_bars = tiles.issue([(k_ref.at[b, h, :, pl.ds(start, BS)], k_smem)], bars, K_BARS)
            v_bars = tiles.issue([(v_ref.at[b, h, :, pl.ds(start, BS)], v_smem)], bars, V_BARS)
            tiles.wait(bars, k_bars)
            s = tiles.matmul_parts(q_smem, k_smem, tile_shape, transpose_b=True) * (shape.scale * LOG2E)
            keys = tiles.iota(tile_shape, 1) + start
            visible = tiles.rows(_member(sel_smem, block, tiles.load_rows, S), tile_shape) & (keys <= last_key)
            p, alpha, m, l = tiles.softmax_step(s, visible, m, l)
            tiles.store_parts(p_smem, p, P)
            tiles.wait(bars, v_bars)
            pv = tiles.matmul_parts(p_smem, v_smem, (ROWS, dv))
            return acc * tiles.rows(alpha, (ROWS, dv)) + pv, m, l

        acc, m, l = lax.fori_loop(0, union_smem[0, 0], step, tiles.softmax_init(dv))
        o_smem[...], lse2 = tiles.softmax_finish(acc, m, l)
        lse_smem[...] = lse2 / LOG2E
        tiles.store([(o_smem, o_ref.at[b, hn, rows]), (lse_smem, lse_ref.at[b, hn, rows])])

    scratch = dict(
        q_smem=tiles.smem((P, ROWS, dk), ot, sw), k_smem=tiles.smem((P, BS, dk), ot, sw),
        v_smem=tiles.smem((P, BS, dv), ot, sw), p_smem=tiles.smem((P, ROWS, BS), ot, sw),
        o_smem=plgpu.SMEM((ROWS, dv), jnp.float32), meta_smem=plgpu.SMEM((4, ROWS), jnp.int32),
        union_smem=plgpu.SMEM((shape.union // ROWS, ROWS), jnp.int32), sel_smem=plgpu.SMEM((S, ROWS), jnp.int32),
        lse_smem=plgpu.SMEM((ROWS,), jnp.float32), bars=tiles.barriers(6),
    )
    return body, scratch


def _dq_kernel(shape: Shape):
    BS, S, dk, dv, HEAD_CHUNKS = shape.block_size, shape.num_slots, shape.dk, shape.dv, shape.tiling.head_chunks
    ot, P = shape.operand, shape.parts
    sw = tiles.swizzle_for(ot, dk, dv, BS)  # one smem tiling for every wgmma operand
    tile_shape = (ROWS, BS)
    # Barrier slots: the first index each group of copies takes (`tiles.issue` takes one per copy,
    # two for a two-part operand); each step's k and v reuse slots of the row tile's,
    # which it has waited for.
    ROW_TILE_BARS, KV_BARS = 0, 7

    def body(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, meta_ref, union_ref, sel_ref, dq_ref, *, q_smem,
             do_smem, k_smem, v_smem, ds_smem, dq_smem, meta_smem, union_smem, sel_smem, lse_smem, delta_smem,
             bars):
        tile, b, hn, h, rows = tiles.row_tile_program(k_ref.shape[1], HEAD_CHUNKS)
        tiles.fetch([(q_ref.at[b, hn, :, rows], q_smem), (do_ref.at[b, hn, :, rows], do_smem),
                     (meta_ref.at[tile], meta_smem), (union_ref.at[b, h, tile], union_smem),
                     (sel_ref.at[b, h, tile], sel_smem), (lse_ref.at[b, hn, rows], lse_smem),
                     (delta_ref.at[b, hn, rows], delta_smem)], bars, ROW_TILE_BARS)
        last_key = tiles.rows(tiles.load_rows(meta_smem.at[META_LAST_KEY]), tile_shape)
        seen, lse, delta = tiles.saved_softmax(lse_smem, delta_smem, tiles.load_rows, tiles.rows, tile_shape)

        def step(i, dq):
            block = _union_entry(union_smem, i)
            start = _block_row(block, BS)
            tiles.fetch([(k_ref.at[b, h, :, pl.ds(start, BS)], k_smem),
                         (v_ref.at[b, h, :, pl.ds(start, BS)], v_smem)], bars, KV_BARS)
            s = tiles.matmul_parts(q_smem, k_smem, tile_shape, transpose_b=True) * (shape.scale * LOG2E)
            keys = tiles.iota(tile_shape, 1) + start
            visible = tiles.rows(_member(sel_smem, block, tiles.load_rows, S), tile_shape) & (keys <= last_key) & seen
            p = jnp.where(visible, jnp.exp2(s - lse), 0.0)
            dp = tiles.matmul_parts(do_smem, v_smem, tile_shape, transpose_b=True)
            tiles.store_parts(ds_smem, p * (dp - delta), P)
            return dq + tiles.matmul_parts(ds_smem, k_smem, (ROWS, dk))

        dq = lax.fori_loop(0, union_smem[0, 0], step, tiles.zeros((ROWS, dk)))
        dq_smem[...] = dq * shape.scale
        tiles.store([(dq_smem, dq_ref.at[b, hn, rows])])

    scratch = dict(
        q_smem=tiles.smem((P, ROWS, dk), ot, sw), do_smem=tiles.smem((P, ROWS, dv), ot, sw),
        k_smem=tiles.smem((P, BS, dk), ot, sw), v_smem=tiles.smem((P, BS, dv), ot, sw),
        ds_smem=tiles.smem((P, ROWS, BS), ot, sw), dq_smem=plgpu.SMEM((ROWS, dk), jnp.float32),
        meta_smem=plgpu.SMEM((4, ROWS), jnp.int32), union_smem=plgpu.SMEM((shape.union // ROWS, ROWS), jnp.int32),
        sel_smem=plgpu.SMEM((S, ROWS), jnp.int32), lse_smem=plgpu.SMEM((ROWS,), jnp.float32),
        delta_smem=plgpu.SMEM((ROWS,), jnp.float32), bars=tiles.barriers(9),
    )
    return body, scratch


def _dkv_kernel(shape: Shape):
    BS, S, dk, dv, HEAD_CHUNKS, KT = (shape.block_size, shape.num_slots, shape.dk, shape.dv, shape.tiling.head_chunks,
                              shape.key_rows)
    ot, P = shape.operand, shape.parts
    sw = tiles.swizzle_for(ot, dk, dv, BS)  # one smem tiling for every wgmma operand
    tile_shape = (KT, ROWS)
    # Barrier slots: the first index each group of copies takes (`tiles.issue` takes one per copy,
    # two for a two-part operand); the key block's reader range, its k and v, each
    # 64-entry part of its reader list, each reading tile's rows and selection, each head chunk's inputs.
    KMETA_BARS, KV_BARS, READERS_BAR, READER_TILE_BARS, HEAD_CHUNK_BARS = 0, 1, 3, 4, 6

    def body(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, meta_ref, sel_ref, readers_ref, kmeta_ref, dk_ref,
             dv_ref, *, k_smem, v_smem, q_smem, do_smem, p_smem, ds_smem, dk_smem, dv_smem, kmeta_smem,
             readers_smem, meta_smem, sel_smem, lse_smem, delta_smem, bars):
        kb, bh = lax.axis_index("key_block"), lax.axis_index("bh")
        b, h = tiles.div(bh, k_ref.shape[1]), tiles.rem(bh, k_ref.shape[1])
        tiles.fetch([(kmeta_ref.at[b, h, kb], kmeta_smem)], bars, KMETA_BARS)
        lo, hi = kmeta_smem[0], kmeta_smem[1]
        start = _block_row(kb, BS)
        tiles.fetch([(k_ref.at[b, h, :, pl.ds(start, KT)], k_smem), (v_ref.at[b, h, :, pl.ds(start, KT)], v_smem)],
                    bars, KV_BARS)
        in_block = tiles.iota(tile_shape, 0) < BS
        keys = tiles.iota(tile_shape, 0) + start

        def reader(i, carry):
            # The list of reading tiles arrives 64 entries at a time.
            offset = tiles.rem(i, ROWS)

            @pl.when((i == lo) | (offset == 0))
            def _():
                plgpu.copy_gmem_to_smem(readers_ref.at[b, h, pl.ds(i - offset, ROWS)], readers_smem,
                                        bars.at[READERS_BAR])
                plgpu.barrier_wait(bars.at[READERS_BAR])

            tile = readers_smem[offset]
            rows = pl.ds(tile * ROWS, ROWS)
            tiles.fetch([(meta_ref.at[tile], meta_smem), (sel_ref.at[b, h, tile], sel_smem)], bars, READER_TILE_BARS)
            last_key = tiles.cols(tiles.load_cols(meta_smem.at[META_LAST_KEY]), tile_shape)
            member = tiles.cols(_member(sel_smem, kb, tiles.load_cols, S), tile_shape)
            visible = member & in_block & (keys <= last_key)

            def head_chunk(c, carry):
                d_k, d_v = carry
                hn = h * HEAD_CHUNKS + c
                tiles.fetch([(q_ref.at[b, hn, :, rows], q_smem), (do_ref.at[b, hn, :, rows], do_smem),
                             (lse_ref.at[b, hn, rows], lse_smem), (delta_ref.at[b, hn, rows], delta_smem)],
                            bars, HEAD_CHUNK_BARS)
                seen, lse, delta = tiles.saved_softmax(lse_smem, delta_smem, tiles.load_cols, tiles.cols, tile_shape)
                s_t = tiles.matmul_parts(k_smem, q_smem, tile_shape, transpose_b=True) * (shape.scale * LOG2E)
                p_t = jnp.where(visible & seen, jnp.exp2(s_t - lse), 0.0)
                tiles.store_parts(p_smem, p_t, P)
                d_v = d_v + tiles.matmul_parts(p_smem, do_smem, (KT, dv))
                dp_t = tiles.matmul_parts(v_smem, do_smem, tile_shape, transpose_b=True)
                tiles.store_parts(ds_smem, p_t * (dp_t - delta), P)
                return d_k + tiles.matmul_parts(ds_smem, q_smem, (KT, dk)), d_v

            return lax.fori_loop(0, HEAD_CHUNKS, head_chunk, carry)

        d_k, d_v = lax.fori_loop(lo, hi, reader, (tiles.zeros((KT, dk)), tiles.zeros((KT, dv))))
        dk_smem[...] = d_k * shape.scale
        dv_smem[...] = d_v
        tiles.store([(dk_smem, dk_ref.at[b, h, kb]), (dv_smem, dv_ref.at[b, h, kb])])

    scratch = dict(
        k_smem=tiles.smem((P, KT, dk), ot, sw), v_smem=tiles.smem((P, KT, dv), ot, sw),
        q_smem=tiles.smem((P, ROWS, dk), ot, sw), do_smem=tiles.smem((P, ROWS, dv), ot, sw),
        p_smem=tiles.smem((P, KT, ROWS), ot, sw), ds_smem=tiles.smem((P, KT, ROWS), ot, sw),
        dk_smem=plgpu.SMEM((KT, dk), jnp.float32), dv_smem=plgpu.SMEM((KT, dv), jnp.float32),
        kmeta_smem=plgpu.SMEM((ROWS,), jnp.int32), readers_smem=plgpu.SMEM((ROWS,), jnp.int32),
        meta_smem=plgpu.SMEM((4, ROWS), jnp.int32), sel_smem=plgpu.SMEM((S, ROWS), jnp.int32),
        lse_smem=plgpu.SMEM((ROWS,), jnp.float32), delta_smem=plgpu.SMEM((ROWS,), jnp.float32),
        bars=tiles.barriers(10),
    )
    return body, scratch


# ------------------------------------------------------------------------------------------------
# The selection's layout, built in XLA (jit-safe, static shapes)
# ------------------------------------------------------------------------------------------------


def counted_blocks(block_indices, block_counts, layout, block_size):
    """`[B, T, H, S]`: the packed key block (`first_block + index`) of every counted slot, -1
    elsewhere.

    A slot counts when it is within the token's quota, names a block in `[0, pos // BS]`, and
    no earlier slot names the same block (SPEC section 4)."""
    num_slots = block_indices.shape[-1]
    slot = jnp.arange(num_slots)
    current = (layout.pos // block_size)[None, :, None, None]
    valid = (slot < block_counts[..., None]) & (block_indices >= 0) & (block_indices <= current)
    same = block_indices[..., :, None] == block_indices[..., None, :]
    earlier = slot[:, None] > slot[None, :]
    repeat = jnp.any(same & earlier & valid[..., None, :], axis=-1)
    blocks = layout.first_block[None, :, None, None] + block_indices
    return jnp.where(valid & ~repeat, blocks, NO_BLOCK).astype(jnp.int32)


def tile_unions(blocks, shape: Shape):
    """Per (batch, kv head, row tile): `[U]` with the union's size in entry 0 and its sorted
    distinct packed key blocks after it; and the per-row selection `[S, 64]` the kernels compare
    with."""
    tiling = shape.tiling
    B, T, H, S = blocks.shape
    BT, HP = tiling.tokens_per_tile, tiling.heads_per_chunk
    per_tile = tiles.pad_axis(blocks.transpose(0, 2, 1, 3), 2, tiling.num_tiles * BT, NO_BLOCK)
    per_tile = per_tile.reshape(B, H, tiling.num_tiles, BT, S)
    big = jnp.iinfo(jnp.int32).max
    flat = jnp.sort(jnp.where(per_tile >= 0, per_tile, big).reshape(B, H, tiling.num_tiles, BT * S), axis=-1)
    repeat = jnp.concatenate([jnp.zeros_like(flat[..., :1], bool), flat[..., 1:] == flat[..., :-1]], axis=-1)
    flat = jnp.sort(jnp.where(repeat, big, flat), axis=-1)
    count = jnp.sum(flat < big, axis=-1, dtype=jnp.int32)
    union = jnp.concatenate([count[..., None], jnp.where(flat < big, flat, 0)], axis=-1)
    union = tiles.pad_axis(union, 3, shape.union)
    # Row r of a tile is token r // HP of the tile; padding rows select nothing.
    rows = jnp.repeat(per_tile, HP, axis=3)
    rows = tiles.pad_axis(rows, 3, ROWS, NO_BLOCK).transpose(0, 1, 2, 4, 3)
    return union, rows


def inverted_index(union, shape: Shape):
    """Per key block (the packed compressed-block axis), the row tiles whose union holds it.

    Returns the reading tiles `[B, H, >= NT * (U - 1) + 64]` sorted by key block, and per key block
    `[B, H, NBK, 64]` int32 with columns (readers lo, readers hi)."""
    B, H, NT, U = union.shape
    valid = jnp.arange(U - 1)[None, None, None, :] < union[..., :1]
    key_block = jnp.where(valid, union[..., 1:], shape.num_key_blocks)  # past every real block
    tile = jnp.broadcast_to(jnp.arange(NT, dtype=jnp.int32)[:, None], (NT, U - 1))
    key_block = key_block.reshape(B, H, -1)
    order = jnp.argsort(key_block, axis=-1, stable=True)
    readers = jnp.take_along_axis(jnp.broadcast_to(tile.reshape(-1), key_block.shape), order, axis=-1)
    sorted_blocks = jnp.take_along_axis(key_block, order, axis=-1)
    bounds = jax.vmap(jax.vmap(lambda x: jnp.searchsorted(x, jnp.arange(shape.num_key_blocks + 1), side="left")))(
        sorted_blocks).astype(jnp.int32)
    kmeta = jnp.zeros((B, H, shape.num_key_blocks, ROWS), jnp.int32)
    kmeta = kmeta.at[..., 0].set(bounds[..., :-1]).at[..., 1].set(bounds[..., 1:])
    # 64 entries of slack for the last chunk's TMA box, and a length that keeps the row stride
    # a multiple of 16 bytes (TMA's rule for global strides).
    readers = tiles.pad_axis(readers.astype(jnp.int32), 2, (tiles.cdiv(readers.shape[-1], ROWS) + 1) * ROWS)
    return readers, kmeta


def key_rows(x, shape: Shape, layout, width: int):
    """`[B, T, H, D]` -> `[B, H, P, NBK * BS + KT - BS, width]` 16-bit parts in the blocked key
    layout: packed key block `kb` is rows `[kb * BS, kb * BS + BS)` (token `t` at row
    `kb * BS + pos % BS`, the inverse of `unblock`), zero past a partial block's tokens. Every
    block's TMA box then starts on a multiple of BS (a multiple of the smem tiling's 8 rows, which
    Mosaic must prove: a varlen sequence starts at any token), and the last `[KT, D]` box stays
    inside the array."""
    BS = shape.block_size
    rows = (layout.first_block + layout.pos // BS) * BS + layout.pos % BS
    x = tiles.pad_axis(x, 3, width)
    blocked = jnp.zeros((x.shape[0], shape.num_key_blocks * BS + shape.key_rows - BS) + x.shape[2:], x.dtype)
    blocked = blocked.at[:, rows].set(x, unique_indices=True)
    return tiles.split(blocked.transpose(0, 2, 1, 3), shape.parts, shape.operand)


def last_key_meta(meta, block_size: int):
    """The row table with the token row replaced by the last key row a row may see in the blocked
    key layout: `first_block * BS + pos` (its own position in its sequence's blocks), -1 for
    padding rows. A key row `kb * BS + r` of one of the row's own blocks is visible iff it is at
    most that; rows past a partial block's tokens lie beyond every position of the sequence."""
    pos, first_block = meta[:, tiles.META_POS], meta[:, tiles.META_FIRST_BLOCK]
    last = jnp.where(pos >= 0, first_block * block_size + pos, -1)
    return meta.at[:, META_LAST_KEY].set(last)


def unblock(d, shape: Shape, layout, dim: int):
    """Per-key-block gradients `[B, H, NBK, KT, W]` -> per token `[B, T, H, dim]`: token t is row
    `pos % BS` of its own block `first_block + pos // BS`."""
    kb = layout.first_block + layout.pos // shape.block_size
    row = layout.pos % shape.block_size
    return d[:, :, kb, row, :dim].transpose(0, 2, 1, 3)


# ------------------------------------------------------------------------------------------------
# Launches and the custom_vjp
# ------------------------------------------------------------------------------------------------


def _grid(shape: Shape, batch):
    return (shape.tiling.num_tiles, batch * shape.tiling.num_kv_heads * shape.tiling.head_chunks)


def _forward(shape: Shape, query, key, value, meta, union, sel, layout, bad_rows):
    tiling = shape.tiling
    q_rows = tiles.split(tiling.pack(query, shape.dk), shape.parts, shape.operand)
    # SPEC 8: the kernels read finite keys and values; the rows that see a non-finite one are NaN.
    k_rows = key_rows(finite_or_zero(key), shape, layout, shape.dk)
    v_rows = key_rows(finite_or_zero(value), shape, layout, shape.dv)
    B, HN = q_rows.shape[:2]
    body, scratch = _fwd_kernel(shape)
    o_rows, lse_rows = tiles.kernel(
        body, name="selected_attention_fwd_kernel",
        out_type=(jax.ShapeDtypeStruct((B, HN, tiling.num_rows, shape.dv), jnp.float32),
                  jax.ShapeDtypeStruct((B, HN, tiling.num_rows), jnp.float32)),
        grid=_grid(shape, B), grid_names=("tile", "bh"), scratch=scratch,
    )(q_rows, k_rows, v_rows, meta, union, sel)
    o_rows = tiles.poison(o_rows, bad_rows)
    return tiling.unpack(o_rows, shape.value_dim).astype(query.dtype), (q_rows, k_rows, v_rows, o_rows, lse_rows)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attend(shape: Shape, query, key, value, meta, union, sel, readers, kmeta, layout, bad_rows):
    return _forward(shape, query, key, value, meta, union, sel, layout, bad_rows)[0]


def _attend_fwd(shape, query, key, value, meta, union, sel, readers, kmeta, layout, bad_rows):
    out, saved = _forward(shape, query, key, value, meta, union, sel, layout, bad_rows)
    return out, (saved, meta, union, sel, readers, kmeta, layout)


def _attend_bwd(shape, residuals, d_out):
    (q_rows, k_rows, v_rows, o_rows, lse_rows), meta, union, sel, readers, kmeta, layout = residuals
    tiling = shape.tiling
    dtype = shape.dtype
    B, HN = q_rows.shape[:2]
    H = tiling.num_kv_heads
    do_packed = tiling.pack(d_out.astype(jnp.float32), shape.dv)
    # delta = rowsum(do * o) on the packed rows, the output as the caller saw it (its dtype).
    delta = attention_delta(do_packed, o_rows.astype(dtype))
    # SPEC 8: a poisoned row keeps NaN gradients, and passes none to what it cannot see.
    lse_rows, delta = finite_backward_rows(lse_rows, delta)
    do_rows = tiles.split(do_packed, shape.parts, shape.operand)
    body, scratch = _dq_kernel(shape)
    dq_rows = tiles.kernel(
        body, name="selected_attention_bwd_kernel_dq",
        out_type=jax.ShapeDtypeStruct((B, HN, tiling.num_rows, shape.dk), jnp.float32),
        grid=_grid(shape, B), grid_names=("tile", "bh"), scratch=scratch,
    )(q_rows, k_rows, v_rows, do_rows, lse_rows, delta, meta, union, sel)
    body, scratch = _dkv_kernel(shape)
    KT = shape.key_rows
    d_k, d_v = tiles.kernel(
        body, name="selected_attention_bwd_kernel_dkv",
        out_type=(jax.ShapeDtypeStruct((B, H, shape.num_key_blocks, KT, shape.dk), jnp.float32),
                  jax.ShapeDtypeStruct((B, H, shape.num_key_blocks, KT, shape.dv), jnp.float32)),
        grid=(shape.num_key_blocks, B * H), grid_names=("key_block", "bh"), scratch=scratch,
    )(q_rows, k_rows, v_rows, do_rows, lse_rows, delta, meta, sel, readers, kmeta)
    dq = tiling.unpack(dq_rows, shape.head_dim).astype(dtype)
    d_k = unblock(d_k, shape, layout, shape.head_dim).astype(dtype)
    d_v = unblock(d_v, shape, layout, shape.value_dim).astype(dtype)
    return dq, d_k, d_v, None, None, None, None, None, None, None


_attend.defvjp(_attend_fwd, _attend_bwd)


def _shape(num_tokens, num_kv_heads, group, head_dim, value_dim, block_size, num_slots, scale, num_seqs, dtype):
    tiling = tiles.RowTiling(num_tokens, num_kv_heads, group)
    return Shape(tiling, block_size, num_slots, float(scale), tiles.padded_dim(head_dim), tiles.padded_dim(value_dim),
                 head_dim, value_dim, tiles.cdiv(1 + tiling.tokens_per_tile * num_slots, ROWS) * ROWS,
                 num_compressed_blocks(num_tokens, block_size, num_seqs), dtype)


def run(query, key, value, block_indices, block_counts, *, block_size: int, scale: float,
        segments: Segments | None):
    batch, num_tokens, num_q_heads, head_dim = query.shape
    num_kv_heads, value_dim = key.shape[2], value.shape[3]
    num_slots = block_indices.shape[-1]
    shape = _shape(num_tokens, num_kv_heads, num_q_heads // num_kv_heads, head_dim, value_dim, block_size, num_slots,
                   scale, None if segments is None else segments.num_seqs, str(query.dtype))
    tiling = shape.tiling
    if isinstance(block_counts, int):
        block_counts = jnp.full((batch, num_tokens, num_kv_heads), block_counts, jnp.int32)
    layout = token_layout(num_tokens, block_size, segments)
    blocks = counted_blocks(block_indices.astype(jnp.int32), block_counts.astype(jnp.int32), layout, block_size)
    union, sel = tile_unions(blocks, shape)
    readers, kmeta = inverted_index(union, shape)
    union = union.reshape(*union.shape[:3], shape.union // ROWS, ROWS)
    meta = last_key_meta(tiling.row_meta(layout, block_size), block_size)
    bad_rows = tiles.poisoned_rows(tiling, _saw_nonfinite(key, value, block_indices, blocks, layout, block_size))
    return _attend(shape, query, key, value, meta, union, sel, readers, kmeta, layout, bad_rows)


def _saw_nonfinite(key, value, block_indices, blocks, layout, block_size: int):
    """SPEC 8: `[B, T, H]`, whether a (token, kv head) sees a NaN or Inf key or value: in one of its
    counted blocks (`blocks >= 0`), at its keys `[start, min(start + BS, token + 1))`."""
    token = jnp.arange(layout.pos.shape[0], dtype=jnp.int32)[None, :, None, None]
    start = (token - layout.pos[None, :, None, None]) + block_indices.astype(jnp.int32) * block_size
    counted = blocks >= 0
    lo = jnp.where(counted, start, 0)
    hi = jnp.where(counted, jnp.minimum(start + block_size, token + 1), 0)
    # seen_nonfinite takes the kv head last: [B, T, S, H].
    seen = seen_nonfinite(nonfinite_prefix(key, value), lo.transpose(0, 1, 3, 2), hi.transpose(0, 1, 3, 2))
    return jnp.any(seen, axis=2)
