"""Compressed attention (SPEC section 2) as Mosaic GPU kernels: forward, dq and dk/dv.

A program owns one 64-row tile (`BT` tokens x `GC` query heads of one kv head, see `tiles.py`),
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

from ejkernel_nsa.backends.pallas_mosaic import tiles
from ejkernel_nsa.backends.pallas_mosaic.tiles import LOG2E, ROWS
from ejkernel_nsa.problem import NSAProblem, Piece, Segments, block_layout, token_layout

PIECE = Piece.COMPRESSED_ATTENTION
BLOCK_TILE = 64  # compressed blocks per K/V tile (the wgmma N of QK^T, the M of the dk/dv products)


def supports(problem: NSAProblem) -> str | None:
    # float32 runs as two bfloat16 parts per operand (`tiles.split`).
    return tiles.common_decline(problem, float32=True)


def _visible(blocks, fb, pos, block_size):
    """Block `blocks` visible to a row with this first block and position (SPEC 2)."""
    return (blocks >= fb) & (blocks < fb + (pos + 1) // block_size)


def _fwd_kernel(shape):
    dk, dv, BS, NHC, ot = shape.dk, shape.dv, shape.block_size, shape.tiling.head_chunks, shape.operand
    qp, vp, pp = shape.q_parts, shape.v_parts, shape.p_parts
    tile_shape = (ROWS, BLOCK_TILE)

    def body(q_ref, k_ref, v_ref, meta_ref, o_ref, lse_ref,
             q_smem, k_smem, v_smem, p_smem, o_smem, meta_smem, lse_smem, bars):
        tile, bh = lax.axis_index("tile"), lax.axis_index("bh")
        heads = k_ref.shape[1] * NHC
        b, hn = bh // heads, bh % heads
        h = hn // NHC
        rows = pl.ds(tile * ROWS, ROWS)
        plgpu.copy_gmem_to_smem(q_ref.at[b, hn, :, rows], q_smem, bars.at[0])
        plgpu.copy_gmem_to_smem(meta_ref.at[tile], meta_smem, bars.at[1])
        plgpu.barrier_wait(bars.at[0])
        plgpu.barrier_wait(bars.at[1])
        pos = tiles.rows(tiles.load_rows(meta_smem.at[tiles.META_POS]), tile_shape)
        fb = tiles.rows(tiles.load_rows(meta_smem.at[tiles.META_FIRST_BLOCK]), tile_shape)

        def step(j, carry):
            acc, m, l = carry
            blocks = pl.ds(j * BLOCK_TILE, BLOCK_TILE)
            plgpu.copy_gmem_to_smem(k_ref.at[b, h, :, blocks], k_smem, bars.at[2])
            plgpu.copy_gmem_to_smem(v_ref.at[b, h, :, blocks], v_smem, bars.at[3])
            plgpu.barrier_wait(bars.at[2])
            s = tiles.matmul_parts(q_smem, k_smem, tile_shape, transpose_b=True) * (shape.scale * LOG2E)
            visible = _visible(tiles.iota(tile_shape, 1) + j * BLOCK_TILE, fb, pos, BS)
            s = jnp.where(visible, s, -jnp.inf)
            m_new = jnp.maximum(m, s.max(axis=1))
            # A row that has seen nothing keeps max -inf: shift by 0 so exp2 gives 0, not NaN.
            shift = jnp.where(m_new == -jnp.inf, 0.0, m_new)
            alpha = jnp.exp2(m - shift)
            p = jnp.where(visible, jnp.exp2(s - tiles.rows(shift, tile_shape)), 0.0)
            l = l * alpha + p.sum(axis=1)
            tiles.store_parts(p_smem, p, pp)
            plgpu.barrier_wait(bars.at[3])
            pv = tiles.matmul_parts(p_smem, v_smem, (ROWS, dv))
            return acc * tiles.rows(alpha, (ROWS, dv)) + pv, m_new, l

        init = (tiles.zeros((ROWS, dv)),
                plgpu.layout_cast(jnp.full((ROWS,), -jnp.inf, jnp.float32), plgpu.Layout.WGMMA.reduce(1)),
                plgpu.layout_cast(jnp.zeros((ROWS,), jnp.float32), plgpu.Layout.WGMMA.reduce(1)))
        acc, m, l = lax.fori_loop(meta_smem[4, 0], meta_smem[4, 1], step, init)
        seen = l > 0
        safe_l = jnp.where(seen, l, 1.0)
        o_smem[...] = acc / tiles.rows(safe_l, (ROWS, dv))
        lse_smem[...] = jnp.where(seen, (m + jnp.log2(safe_l)) / LOG2E, -jnp.inf)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_smem, o_ref.at[b, hn, rows])
        plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[b, hn, rows])
        plgpu.wait_smem_to_gmem(0)

    scratch = [
        tiles.smem((qp, ROWS, dk), ot), tiles.smem((2, BLOCK_TILE, dk), ot), tiles.smem((vp, BLOCK_TILE, dv), ot),
        tiles.smem((pp, ROWS, BLOCK_TILE), ot), plgpu.SMEM((ROWS, dv), jnp.float32),
        plgpu.SMEM((5, ROWS), jnp.int32), plgpu.SMEM((ROWS,), jnp.float32), plgpu.Barrier(num_barriers=4),
    ]
    return body, scratch


def _dq_kernel(shape):
    dk, dv, BS, NHC, ot = shape.dk, shape.dv, shape.block_size, shape.tiling.head_chunks, shape.operand
    qp, vp, pp = shape.q_parts, shape.v_parts, shape.p_parts
    tile_shape = (ROWS, BLOCK_TILE)

    def body(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, meta_ref, dq_ref,
             q_smem, do_smem, k_smem, v_smem, ds_smem, dq_smem, meta_smem, lse_smem, delta_smem, bars):
        tile, bh = lax.axis_index("tile"), lax.axis_index("bh")
        heads = k_ref.shape[1] * NHC
        b, hn = bh // heads, bh % heads
        h = hn // NHC
        rows = pl.ds(tile * ROWS, ROWS)
        for i, (src, dst) in enumerate([(q_ref.at[b, hn, :, rows], q_smem), (do_ref.at[b, hn, :, rows], do_smem),
                                        (meta_ref.at[tile], meta_smem), (lse_ref.at[b, hn, rows], lse_smem),
                                        (delta_ref.at[b, hn, rows], delta_smem)]):
            plgpu.copy_gmem_to_smem(src, dst, bars.at[i])
        for i in range(5):
            plgpu.barrier_wait(bars.at[i])
        pos = tiles.rows(tiles.load_rows(meta_smem.at[tiles.META_POS]), tile_shape)
        fb = tiles.rows(tiles.load_rows(meta_smem.at[tiles.META_FIRST_BLOCK]), tile_shape)
        lse = tiles.load_rows(lse_smem)
        seen = tiles.rows(lse > -jnp.inf, tile_shape)
        lse2 = tiles.rows(jnp.where(lse > -jnp.inf, lse * LOG2E, 0.0), tile_shape)
        delta = tiles.rows(tiles.load_rows(delta_smem), tile_shape)

        def step(j, dq):
            blocks = pl.ds(j * BLOCK_TILE, BLOCK_TILE)
            plgpu.copy_gmem_to_smem(k_ref.at[b, h, :, blocks], k_smem, bars.at[5])
            plgpu.copy_gmem_to_smem(v_ref.at[b, h, :, blocks], v_smem, bars.at[6])
            plgpu.barrier_wait(bars.at[5])
            plgpu.barrier_wait(bars.at[6])
            s = tiles.matmul_parts(q_smem, k_smem, tile_shape, transpose_b=True) * (shape.scale * LOG2E)
            visible = _visible(tiles.iota(tile_shape, 1) + j * BLOCK_TILE, fb, pos, BS) & seen
            p = jnp.where(visible, jnp.exp2(s - lse2), 0.0)
            dp = tiles.matmul_parts(do_smem, v_smem, tile_shape, transpose_b=True)
            tiles.store_parts(ds_smem, p * (dp - delta), pp)
            return dq + tiles.matmul_parts(ds_smem, k_smem, (ROWS, dk))

        dq = lax.fori_loop(meta_smem[4, 0], meta_smem[4, 1], step, tiles.zeros((ROWS, dk)))
        dq_smem[...] = dq * shape.scale
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(dq_smem, dq_ref.at[b, hn, rows])
        plgpu.wait_smem_to_gmem(0)

    scratch = [
        tiles.smem((qp, ROWS, dk), ot), tiles.smem((qp, ROWS, dv), ot), tiles.smem((2, BLOCK_TILE, dk), ot),
        tiles.smem((vp, BLOCK_TILE, dv), ot), tiles.smem((pp, ROWS, BLOCK_TILE), ot),
        plgpu.SMEM((ROWS, dk), jnp.float32), plgpu.SMEM((5, ROWS), jnp.int32),
        plgpu.SMEM((ROWS,), jnp.float32), plgpu.SMEM((ROWS,), jnp.float32), plgpu.Barrier(num_barriers=7),
    ]
    return body, scratch


def _dkv_kernel(shape):
    dk, dv, BS, NHC, ot = shape.dk, shape.dv, shape.block_size, shape.tiling.head_chunks, shape.operand
    qp, vp, pp = shape.q_parts, shape.v_parts, shape.p_parts
    tile_shape = (BLOCK_TILE, ROWS)

    def body(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, meta_ref, span_ref, dk_ref, dv_ref,
             k_smem, v_smem, q_smem, do_smem, p_smem, ds_smem, dk_smem, dv_smem,
             meta_smem, lse_smem, delta_smem, span_smem, bars):
        block_tile, bh = lax.axis_index("block_tile"), lax.axis_index("bh")
        b, h = bh // k_ref.shape[1], bh % k_ref.shape[1]
        blocks = pl.ds(block_tile * BLOCK_TILE, BLOCK_TILE)
        plgpu.copy_gmem_to_smem(k_ref.at[b, h, :, blocks], k_smem, bars.at[0])
        plgpu.copy_gmem_to_smem(v_ref.at[b, h, :, blocks], v_smem, bars.at[1])
        plgpu.copy_gmem_to_smem(span_ref.at[block_tile], span_smem, bars.at[2])
        for i in range(3):
            plgpu.barrier_wait(bars.at[i])
        tile_lo, tile_hi = span_smem[0], span_smem[1]
        num_tiles = tile_hi - tile_lo
        block_ids = tiles.iota(tile_shape, 0) + block_tile * BLOCK_TILE

        def step(i, carry):
            d_k, d_v = carry
            hn = h * NHC + i // num_tiles
            tile = tile_lo + i % num_tiles
            rows = pl.ds(tile * ROWS, ROWS)
            for n, (src, dst) in enumerate([(q_ref.at[b, hn, :, rows], q_smem), (do_ref.at[b, hn, :, rows], do_smem),
                                            (meta_ref.at[tile], meta_smem), (lse_ref.at[b, hn, rows], lse_smem),
                                            (delta_ref.at[b, hn, rows], delta_smem)]):
                plgpu.copy_gmem_to_smem(src, dst, bars.at[3 + n])
            for n in range(5):
                plgpu.barrier_wait(bars.at[3 + n])
            pos = tiles.cols(tiles.load_cols(meta_smem.at[tiles.META_POS]), tile_shape)
            fb = tiles.cols(tiles.load_cols(meta_smem.at[tiles.META_FIRST_BLOCK]), tile_shape)
            lse = tiles.load_cols(lse_smem)
            seen = tiles.cols(lse > -jnp.inf, tile_shape)
            lse2 = tiles.cols(jnp.where(lse > -jnp.inf, lse * LOG2E, 0.0), tile_shape)
            delta = tiles.cols(tiles.load_cols(delta_smem), tile_shape)
            s_t = tiles.matmul_parts(k_smem, q_smem, tile_shape, transpose_b=True) * (shape.scale * LOG2E)
            visible = _visible(block_ids, fb, pos, BS) & seen
            p_t = jnp.where(visible, jnp.exp2(s_t - lse2), 0.0)
            tiles.store_parts(p_smem, p_t, pp)
            d_v = d_v + tiles.matmul_parts(p_smem, do_smem, (BLOCK_TILE, dv))
            dp_t = tiles.matmul_parts(v_smem, do_smem, tile_shape, transpose_b=True)
            tiles.store_parts(ds_smem, p_t * (dp_t - delta), pp)
            d_k = d_k + tiles.matmul_parts(ds_smem, q_smem, (BLOCK_TILE, dk))
            return d_k, d_v

        d_k, d_v = lax.fori_loop(0, num_tiles * NHC, step,
                                 (tiles.zeros((BLOCK_TILE, dk)), tiles.zeros((BLOCK_TILE, dv))))
        dk_smem[...] = d_k * shape.scale
        dv_smem[...] = d_v
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(dk_smem, dk_ref.at[b, h, blocks])
        plgpu.copy_smem_to_gmem(dv_smem, dv_ref.at[b, h, blocks])
        plgpu.wait_smem_to_gmem(0)

    scratch = [
        tiles.smem((2, BLOCK_TILE, dk), ot), tiles.smem((vp, BLOCK_TILE, dv), ot),
        tiles.smem((qp, ROWS, dk), ot), tiles.smem((qp, ROWS, dv), ot),
        tiles.smem((pp, BLOCK_TILE, ROWS), ot), tiles.smem((pp, BLOCK_TILE, ROWS), ot),
        plgpu.SMEM((BLOCK_TILE, dk), jnp.float32), plgpu.SMEM((BLOCK_TILE, dv), jnp.float32),
        plgpu.SMEM((5, ROWS), jnp.int32), plgpu.SMEM((ROWS,), jnp.float32), plgpu.SMEM((ROWS,), jnp.float32),
        plgpu.SMEM((ROWS,), jnp.int32), plgpu.Barrier(num_barriers=8),
    ]
    return body, scratch


# ------------------------------------------------------------------------------------------------
# Layout: what the kernels read, built in XLA (jit-safe, static shapes)
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Shape:
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

    @property
    def operand(self):
        return tiles.operand_dtype(self.dtype)

    @property
    def q_parts(self) -> int:
        """16-bit terms per query (and output cotangent): 2 for float32 problems (`tiles.split`)."""
        return 1 if jnp.dtype(self.dtype) == self.operand else 2

    # The block means are float32 whatever the query: their keys always come in two parts, so
    # the scores (hence the lse and the selection) keep ~16 bits; values, probabilities and dS
    # take the precision of the problem.
    v_parts = p_parts = q_parts


def compressed_meta(tiling: tiles.RowTiling, layout, block_size: int):
    """`[NT, 5, 64]`: the rows' metadata plus, in row 4, the block tiles `[lo, hi)` the tile walks."""
    meta = tiling.row_meta(layout)
    pos, fb = meta[:, tiles.META_POS], meta[:, tiles.META_FIRST_BLOCK]
    real = pos >= 0
    end = jnp.where(real, fb + (pos + 1) // block_size, 0)
    start = jnp.where(real & (end > fb), fb, jnp.iinfo(jnp.int32).max)
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
        grid=(shape.tiling.num_tiles, B * HN), grid_names=("tile", "bh"), scratch_types=scratch,
    )(q_rows, k_blocks, v_blocks, meta)


def _launch_dq(shape: Shape, q_rows, k_blocks, v_blocks, do_rows, lse_rows, delta_rows, meta):
    B, HN = q_rows.shape[:2]
    body, scratch = _dq_kernel(shape)
    return tiles.kernel(
        body, name="compressed_attention_bwd_kernel_dq",
        out_type=jax.ShapeDtypeStruct((B, HN, shape.tiling.num_rows, shape.dk), jnp.float32),
        grid=(shape.tiling.num_tiles, B * HN), grid_names=("tile", "bh"), scratch_types=scratch,
    )(q_rows, k_blocks, v_blocks, do_rows, lse_rows, delta_rows, meta)


def _launch_dkv(shape: Shape, q_rows, k_blocks, v_blocks, do_rows, lse_rows, delta_rows, meta, spans):
    B, H = k_blocks.shape[:2]
    body, scratch = _dkv_kernel(shape)
    return tiles.kernel(
        body, name="compressed_attention_bwd_kernel_dkv",
        out_type=(jax.ShapeDtypeStruct((B, H, shape.num_blocks, shape.dk), jnp.float32),
                  jax.ShapeDtypeStruct((B, H, shape.num_blocks, shape.dv), jnp.float32)),
        grid=(shape.num_block_tiles, B * H), grid_names=("block_tile", "bh"), scratch_types=scratch,
    )(q_rows, k_blocks, v_blocks, do_rows, lse_rows, delta_rows, meta, spans)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attend(shape: Shape, query, k_cmp, v_cmp, meta, spans):
    return _forward(shape, query, k_cmp, v_cmp, meta)[0]


def _forward(shape: Shape, query, k_cmp, v_cmp, meta):
    tiling = shape.tiling
    q_rows = tiles.split(tiling.pack(query, shape.dk), shape.q_parts, shape.operand)
    k_blocks = split_blocks(k_cmp, shape, shape.dk)
    v_blocks = split_blocks(v_cmp, shape, shape.dv, shape.v_parts)
    o_rows, lse_rows = _launch_fwd(shape, q_rows, k_blocks, v_blocks, meta)
    out = tiling.unpack(o_rows, v_cmp.shape[-1]).astype(query.dtype)
    lse = tiling.unpack_scalar(lse_rows)
    return (out, lse), (q_rows, k_blocks, v_blocks, o_rows, lse_rows)


def _attend_fwd(shape, query, k_cmp, v_cmp, meta, spans):
    outputs, (q_rows, k_blocks, v_blocks, o_rows, lse_rows) = _forward(shape, query, k_cmp, v_cmp, meta)
    return outputs, (q_rows, k_blocks, v_blocks, o_rows, lse_rows, meta, spans, k_cmp.shape, v_cmp.shape)


def _attend_bwd(shape, residuals, cotangents):
    q_rows, k_blocks, v_blocks, o_rows, lse_rows, meta, spans, k_shape, v_shape = residuals
    d_out, d_lse = cotangents
    tiling = shape.tiling
    do_packed = tiling.pack(d_out.astype(jnp.float32), shape.dv)
    # The output as the caller saw it (rounded to its dtype) defines delta = rowsum(do * o).
    o_rows = o_rows.astype(shape.dtype).astype(jnp.float32)
    # d lse / d s = p: the lse cotangent enters the softmax backward as a shift of delta.
    delta = jnp.sum(do_packed * o_rows, axis=-1) - tiling.pack_scalar(d_lse.astype(jnp.float32))
    do_rows = tiles.split(do_packed, shape.q_parts, shape.operand)
    dq_rows = _launch_dq(shape, q_rows, k_blocks, v_blocks, do_rows, lse_rows, delta, meta)
    dk, dv = _launch_dkv(shape, q_rows, k_blocks, v_blocks, do_rows, lse_rows, delta, meta, spans)
    dq = tiling.unpack(dq_rows, shape.head_dim).astype(shape.dtype)
    return (dq, unpack_blocks(dk, k_shape[1], k_shape[3]), unpack_blocks(dv, v_shape[1], v_shape[3]), None, None)


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
    return _attend(shape, query, k_cmp.astype(jnp.float32), v_cmp.astype(jnp.float32), meta, spans)
