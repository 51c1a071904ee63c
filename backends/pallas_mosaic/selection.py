"""Top-k block selection (SPEC section 3) as a Mosaic GPU kernel.

A program owns one 64-row tile of `BT` tokens x `HP` query heads (`tiles.py`; larger groups loop
over their head chunks) and walks the tile's candidate blocks in tiles of 64, keeping no
`[T, NB]` matrix anywhere:

1. `P = exp(Q K_cmp^T * scale - lse)`: the compressed branch's probabilities, recomputed and
   normalized with its lse (the means as `hi + lo` 16-bit parts, as in `compressed_attention`,
   so both agree to ~16 bits).
2. The sum over each token's `G` heads is a second wgmma, `E @ P`, with `E[token, row] = 1`
   when the row is one of the token's heads: a cross-row reduction, which registers in the
   wgmma layout cannot do, done by the tensor cores. Tokens land on the rows of the result. `P` is split into two bfloat16 parts, `P = hi + lo`, so the sum keeps ~16
   bits (the SPEC compares selections down to gaps of `1e-3 * G`).
3. Forced blocks (`0`, `IC - 1`, `IC`) score `G`; non-candidates `-inf`.
4. A running top-`S` per token, kept sorted in shared memory as (score, block) pairs, is merged
   with the tile: `S` rounds, each taking the larger of the tile's best and the list's head,
   where ties go to the larger block. Blocks arrive in increasing order, so on a tie the tile's
   block (the later one) wins, which is what the contract asks.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu

from ejkernel_nsa.backends.common import host
from ejkernel_nsa.backends.common.host import NO_BLOCK
from ejkernel_nsa.backends.pallas_mosaic import tiles
from ejkernel_nsa.backends.pallas_mosaic.compressed_attention import BLOCK_TILE, split_blocks
from ejkernel_nsa.backends.pallas_mosaic.tiles import LOG2E, ROWS
from ejkernel_nsa.problem import NSAProblem, Piece, Segments, token_layout

PIECE = Piece.SELECTION


def supports(problem: NSAProblem) -> str | None:
    # float32 queries run as two bfloat16 parts (`tiles.split`).
    # The running top-S is merged in S rounds per 64-block tile; beyond host.MAX_SLOTS it is the
    # bottleneck.
    reason = tiles.common_decline(problem, float32=True) or host.too_many_slots(problem)
    if reason is not None:
        return reason
    shape = Shape(tiles.RowTiling(problem.seq_len, problem.num_kv_heads, problem.group_size), problem.block_size,
                  problem.num_slots, 1.0, tiles.padded_dim(problem.head_dim), BLOCK_TILE, problem.group_size,
                  problem.dtype)
    return tiles.smem_decline([("block_selection_fwd_kernel", _kernel(shape)[1])])


@dataclasses.dataclass(frozen=True)
class Shape(tiles.Operands):
    tiling: tiles.RowTiling
    block_size: int
    num_slots: int
    scale: float
    dk: int
    num_blocks: int  # the packed block axis, padded to a multiple of BLOCK_TILE
    group: int
    dtype: str

    q_parts = tiles.Operands.parts


def _kernel(shape: Shape):
    S, dk, HEAD_CHUNKS = shape.num_slots, shape.dk, shape.tiling.head_chunks
    ot, qp = shape.operand, shape.q_parts
    sw = tiles.swizzle_for(ot, dk)  # one smem tiling for every wgmma operand
    tile_shape = (ROWS, BLOCK_TILE)  # rows x blocks, then tokens x blocks
    row = plgpu.Layout.WGMMA.reduce(1)
    # Barrier slots: the first index each group of copies takes (`tiles.issue` takes one per copy,
    # two for a two-part operand); the tile's rows once, then each block tile's k,
    # then each head chunk's q and lse.
    ROW_TILE_BARS, K_BARS, HEAD_CHUNK_BARS = 0, 4, 6

    def body(q_ref, k_ref, lse_ref, meta_ref, tok_ref, counts_ref, heads_ref, out_ref, *, q_smem, k_smem, p_smem,
             heads_smem, meta_smem, tok_smem, counts_smem, lse_smem, run_v, run_i, new_v, new_i, out_smem, bars):
        tile, bh = lax.axis_index("tile"), lax.axis_index("bh")
        b, h = tiles.div(bh, k_ref.shape[1]), tiles.rem(bh, k_ref.shape[1])
        rows = pl.ds(tile * ROWS, ROWS)
        tiles.fetch([(meta_ref.at[tile], meta_smem), (tok_ref.at[tile], tok_smem),
                     (counts_ref.at[b, h, tile], counts_smem), (heads_ref, heads_smem)], bars, ROW_TILE_BARS)
        fb = tiles.rows(tiles.load_rows(meta_smem.at[tiles.META_FIRST_BLOCK]), tile_shape)
        end = tiles.rows(tiles.load_rows(meta_smem.at[tiles.META_CMP_END]), tile_shape)
        tok_fb = tiles.rows(tiles.load_rows(tok_smem.at[0]), tile_shape)
        tok_ic = tiles.rows(tiles.load_rows(tok_smem.at[1]), tile_shape)

        @pl.loop(0, S)
        def _(s):
            run_v[s] = plgpu.layout_cast(jnp.full((ROWS,), -jnp.inf, jnp.float32), row)
            run_i[s] = plgpu.layout_cast(jnp.full((ROWS,), NO_BLOCK, jnp.int32), row)

        def block_tile(j, _):
            blocks = pl.ds(j * BLOCK_TILE, BLOCK_TILE)
            tiles.fetch([(k_ref.at[b, h, :, blocks], k_smem)], bars, K_BARS)
            block_ids = tiles.iota(tile_shape, 1) + j * BLOCK_TILE

            def head_chunk(c, scores):
                hn = h * HEAD_CHUNKS + c
                tiles.fetch([(q_ref.at[b, hn, :, rows], q_smem), (lse_ref.at[b, hn, rows], lse_smem)],
                            bars, HEAD_CHUNK_BARS)
                lse = tiles.load_rows(lse_smem)
                seen = tiles.rows(lse > -jnp.inf, tile_shape)
                lse = tiles.rows(jnp.where(lse > -jnp.inf, lse * LOG2E, 0.0), tile_shape)
                s = tiles.matmul_parts(q_smem, k_smem, tile_shape, transpose_b=True)
                visible = (block_ids >= fb) & (block_ids < end) & seen
                p = jnp.where(visible, jnp.exp2(s * (shape.scale * LOG2E) - lse), 0.0)
                # Two bfloat16 parts keep ~16 bits of each probability through the group sum.
                tiles.store_parts(p_smem, p, 2)
                return (scores + tiles.matmul(heads_smem, p_smem.at[0], tile_shape)
                        + tiles.matmul(heads_smem, p_smem.at[1], tile_shape))

            scores = lax.fori_loop(0, HEAD_CHUNKS, head_chunk, tiles.zeros(tile_shape))
            local = block_ids - tok_fb
            candidate = (local >= 0) & (local <= tok_ic)
            forced = (local == 0) | (local == tok_ic - 1) | (local == tok_ic)
            scores = jnp.where(forced, float(shape.group), scores)
            scores = jnp.where(candidate, scores, -jnp.inf)
            _merge(scores, block_ids, run_v, run_i, new_v, new_i, S)
            return 0

        lax.fori_loop(meta_smem[4, 0], meta_smem[4, 1], block_tile, 0)
        counts = tiles.load_rows(counts_smem)
        fb_tok = tiles.load_rows(tok_smem.at[0])

        @pl.loop(0, S)
        def _(s):
            chosen = tiles.load_rows(run_i.at[s])
            keep = (tiles.load_rows(run_v.at[s]) > -jnp.inf) & (s < counts)
            out_smem[s] = jnp.where(keep, chosen - fb_tok, NO_BLOCK)

        tiles.store([(out_smem, out_ref.at[b, h, tile])])

    scratch = dict(
        q_smem=tiles.smem((qp, ROWS, dk), ot, sw), k_smem=tiles.smem((2, BLOCK_TILE, dk), ot, sw),
        p_smem=tiles.smem((2, ROWS, BLOCK_TILE), jnp.bfloat16, sw),
        heads_smem=tiles.smem((ROWS, ROWS), jnp.bfloat16, sw), meta_smem=plgpu.SMEM((5, ROWS), jnp.int32),
        tok_smem=plgpu.SMEM((2, ROWS), jnp.int32), counts_smem=plgpu.SMEM((ROWS,), jnp.int32),
        lse_smem=plgpu.SMEM((ROWS,), jnp.float32), run_v=plgpu.SMEM((S, ROWS), jnp.float32),
        run_i=plgpu.SMEM((S, ROWS), jnp.int32), new_v=plgpu.SMEM((S, ROWS), jnp.float32),
        new_i=plgpu.SMEM((S, ROWS), jnp.int32), out_smem=plgpu.SMEM((S, ROWS), jnp.int32), bars=tiles.barriers(8),
    )
    return body, scratch


def _merge(scores, block_ids, run_v, run_i, new_v, new_i, num_slots):
    """Merge a `[64 tokens, 64 blocks]` tile into each token's sorted running top-S (in shared
    memory, `[S, 64]`), best first, ties to the larger block. Every reduction runs along the
    wgmma rows (axis 1), as in the attention kernels."""
    shape = scores.shape

    def round_(s, carry):
        scores, head = carry  # head: per token, how many running entries are already taken
        best = scores.max(axis=1)
        best_block = jnp.where(scores == tiles.rows(best, shape), block_ids, NO_BLOCK).max(axis=1)

        def running(r, acc):
            value, block = acc
            at_head = head == r
            return (jnp.where(at_head, tiles.load_rows(run_v.at[r]), value),
                    jnp.where(at_head, tiles.load_rows(run_i.at[r]), block))

        run_best, run_block = lax.fori_loop(
            0, num_slots, running, (jnp.full_like(best, -jnp.inf), jnp.full_like(best_block, NO_BLOCK)))
        # The tile's blocks come after every running block: a tie goes to the tile.
        take_tile = (best >= run_best) & (best > -jnp.inf)
        new_v[s] = jnp.where(take_tile, best, run_best)
        new_i[s] = jnp.where(take_tile, best_block, run_block)
        taken = (block_ids == tiles.rows(best_block, shape)) & tiles.rows(take_tile, shape)
        return jnp.where(taken, -jnp.inf, scores), head + jnp.where(take_tile, 0, 1)

    head = plgpu.layout_cast(jnp.zeros(shape[:1], jnp.int32), plgpu.Layout.WGMMA.reduce(1))
    lax.fori_loop(0, num_slots, round_, (scores, head))

    # The loads name their layout: unannotated, this copy left Mosaic's layout inference a search
    # it ran out of fuel on (2 minutes, then "Layout inference failed to find a solution").
    @pl.loop(0, num_slots)
    def _(s):
        run_v[s] = tiles.load_rows(new_v.at[s])
        run_i[s] = tiles.load_rows(new_i.at[s])


def token_meta(tiling: tiles.RowTiling, layout, block_size: int):
    """`[NT, 2, 64]` per tile, by token of the tile: its first packed block and its current
    block `IC` (-1 for padding tokens: no candidate); and `[NT]` x 2: the block tiles to walk."""
    BT = tiling.tokens_per_tile
    T = tiling.num_tokens
    tokens = jnp.arange(tiling.num_tiles * BT, dtype=jnp.int32)
    real = tokens < T
    fb = jnp.where(real, tiles.pad_axis(layout.first_block, 0, tokens.shape[0]), 0)
    ic = jnp.where(real, tiles.pad_axis(layout.pos // block_size, 0, tokens.shape[0]), -1)
    fb, ic = (tiles.pad_axis(x.reshape(tiling.num_tiles, BT), 1, ROWS, fill) for x, fill in ((fb, 0), (ic, -1)))
    end = jnp.where(ic >= 0, fb + ic + 1, 0)
    hi = tiles.cdiv(end.max(axis=1), BLOCK_TILE)
    lo = jnp.minimum(jnp.where(ic >= 0, fb, jnp.iinfo(jnp.int32).max).min(axis=1) // BLOCK_TILE, hi)
    return jnp.stack([fb, ic], axis=1), lo, hi


def head_selector(tiling: tiles.RowTiling):
    """`[64 tokens, 64 rows]` bfloat16: 1 where the row is one of the token's heads."""
    tokens = jnp.arange(ROWS)[:, None]
    rows = jnp.arange(ROWS)[None, :]
    mine = (rows // tiling.heads_per_chunk == tokens) & (rows < tiling.tokens_per_tile * tiling.heads_per_chunk)
    return mine.astype(jnp.bfloat16)


def run(query, k_cmp, lse, *, block_counts, num_slots: int, block_size: int, scale: float,
        segments: Segments | None):
    batch, num_tokens, num_q_heads, head_dim = query.shape
    num_blocks, num_kv_heads = k_cmp.shape[1], k_cmp.shape[2]
    group = num_q_heads // num_kv_heads
    tiling = tiles.RowTiling(num_tokens, num_kv_heads, group)
    shape = Shape(tiling, block_size, num_slots, float(scale), tiles.padded_dim(head_dim),
                  max(BLOCK_TILE, tiles.cdiv(num_blocks, BLOCK_TILE) * BLOCK_TILE), group, str(query.dtype))
    layout = token_layout(num_tokens, block_size, segments)
    meta = tiling.row_meta(layout, block_size)
    tok, lo, hi = token_meta(tiling, layout, block_size)
    scalars = jnp.zeros((tiling.num_tiles, 1, ROWS), jnp.int32).at[:, 0, 0].set(lo).at[:, 0, 1].set(hi)
    meta = jnp.concatenate([meta, scalars], axis=1)
    block_counts = host.block_counts_array(block_counts, batch, num_tokens, num_kv_heads)
    BT = tiling.tokens_per_tile
    counts = tiles.pad_axis(block_counts.astype(jnp.int32).transpose(0, 2, 1), 2, tiling.num_tiles * BT)
    counts = tiles.pad_axis(counts.reshape(batch, num_kv_heads, tiling.num_tiles, BT), 3, ROWS)

    q_rows = tiles.split(tiling.pack(query, shape.dk), shape.q_parts, shape.operand)
    k_parts = split_blocks(k_cmp, shape, shape.dk)
    lse_rows = tiling.pack_scalar(lse.astype(jnp.float32))
    body, scratch = _kernel(shape)
    chosen = tiles.kernel(
        body, name="block_selection_fwd_kernel",
        out_type=jax.ShapeDtypeStruct((batch, num_kv_heads, tiling.num_tiles, num_slots, ROWS), jnp.int32),
        grid=(tiling.num_tiles, batch * num_kv_heads), grid_names=("tile", "bh"), scratch=scratch,
    )(q_rows, k_parts, lse_rows, meta, tok, counts, head_selector(tiling))
    chosen = chosen[..., :BT].transpose(0, 2, 4, 1, 3).reshape(batch, tiling.num_tiles * BT, num_kv_heads, num_slots)
    return chosen[:, :num_tokens]
