"""Mean pooling of keys and values into compressed blocks (SPEC section 1) as Mosaic GPU kernels.

The packed blocks of a row cover its tokens contiguously, in order (a sequence's partial last
block is followed by the next sequence's first block), so 64 consecutive blocks own one
contiguous token range. A program owns such a 64-block tile and walks its tokens in chunks of
64: the sums are a wgmma, `A @ X`, with the 0/1 membership matrix `A[block, token]` built in
registers from each block's token range; the float32 sums are then divided by the block's
token count. Tensor cores for a reduction wastes flops, but the piece is memory-bound and this
keeps to the one reduction a wgmma does well (no cross-row sums in registers).

Backward (the transpose): one program per 64-token tile spreads `d_cmp / count` back with
`A^T @ dC`, `A^T[token, block] = 1` for the token's own block (a tile's 64 tokens lie in at most
64 consecutive blocks). float32 inputs go through two bfloat16 parts (`tiles.split`); the 0/1
matrix is exact in any 16-bit type.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu

from ejkernel_nsa.backends.common.containment import finite_or_zero, nonfinite_prefix, seen_nonfinite
from ejkernel_nsa.backends.pallas_mosaic import tiles
from ejkernel_nsa.backends.pallas_mosaic.tiles import ROWS
from ejkernel_nsa.problem import NSAProblem, Piece, Segments, block_layout, num_compressed_blocks, token_layout

PIECE = Piece.COMPRESSION
BLOCK_TILE = 64  # blocks per program, the wgmma M of the pooling product


def supports(problem: NSAProblem) -> str | None:
    # float32 runs as two bfloat16 parts (`tiles.split`).
    reason = tiles.common_decline(problem, float32=True)
    if reason is not None:
        return reason
    kernels = []
    for dim in (problem.head_dim, problem.value_dim):
        shape = Shape(problem.seq_len, BLOCK_TILE, tiles.padded_dim(dim), dim, problem.dtype)
        kernels += [("mean_pool_fwd_kernel", _pool_kernel(shape)[1]), ("mean_pool_bwd_kernel", _spread_kernel(shape)[1])]
    return tiles.smem_decline(kernels)


@dataclasses.dataclass(frozen=True)
class Shape(tiles.Operands):
    num_tokens: int
    num_blocks: int  # the packed block axis, unpadded
    width: int  # padded feature dim
    dim: int
    dtype: str

    @property
    def padded_blocks(self) -> int:
        return tiles.cdiv(self.num_blocks, BLOCK_TILE) * BLOCK_TILE


def _pool_kernel(shape: Shape):
    P, ot, W = shape.parts, shape.operand, shape.width
    sw = tiles.swizzle_for(ot, W)  # one smem tiling for every wgmma operand
    tile_shape = (BLOCK_TILE, ROWS)  # blocks x tokens
    # Barrier slots: the block tile's bounds, then each chunk of tokens.
    BLOCKS_BARS, X_BARS = 0, 1

    def body(x_ref, blocks_ref, out_ref, *, x_smem, a_smem, out_smem, blocks_smem, bars):
        block_tile, bh = lax.axis_index("block_tile"), lax.axis_index("bh")
        b, h = tiles.div(bh, x_ref.shape[1]), tiles.rem(bh, x_ref.shape[1])
        tiles.fetch([(blocks_ref.at[block_tile], blocks_smem)], bars, BLOCKS_BARS)
        start = tiles.rows(tiles.load_rows(blocks_smem.at[0]), tile_shape)
        end = tiles.rows(tiles.load_rows(blocks_smem.at[1]), tile_shape)
        first_token, num_chunks = blocks_smem[2, 0], blocks_smem[2, 1]

        def chunk(i, acc):
            # `block_tables` rounds the first token down to a whole chunk: a TMA box into the
            # (8, swizzle)-tiled x_smem must start on a multiple of 8 rows, which Mosaic must prove.
            tokens = pl.multiple_of(first_token, ROWS) + i * ROWS
            tiles.fetch([(x_ref.at[b, h, :, pl.ds(tokens, ROWS)], x_smem)], bars, X_BARS)
            token_ids = tiles.iota(tile_shape, 1) + tokens
            a_smem[...] = jnp.where((token_ids >= start) & (token_ids < end), 1.0, 0.0).astype(ot)
            plgpu.commit_smem()
            for part in range(P):
                acc = acc + tiles.matmul(a_smem, x_smem.at[part], (BLOCK_TILE, W))
            return acc

        sums = lax.fori_loop(0, num_chunks, chunk, tiles.zeros((BLOCK_TILE, W)))
        count = tiles.load_rows(blocks_smem.at[1]) - tiles.load_rows(blocks_smem.at[0])
        out_smem[...] = sums / tiles.rows(jnp.maximum(count, 1).astype(jnp.float32), (BLOCK_TILE, W))
        blocks = pl.ds(block_tile * BLOCK_TILE, BLOCK_TILE)
        tiles.store([(out_smem, out_ref.at[b, h, blocks])])

    scratch = dict(
        x_smem=tiles.smem((P, ROWS, W), ot, sw), a_smem=tiles.smem((BLOCK_TILE, ROWS), ot, sw),
        out_smem=plgpu.SMEM((BLOCK_TILE, W), jnp.float32), blocks_smem=plgpu.SMEM((3, ROWS), jnp.int32),
        bars=tiles.barriers(2),
    )
    return body, scratch


def _spread_kernel(shape: Shape):
    P, ot, W = shape.parts, shape.operand, shape.width
    sw = tiles.swizzle_for(ot, W)  # one smem tiling for every wgmma operand
    tile_shape = (ROWS, BLOCK_TILE)  # tokens x blocks
    # Barrier slots: the tile's tokens, then each chunk of block cotangents.
    TOKENS_BARS, D_BARS = 0, 1

    def body(d_ref, tokens_ref, dx_ref, *, d_smem, a_smem, dx_smem, tokens_smem, bars):
        tile, bh = lax.axis_index("tile"), lax.axis_index("bh")
        b, h = tiles.div(bh, d_ref.shape[1]), tiles.rem(bh, d_ref.shape[1])
        tiles.fetch([(tokens_ref.at[tile], tokens_smem)], bars, TOKENS_BARS)
        # The tile's first block rounded down to a multiple of 8 (a TMA box into the tiled d_smem
        # must start on a whole smem tile, which Mosaic must prove); its blocks then span one or
        # two 64-block chunks.
        first_block, num_chunks = pl.multiple_of(tokens_smem[1, 0], 8), tokens_smem[1, 1]
        own = tiles.rows(tiles.load_rows(tokens_smem.at[0]), tile_shape)

        def chunk(c, dx):
            blocks = first_block + c * BLOCK_TILE
            tiles.fetch([(d_ref.at[b, h, :, pl.ds(blocks, BLOCK_TILE)], d_smem)], bars, D_BARS)
            a_smem[...] = jnp.where(own == tiles.iota(tile_shape, 1) + blocks, 1.0, 0.0).astype(ot)
            plgpu.commit_smem()
            for part in range(P):
                dx = dx + tiles.matmul(a_smem, d_smem.at[part], (ROWS, W))
            return dx

        dx_smem[...] = lax.fori_loop(0, num_chunks, chunk, tiles.zeros((ROWS, W)))
        tiles.store([(dx_smem, dx_ref.at[b, h, pl.ds(tile * ROWS, ROWS)])])

    scratch = dict(
        d_smem=tiles.smem((P, BLOCK_TILE, W), ot, sw), a_smem=tiles.smem((ROWS, BLOCK_TILE), ot, sw),
        dx_smem=plgpu.SMEM((ROWS, W), jnp.float32), tokens_smem=plgpu.SMEM((2, ROWS), jnp.int32),
        bars=tiles.barriers(2),
    )
    return body, scratch


def block_tables(shape: Shape, block_size: int, segments):
    """Per 64-block tile `[NBT, 3, 64]`: each block's token range `[start, end)` (empty for the
    packed axis' unused tail), and in row 2 the tile's first token and its number of 64-token
    chunks."""
    blocks = block_layout(shape.num_tokens, block_size, segments)
    pad = shape.padded_blocks - shape.num_blocks
    count = jnp.pad(blocks.count, (0, pad))
    start = jnp.where(count > 0, jnp.pad(blocks.start, (0, pad)), shape.num_tokens)
    end = start + count
    start, end = start.reshape(-1, BLOCK_TILE), end.reshape(-1, BLOCK_TILE)
    # The first token is rounded down to a whole 64-token chunk (TMA alignment, see the kernel).
    first = jnp.minimum(start.min(axis=1), shape.num_tokens) // ROWS * ROWS
    chunks = tiles.cdiv(jnp.maximum(end.max(axis=1) - first, 0), ROWS)
    scalars = jnp.zeros_like(start).at[:, 0].set(first).at[:, 1].set(chunks)
    return jnp.stack([start, end, scalars], axis=1).astype(jnp.int32)


def token_tables(shape: Shape, block_size: int, segments):
    """Per 64-token tile `[NT, 2, 64]`: each token's packed block (-1 past the end), and in row 1
    the tile's first block rounded down to a multiple of 8 and the number of 64-block chunks from
    there that hold the tile's blocks (1, or 2 when the rounding pushes the last one out)."""
    layout = token_layout(shape.num_tokens, block_size, segments)
    own = layout.first_block + layout.pos // block_size
    num_tiles = tiles.cdiv(shape.num_tokens, ROWS)
    own = jnp.pad(own, (0, num_tiles * ROWS - shape.num_tokens), constant_values=-1).reshape(num_tiles, ROWS)
    first = own[:, 0] // 8 * 8
    chunks = tiles.cdiv(own.max(axis=1) - first + 1, BLOCK_TILE)
    scalars = jnp.zeros_like(own).at[:, 0].set(first).at[:, 1].set(chunks)
    return jnp.stack([own, scalars], axis=1).astype(jnp.int32)


def _pool(shape: Shape, x, blocks):
    B, _, H, _ = x.shape
    # Whole 64-token chunks from a chunk-aligned first token, and a row count TMA can tile.
    rows = tiles.pad_axis(tiles.pad_axis(x, 3, shape.width), 1, (tiles.cdiv(shape.num_tokens, ROWS) + 1) * ROWS)
    rows = rows.transpose(0, 2, 1, 3)
    body, scratch = _pool_kernel(shape)
    out = tiles.kernel(
        body, name="mean_pool_fwd_kernel",
        out_type=jax.ShapeDtypeStruct((B, H, shape.padded_blocks, shape.width), jnp.float32),
        grid=(shape.padded_blocks // BLOCK_TILE, B * H), grid_names=("block_tile", "bh"), scratch=scratch,
    )(tiles.split(rows, shape.parts, shape.operand), blocks)
    return out.transpose(0, 2, 1, 3)[:, : shape.num_blocks, :, : shape.dim]


# SPEC 8: both products run a 0/1 membership matrix over a whole tile (`A @ X`, `A^T @ dC`), so a
# NaN or Inf in one token (or one block's cotangent) would reach every block (token) of the tile
# as `0 * NaN`. So the kernels read their input zeroed where non-finite, and the blocks (tokens)
# whose own tokens (block) held one are set to NaN in XLA afterwards, as their sum would be.


def _poison(x, bad):
    return jnp.where(bad[..., None], jnp.asarray(jnp.nan, x.dtype), x)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _mean_pool(shape: Shape, x, blocks, token_table, bad_blocks):
    return _poison(_pool(shape, finite_or_zero(x), blocks), bad_blocks)


def _mean_pool_fwd(shape, x, blocks, token_table, bad_blocks):
    return _mean_pool(shape, x, blocks, token_table, bad_blocks), (blocks, token_table)


def _mean_pool_bwd(shape, residuals, d_cmp):
    blocks, token_table = residuals
    B, _, H, _ = d_cmp.shape
    # d x[t] = d_cmp[block(t)] / count(block(t)): scale per block here, gather in the kernel.
    count = (blocks[:, 1] - blocks[:, 0]).reshape(-1)[: shape.num_blocks]
    bad_cotangent = ~jnp.all(jnp.isfinite(d_cmp), axis=-1)  # [B, NB, H]
    scaled = finite_or_zero(d_cmp.astype(jnp.float32)) / jnp.maximum(count, 1)[None, :, None, None]
    scaled = tiles.pad_axis(tiles.pad_axis(scaled, 3, shape.width), 1, shape.padded_blocks + 2 * BLOCK_TILE)
    body, scratch = _spread_kernel(shape)
    num_tiles = token_table.shape[0]
    dx = tiles.kernel(
        body, name="mean_pool_bwd_kernel",
        out_type=jax.ShapeDtypeStruct((B, H, num_tiles * ROWS, shape.width), jnp.float32),
        grid=(num_tiles, B * H), grid_names=("tile", "bh"), scratch=scratch,
    )(tiles.split(scaled.transpose(0, 2, 1, 3), shape.parts, shape.operand), token_table)
    dx = dx.transpose(0, 2, 1, 3)[:, : shape.num_tokens, :, : shape.dim]
    own_block = token_table[:, 0].reshape(-1)[: shape.num_tokens]  # every token has one
    dx = _poison(dx, bad_cotangent[:, own_block])
    return dx.astype(shape.dtype), None, None, None


_mean_pool.defvjp(_mean_pool_fwd, _mean_pool_bwd)


def run(key, value, *, block_size: int, segments: Segments | None):
    num_tokens = key.shape[1]
    num_blocks = num_compressed_blocks(num_tokens, block_size, None if segments is None else segments.num_seqs)
    layout = block_layout(num_tokens, block_size, segments)
    first, end = (jnp.broadcast_to(x[None, :, None], (key.shape[0], num_blocks, key.shape[2]))
                  for x in (layout.start, layout.start + layout.count))
    pooled = []
    for x in (key, value):
        shape = Shape(num_tokens, num_blocks, tiles.padded_dim(x.shape[-1]), x.shape[-1], str(x.dtype))
        bad_blocks = seen_nonfinite(nonfinite_prefix(x), first, end)  # SPEC 8
        pooled.append(_mean_pool(shape, x, block_tables(shape, block_size, segments),
                                 token_tables(shape, block_size, segments), bad_blocks))
    return tuple(pooled)
