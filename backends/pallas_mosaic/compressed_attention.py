"""Compressed attention (SPEC section 2) as Mosaic GPU kernels: forward, dq and dk/dv.

A program owns one 64-row tile (`BT` tokens x `HP` query heads of one kv head, see `tiles.py`),
so every compressed-key tile it loads serves the whole group, and a wgmma is full even at G = 1.
It walks the union of its rows' visible blocks `[first_block, first_block + (pos + 1) // BS)` in
tiles of 64 blocks; a per-row mask does the rest (causality, packed sequences, padding rows).

The float32 block means are cast to the query's dtype for the wgmma (16-bit operands only): the
rounding moves a score by about 2e-4 for unit-variance inputs, far inside the 16-bit tolerance,
and the selection kernel rounds identically, so its probabilities agree with this lse.

Backward: `dq` re-walks the forward's blocks per row tile; `dk_cmp, dv_cmp` are owned by one
program per 64-block tile, walking the row tiles that can see those blocks (the transposed
products `K Q^T`, `P^T dO`, `dS^T Q` keep the block axis on the wgmma rows). No atomics.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu

from ejkernel_nsa.backends.common.containment import (
    finite_backward_rows,
    finite_or_zero,
    nonfinite_prefix,
    seen_nonfinite,
)
from ejkernel_nsa.backends.common.vjp import attention_delta
from ejkernel_nsa.backends.pallas_mosaic import tiles
from ejkernel_nsa.backends.pallas_mosaic.tiles import LOG2E, ROWS
from ejkernel_nsa.problem import NSAProblem, Piece, Segments, block_layout, token_layout

PIECE = Piece.COMPRESSED_ATTENTION
BLOCK_TILE = 64  # compressed blocks per K/V tile (the wgmma N of QK^T, the M of the dk/dv products)


def supports(problem: NSAProblem) -> str | None:
    # float32 runs as two bfloat16 parts per operand (`tiles.split`).
    reason = tiles.common_decline(problem, float32=True)
    if reason is not None:
        return reason
    shape = Shape(tiles.RowTiling(problem.seq_len, problem.num_kv_heads, problem.group_size), problem.block_size,
                  1.0, tiles.padded_dim(problem.head_dim), tiles.padded_dim(problem.value_dim), BLOCK_TILE,
                  problem.head_dim, problem.dtype)
    return tiles.smem_decline([(name, factory(shape)[1]) for name, factory in (
        ("compressed_attention_fwd_kernel", _fwd_kernel), ("compressed_attention_bwd_kernel_dq", _dq_kernel),
        ("compressed_attention_bwd_kernel_dkv", _dkv_kernel))])


def _visible(blocks, first_block, end):
    """Block `blocks` visible to a row: complete and of its own sequence (SPEC 2)."""
    return (blocks >= first_block) & (blocks < end)


def _row_tile_inputs(q_ref, do_ref, lse_ref, delta_ref, meta_ref, b, hn, tile, q_smem, do_smem, lse_smem,
                     delta_smem, meta_smem):
    """What a backward step reads of one row tile: query, output cotangent, lse, delta, rows."""
    rows = pl.ds(tile * ROWS, ROWS)
    return [(q_ref.at[b, hn, :, rows], q_smem), (do_ref.at[b, hn, :, rows], do_smem),
            (lse_ref.at[b, hn, rows], lse_smem), (delta_ref.at[b, hn, rows], delta_smem),
            (meta_ref.at[tile], meta_smem)]


def _fwd_kernel(shape):
    dk, dv, BS, HEAD_CHUNKS, ot = shape.dk, shape.dv, shape.block_size, shape.tiling.head_chunks, shape.operand
    qp, vp, pp = shape.q_parts, shape.v_parts, shape.p_parts
    sw = tiles.swizzle_for(ot, dk, dv)  # one smem tiling for every wgmma operand
    tile_shape = (ROWS, BLOCK_TILE)
    # Barrier slots: the first index each group of copies takes (`tiles.issue` takes one per copy,
    # two for a two-part operand); each step's k and v are in flight together.
    ROW_TILE_BARS, K_BARS, V_BARS = 0, 4, 6

    def body(q_ref, k_ref, v_ref, meta_ref, o_ref, lse_ref, *, q_smem, k_smem, v_smem, p_smem, o_smem, meta_smem,
             lse_smem, bars):
        tile, b, hn, h, rows = tiles.row_tile_program(k_ref.shape[1], HEAD_CHUNKS)
        tiles.fetch([(q_ref.at[b, hn, :, rows], q_smem), (meta_ref.at[tile], meta_smem)], bars, ROW_TILE_BARS)
        fb = tiles.rows(tiles.load_rows(meta_smem.at[tiles.META_FIRST_BLOCK]), tile_shape)
        end = tiles.rows(tiles.load_rows(meta_smem.at[tiles.META_CMP_END]), tile_shape)

        def step(j, carry):
            acc, m, l = carry
            blocks = pl.ds(j * BLOCK_TILE, BLOCK_TILE)
            k_bars = tiles.issue([(k_ref.at[b, h, :, blocks], k_smem)], bars, K_BARS)
            v_bars = tiles.issue([(v_ref.at[b, h, :, blocks], v_smem)], bars, V_BARS)
            tiles.wait(bars, k_bars)
            s = tiles.matmul_parts(q_smem, k_smem, tile_shape, transpose_b=True) * (shape.scale * LOG2E)
            visible = _visible(tiles.iota(tile_shape, 1) + j * BLOCK_TILE, fb, end)
            p, alpha, m, l = tiles.softmax_step(s, visible, m, l)
            tiles.store_parts(p_smem, p, pp)
            tiles.wait(bars, v_bars)
            pv = tiles.matmul_parts(p_smem, v_smem, (ROWS, dv))
            return acc * tiles.rows(alpha, (ROWS, dv)) + pv, m, l

        acc, m, l = lax.fori_loop(meta_smem[4, 0], meta_smem[4, 1], step, tiles.softmax_init(dv))
        o_smem[...], lse2 = tiles.softmax_finish(acc, m, l)
        lse_smem[...] = lse2 / LOG2E
        tiles.store([(o_smem, o_ref.at[b, hn, rows]), (lse_smem, lse_ref.at[b, hn, rows])])

    scratch = dict(
        q_smem=tiles.smem((qp, ROWS, dk), ot, sw), k_smem=tiles.smem((2, BLOCK_TILE, dk), ot, sw),
        v_smem=tiles.smem((vp, BLOCK_TILE, dv), ot, sw), p_smem=tiles.smem((pp, ROWS, BLOCK_TILE), ot, sw),
        o_smem=plgpu.SMEM((ROWS, dv), jnp.float32), meta_smem=plgpu.SMEM((5, ROWS), jnp.int32),
        lse_smem=plgpu.SMEM((ROWS,), jnp.float32), bars=tiles.barriers(4),
    )
    return body, scratch


def _dq_kernel(shape):
    dk, dv, BS, HEAD_CHUNKS, ot = shape.dk, shape.dv, shape.block_size, shape.tiling.head_chunks, shape.operand
    qp, vp, pp = shape.q_parts, shape.v_parts, shape.p_parts
    sw = tiles.swizzle_for(ot, dk, dv)  # one smem tiling for every wgmma operand
    tile_shape = (ROWS, BLOCK_TILE)
    # Barrier slots: the first index each group of copies takes (`tiles.issue` takes one per copy,
    # two for a two-part operand); each step's k and v reuse slots of the row tile's,
    # which it has waited for.
    ROW_TILE_BARS, KV_BARS = 0, 5

    def body(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, meta_ref, dq_ref, *, q_smem, do_smem, k_smem, v_smem,
             ds_smem, dq_smem, meta_smem, lse_smem, delta_smem, bars):
        tile, b, hn, h, rows = tiles.row_tile_program(k_ref.shape[1], HEAD_CHUNKS)
        tiles.fetch(_row_tile_inputs(q_ref, do_ref, lse_ref, delta_ref, meta_ref, b, hn, tile,
                                     q_smem, do_smem, lse_smem, delta_smem, meta_smem), bars, ROW_TILE_BARS)
        fb = tiles.rows(tiles.load_rows(meta_smem.at[tiles.META_FIRST_BLOCK]), tile_shape)
        end = tiles.rows(tiles.load_rows(meta_smem.at[tiles.META_CMP_END]), tile_shape)
        seen, lse2, delta = tiles.saved_softmax(lse_smem, delta_smem, tiles.load_rows, tiles.rows, tile_shape)

        def step(j, dq):
            blocks = pl.ds(j * BLOCK_TILE, BLOCK_TILE)
            tiles.fetch([(k_ref.at[b, h, :, blocks], k_smem), (v_ref.at[b, h, :, blocks], v_smem)], bars, KV_BARS)
            s = tiles.matmul_parts(q_smem, k_smem, tile_shape, transpose_b=True) * (shape.scale * LOG2E)
            visible = _visible(tiles.iota(tile_shape, 1) + j * BLOCK_TILE, fb, end) & seen
            p = jnp.where(visible, jnp.exp2(s - lse2), 0.0)
            dp = tiles.matmul_parts(do_smem, v_smem, tile_shape, transpose_b=True)
            tiles.store_parts(ds_smem, p * (dp - delta), pp)
            return dq + tiles.matmul_parts(ds_smem, k_smem, (ROWS, dk))

        dq = lax.fori_loop(meta_smem[4, 0], meta_smem[4, 1], step, tiles.zeros((ROWS, dk)))
        dq_smem[...] = dq * shape.scale
        tiles.store([(dq_smem, dq_ref.at[b, hn, rows])])

    scratch = dict(
        q_smem=tiles.smem((qp, ROWS, dk), ot, sw), do_smem=tiles.smem((qp, ROWS, dv), ot, sw),
        k_smem=tiles.smem((2, BLOCK_TILE, dk), ot, sw), v_smem=tiles.smem((vp, BLOCK_TILE, dv), ot, sw),
        ds_smem=tiles.smem((pp, ROWS, BLOCK_TILE), ot, sw), dq_smem=plgpu.SMEM((ROWS, dk), jnp.float32),
        meta_smem=plgpu.SMEM((5, ROWS), jnp.int32), lse_smem=plgpu.SMEM((ROWS,), jnp.float32),
        delta_smem=plgpu.SMEM((ROWS,), jnp.float32), bars=tiles.barriers(7),
    )
    return body, scratch


def _dkv_kernel(shape):
    dk, dv, BS, HEAD_CHUNKS, ot = shape.dk, shape.dv, shape.block_size, shape.tiling.head_chunks, shape.operand
    qp, vp, pp = shape.q_parts, shape.v_parts, shape.p_parts
    sw = tiles.swizzle_for(ot, dk, dv)  # one smem tiling for every wgmma operand
    tile_shape = (BLOCK_TILE, ROWS)
    # Barrier slots: the first index each group of copies takes (`tiles.issue` takes one per copy,
    # two for a two-part operand); the block tile's k, v and span once, then
    # each row tile's inputs.
    BLOCK_TILE_BARS, ROW_TILE_BARS = 0, 3

    def body(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, meta_ref, span_ref, dk_ref, dv_ref, *, k_smem, v_smem,
             q_smem, do_smem, p_smem, ds_smem, dk_smem, dv_smem, meta_smem, lse_smem, delta_smem, span_smem, bars):
        block_tile, bh = lax.axis_index("block_tile"), lax.axis_index("bh")
        b, h = tiles.div(bh, k_ref.shape[1]), tiles.rem(bh, k_ref.shape[1])
        blocks = pl.ds(block_tile * BLOCK_TILE, BLOCK_TILE)
        tiles.fetch([(k_ref.at[b, h, :, blocks], k_smem), (v_ref.at[b, h, :, blocks], v_smem),
                     (span_ref.at[block_tile], span_smem)], bars, BLOCK_TILE_BARS)
        tile_lo, tile_hi = span_smem[0], span_smem[1]
        num_tiles = tile_hi - tile_lo
        block_ids = tiles.iota(tile_shape, 0) + block_tile * BLOCK_TILE

        def step(i, carry):
            d_k, d_v = carry
            hn = h * HEAD_CHUNKS + lax.div(i, num_tiles)
            tile = tile_lo + lax.rem(i, num_tiles)
            rows = pl.ds(tile * ROWS, ROWS)
            tiles.fetch(_row_tile_inputs(q_ref, do_ref, lse_ref, delta_ref, meta_ref, b, hn, tile,
                                         q_smem, do_smem, lse_smem, delta_smem, meta_smem), bars, ROW_TILE_BARS)
            fb = tiles.cols(tiles.load_cols(meta_smem.at[tiles.META_FIRST_BLOCK]), tile_shape)
            end = tiles.cols(tiles.load_cols(meta_smem.at[tiles.META_CMP_END]), tile_shape)
            seen, lse2, delta = tiles.saved_softmax(lse_smem, delta_smem, tiles.load_cols, tiles.cols, tile_shape)
            s_t = tiles.matmul_parts(k_smem, q_smem, tile_shape, transpose_b=True) * (shape.scale * LOG2E)
            visible = _visible(block_ids, fb, end) & seen
            p_t = jnp.where(visible, jnp.exp2(s_t - lse2), 0.0)
            tiles.store_parts(p_smem, p_t, pp)
            d_v = d_v + tiles.matmul_parts(p_smem, do_smem, (BLOCK_TILE, dv))
            dp_t = tiles.matmul_parts(v_smem, do_smem, tile_shape, transpose_b=True)
            tiles.store_parts(ds_smem, p_t * (dp_t - delta), pp)
            d_k = d_k + tiles.matmul_parts(ds_smem, q_smem, (BLOCK_TILE, dk))
            return d_k, d_v

        d_k, d_v = lax.fori_loop(0, num_tiles * HEAD_CHUNKS, step,
                                 (tiles.zeros((BLOCK_TILE, dk)), tiles.zeros((BLOCK_TILE, dv))))
        dk_smem[...] = d_k * shape.scale
        dv_smem[...] = d_v
        tiles.store([(dk_smem, dk_ref.at[b, h, blocks]), (dv_smem, dv_ref.at[b, h, blocks])])

    scratch = dict(
        k_smem=tiles.smem((2, BLOCK_TILE, dk), ot, sw), v_smem=tiles.smem((vp, BLOCK_TILE, dv), ot, sw),
        q_smem=tiles.smem((qp, ROWS, dk), ot, sw), do_smem=tiles.smem((qp, ROWS, dv), ot, sw),
        p_smem=tiles.smem((pp, BLOCK_TILE, ROWS), ot, sw), ds_smem=tiles.smem((pp, BLOCK_TILE, ROWS), ot, sw),
        dk_smem=plgpu.SMEM((BLOCK_TILE, dk), jnp.float32), dv_smem=plgpu.SMEM((BLOCK_TILE, dv), jnp.float32),
        meta_smem=plgpu.SMEM((5, ROWS), jnp.int32), lse_smem=plgpu.SMEM((ROWS,), jnp.float32),
        delta_smem=plgpu.SMEM((ROWS,), jnp.float32), span_smem=plgpu.SMEM((ROWS,), jnp.int32),
        bars=tiles.barriers(8),
    )
    return body, scratch


# ------------------------------------------------------------------------------------------------
# Layout: what the kernels read, built in XLA (jit-safe, static shapes)
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Shape(tiles.Operands):
    """The static facts the kernels are specialized on."""

    tiling: tiles.RowTiling
    block_size: int
    scale: float
    dk: int  # padded head dims
    dv: int
    num_blocks: int  # padded to a multiple of BLOCK_TILE
    head_dim: int  # the query's, unpadded
    dtype: str  # the query's

    @property
    def num_block_tiles(self) -> int:
        return self.num_blocks // BLOCK_TILE

    # The block means are float32 whatever the query: their keys always come in two parts, so
    # the scores (hence the lse and the selection) keep ~16 bits; queries, values,
    # probabilities and dS take the precision of the problem (`tiles.split`).
    q_parts = v_parts = p_parts = tiles.Operands.parts


def compressed_meta(tiling: tiles.RowTiling, layout, block_size: int):
    """`[NT, 5, 64]`: the rows' metadata plus, in row 4, the block tiles `[lo, hi)` the tile walks."""
    meta = tiling.row_meta(layout, block_size)
    fb, end = meta[:, tiles.META_FIRST_BLOCK], meta[:, tiles.META_CMP_END]
    start = jnp.where(end > fb, fb, jnp.iinfo(jnp.int32).max)
    hi = tiles.cdiv(end.max(axis=1), BLOCK_TILE)
    lo = jnp.minimum(start.min(axis=1) // BLOCK_TILE, hi)
    scalars = jnp.zeros((tiling.num_tiles, ROWS), jnp.int32).at[:, 0].set(lo).at[:, 1].set(hi)
    return jnp.concatenate([meta, scalars[:, None]], axis=1)


def block_tile_spans(shape: Shape, num_tokens: int, segments):
    """`[NBT, 64]` int32: in columns 0, 1 the row tiles `[lo, hi)` whose tokens may see a block of
    the tile (from the earliest block's last token to the latest block's sequence end)."""
    blocks = block_layout(num_tokens, shape.block_size, segments)
    pad = shape.num_blocks - blocks.start.shape[0]
    used = jnp.pad(blocks.count > 0, (0, pad)).reshape(-1, BLOCK_TILE)
    first = jnp.pad(blocks.start + shape.block_size - 1, (0, pad)).reshape(-1, BLOCK_TILE)
    end = jnp.pad(blocks.seq_end, (0, pad)).reshape(-1, BLOCK_TILE)
    bt = shape.tiling.tokens_per_tile
    lo = jnp.where(used, first, num_tokens).min(axis=1) // bt
    hi = tiles.cdiv(jnp.where(used, end, 0).max(axis=1), bt)
    lo = jnp.minimum(lo, hi)
    return jnp.zeros((lo.shape[0], ROWS), jnp.int32).at[:, 0].set(lo).at[:, 1].set(hi)


def pack_blocks(x, shape: Shape, width: int, dtype):
    """`[B, NB, H, D]` float32 -> `[B, H, NBp, width]` in the query's dtype."""
    x = tiles.pad_axis(tiles.pad_axis(x.astype(dtype), 1, shape.num_blocks), 3, width)
    return x.transpose(0, 2, 1, 3)


def unpack_blocks(x, num_blocks: int, dim: int):
    return x.transpose(0, 2, 1, 3)[:, :num_blocks, :, :dim]


def split_blocks(x, shape, width: int, parts: int = 2):
    """`[B, NB, H, D]` float32 -> `[B, H, parts, NBp, width]` 16-bit terms (`tiles.split`)."""
    return tiles.split(pack_blocks(x.astype(jnp.float32), shape, width, jnp.float32), parts, shape.operand)


# ------------------------------------------------------------------------------------------------
# Launches and the custom_vjp
# ------------------------------------------------------------------------------------------------


def _launch_fwd(shape: Shape, q_rows, k_blocks, v_blocks, meta):
    B, HN = q_rows.shape[:2]
    body, scratch = _fwd_kernel(shape)
    return tiles.kernel(
        body, name="compressed_attention_fwd_kernel",
        out_type=(jax.ShapeDtypeStruct((B, HN, shape.tiling.num_rows, shape.dv), jnp.float32),
                  jax.ShapeDtypeStruct((B, HN, shape.tiling.num_rows), jnp.float32)),
        grid=(shape.tiling.num_tiles, B * HN), grid_names=("tile", "bh"), scratch=scratch,
    )(q_rows, k_blocks, v_blocks, meta)


def _launch_dq(shape: Shape, q_rows, k_blocks, v_blocks, do_rows, lse_rows, delta_rows, meta):
    B, HN = q_rows.shape[:2]
    body, scratch = _dq_kernel(shape)
    return tiles.kernel(
        body, name="compressed_attention_bwd_kernel_dq",
        out_type=jax.ShapeDtypeStruct((B, HN, shape.tiling.num_rows, shape.dk), jnp.float32),
        grid=(shape.tiling.num_tiles, B * HN), grid_names=("tile", "bh"), scratch=scratch,
    )(q_rows, k_blocks, v_blocks, do_rows, lse_rows, delta_rows, meta)


def _launch_dkv(shape: Shape, q_rows, k_blocks, v_blocks, do_rows, lse_rows, delta_rows, meta, spans):
    B, H = k_blocks.shape[:2]
    body, scratch = _dkv_kernel(shape)
    return tiles.kernel(
        body, name="compressed_attention_bwd_kernel_dkv",
        out_type=(jax.ShapeDtypeStruct((B, H, shape.num_blocks, shape.dk), jnp.float32),
                  jax.ShapeDtypeStruct((B, H, shape.num_blocks, shape.dv), jnp.float32)),
        grid=(shape.num_block_tiles, B * H), grid_names=("block_tile", "bh"), scratch=scratch,
    )(q_rows, k_blocks, v_blocks, do_rows, lse_rows, delta_rows, meta, spans)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attend(shape: Shape, query, k_cmp, v_cmp, meta, spans, bad_rows):
    return _forward(shape, query, k_cmp, v_cmp, meta, bad_rows)[0]


def _forward(shape: Shape, query, k_cmp, v_cmp, meta, bad_rows):
    tiling = shape.tiling
    q_rows = tiles.split(tiling.pack(query, shape.dk), shape.q_parts, shape.operand)
    # SPEC 8: the kernels read finite blocks; the rows that see a non-finite one are NaN.
    k_blocks = split_blocks(finite_or_zero(k_cmp), shape, shape.dk)
    v_blocks = split_blocks(finite_or_zero(v_cmp), shape, shape.dv, shape.v_parts)
    o_rows, lse_rows = _launch_fwd(shape, q_rows, k_blocks, v_blocks, meta)
    o_rows = tiles.poison(o_rows, bad_rows)
    out = tiling.unpack(o_rows, v_cmp.shape[-1]).astype(query.dtype)
    lse = tiling.unpack_scalar(lse_rows)
    return (out, lse), (q_rows, k_blocks, v_blocks, o_rows, lse_rows)


def _attend_fwd(shape, query, k_cmp, v_cmp, meta, spans, bad_rows):
    outputs, (q_rows, k_blocks, v_blocks, o_rows, lse_rows) = _forward(shape, query, k_cmp, v_cmp, meta, bad_rows)
    return outputs, (q_rows, k_blocks, v_blocks, o_rows, lse_rows, meta, spans, k_cmp.shape, v_cmp.shape)


def _attend_bwd(shape, residuals, cotangents):
    q_rows, k_blocks, v_blocks, o_rows, lse_rows, meta, spans, k_shape, v_shape = residuals
    d_out, d_lse = cotangents
    tiling = shape.tiling
    do_packed = tiling.pack(d_out.astype(jnp.float32), shape.dv)
    # The residuals are packed rows, so delta is taken there (backends/common/vjp.py), with the
    # output as the caller saw it (rounded to its dtype) and the lse cotangent packed alike.
    delta = attention_delta(do_packed, o_rows.astype(shape.dtype), tiling.pack_scalar(d_lse.astype(jnp.float32)))
    # SPEC 8: a poisoned row keeps NaN gradients, and passes none to what it cannot see.
    lse_rows, delta = finite_backward_rows(lse_rows, delta)
    do_rows = tiles.split(do_packed, shape.q_parts, shape.operand)
    dq_rows = _launch_dq(shape, q_rows, k_blocks, v_blocks, do_rows, lse_rows, delta, meta)
    dk, dv = _launch_dkv(shape, q_rows, k_blocks, v_blocks, do_rows, lse_rows, delta, meta, spans)
    dq = tiling.unpack(dq_rows, shape.head_dim).astype(shape.dtype)
    return (dq, unpack_blocks(dk, k_shape[1], k_shape[3]), unpack_blocks(dv, v_shape[1], v_shape[3]), None, None,
            None)


_attend.defvjp(_attend_fwd, _attend_bwd)


def run(query, k_cmp, v_cmp, *, block_size: int, scale: float, segments: Segments | None):
    batch, num_tokens, num_q_heads, head_dim = query.shape
    num_blocks, num_kv_heads = k_cmp.shape[1], k_cmp.shape[2]
    tiling = tiles.RowTiling(num_tokens, num_kv_heads, num_q_heads // num_kv_heads)
    shape = Shape(tiling, block_size, float(scale), tiles.padded_dim(head_dim), tiles.padded_dim(v_cmp.shape[-1]),
                  max(BLOCK_TILE, tiles.cdiv(num_blocks, BLOCK_TILE) * BLOCK_TILE), head_dim, str(query.dtype))
    layout = token_layout(num_tokens, block_size, segments)
    meta = compressed_meta(tiling, layout, block_size)
    spans = block_tile_spans(shape, num_tokens, segments)
    # SPEC 8: the (token, kv head) pairs whose visible blocks hold a NaN or Inf key or value.
    first = jnp.broadcast_to(layout.first_block[None, :, None], (batch, num_tokens, num_kv_heads))
    end = first + ((layout.pos + 1) // block_size)[None, :, None]
    bad_rows = tiles.poisoned_rows(tiling, seen_nonfinite(nonfinite_prefix(k_cmp, v_cmp), first, end))
    return _attend(shape, query, k_cmp.astype(jnp.float32), v_cmp.astype(jnp.float32), meta, spans, bad_rows)
