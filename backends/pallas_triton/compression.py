"""Mean pooling of keys and values into compressed blocks (SPEC section 1), as Pallas kernels.

Grid `(NB, B * H)`: a program owns one packed compressed block of one (batch row, kv head). The
block is described by its first token and its number of tokens (`block_layout`: `BS`, fewer for
a sequence's partial last block, 0 for the unused packed tail), so ordinary rows and varlen
sequences are one kernel. The backward spreads `d_mean / count` over the block's tokens; every
token lies in exactly one block, so the backward's stores cover `d_x` entirely.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from ejkernel_nsa.backends.pallas_triton import common
from ejkernel_nsa.problem import NSAProblem, Piece, Segments, block_layout

PIECE = Piece.COMPRESSION

# Tokens per step: a [TOKENS, D] float32 tile of at most this many elements.
_TILE_ELEMENTS = 2048


def _tokens_per_step(dim: int, block_size: int) -> int:
    return min(common.next_pow2(block_size), max(1, _TILE_ELEMENTS // common.padded_dim(dim)))


def _block_rows(block, bh, start_ref, count_ref, T, H):
    """The program's block: the flat row of its first token, and how many tokens it has."""
    b, h = common.divmod_static(bh, H)
    start, count = start_ref[block], count_ref[block]
    return (b * T + start) * H + h, count


def _pooled_row(block, bh, NB, H):
    b, h = common.divmod_static(bh, H)
    return (b * NB + block) * H + h


def mean_pool_fwd_kernel(x_ref, start_ref, count_ref, out_ref, *, T, NB, H, D, BS, TOKENS):
    block, bh = pl.program_id(0), pl.program_id(1)
    first_row, count = _block_rows(block, bh, start_ref, count_ref, T, H)
    offsets = jnp.arange(TOKENS, dtype=jnp.int32)
    width = common.padded_dim(D)

    def step(i, total):
        token = i * TOKENS + offsets
        x = common.load_rows(x_ref, first_row + token * H, token < count, width, D)
        return total + jnp.sum(x.astype(jnp.float32), axis=0, keepdims=True)

    total = jax.lax.fori_loop(0, common.cdiv(BS, TOKENS), step, jnp.zeros((1, width), jnp.float32))
    mean = total / jnp.maximum(count, 1).astype(jnp.float32)
    out_row = _pooled_row(block, bh, NB, H)
    common.store_rows(out_ref, jnp.full((1,), out_row, jnp.int32), jnp.ones((1,), jnp.bool_), mean, D)


def mean_pool_bwd_kernel(d_out_ref, start_ref, count_ref, d_x_ref, *, T, NB, H, D, BS, TOKENS):
    block, bh = pl.program_id(0), pl.program_id(1)
    first_row, count = _block_rows(block, bh, start_ref, count_ref, T, H)
    width = common.padded_dim(D)
    out_row = jnp.full((1,), _pooled_row(block, bh, NB, H), jnp.int32)
    d_mean = common.load_rows(d_out_ref, out_row, jnp.ones((1,), jnp.bool_), width, D)
    share = jnp.broadcast_to(d_mean / jnp.maximum(count, 1).astype(jnp.float32), (TOKENS, width))
    offsets = jnp.arange(TOKENS, dtype=jnp.int32)

    def step(i, carry):
        token = i * TOKENS + offsets
        common.store_rows(d_x_ref, first_row + token * H, token < count, share, D)
        return carry

    jax.lax.fori_loop(0, common.cdiv(BS, TOKENS), step, 0)


def _static(x, block_size: int, num_tokens: int, num_blocks: int) -> dict:
    dim = x.shape[-1]
    return dict(T=num_tokens, NB=num_blocks, H=x.shape[2], D=dim, BS=block_size,
                TOKENS=_tokens_per_step(dim, block_size))


def _mean_pool_fwd(x, block_start, block_count, block_size: int):
    batch, num_tokens, num_heads, dim = x.shape
    num_blocks = block_start.shape[0]
    out = common.pallas_call(
        mean_pool_fwd_kernel, grid=(num_blocks, batch * num_heads),
        out_shape=jax.ShapeDtypeStruct((batch * num_blocks * num_heads, dim), jnp.float32),
        num_warps=4, num_stages=1, name="mean_pool_fwd", **_static(x, block_size, num_tokens, num_blocks),
    )(x.reshape(-1, dim), block_start, block_count)
    return out.reshape(batch, num_blocks, num_heads, dim)


def _mean_pool_bwd(d_out, block_start, block_count, block_size: int, x_like: jax.ShapeDtypeStruct):
    batch, num_tokens, num_heads, dim = x_like.shape
    num_blocks = block_start.shape[0]
    d_x = common.pallas_call(
        mean_pool_bwd_kernel, grid=(num_blocks, batch * num_heads),
        out_shape=jax.ShapeDtypeStruct((batch * num_tokens * num_heads, dim), x_like.dtype),
        num_warps=4, num_stages=1, name="mean_pool_bwd", **_static(d_out, block_size, num_tokens, num_blocks),
    )(d_out.reshape(-1, dim).astype(jnp.float32), block_start, block_count)
    return d_x.reshape(x_like.shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _pool(x, block_start, block_count, block_size: int, x_like: jax.ShapeDtypeStruct):
    return _mean_pool_fwd(x, block_start, block_count, block_size)


def _pool_fwd(x, block_start, block_count, block_size, x_like):
    # The backward needs x's shape and dtype (static, in `x_like`), not its values.
    return _mean_pool_fwd(x, block_start, block_count, block_size), (block_start, block_count)


def _pool_bwd(block_size, x_like, residuals, d_out):
    block_start, block_count = residuals
    return _mean_pool_bwd(d_out, block_start, block_count, block_size, x_like), None, None


_pool.defvjp(_pool_fwd, _pool_bwd)


def supports(problem: NSAProblem) -> str | None:
    return common.common_decline(problem)


def run(key, value, *, block_size: int, segments: Segments | None):
    if key.shape[1] == 0:
        return (jnp.zeros((key.shape[0], 0) + key.shape[2:], jnp.float32),
                jnp.zeros((value.shape[0], 0) + value.shape[2:], jnp.float32))
    blocks = block_layout(key.shape[1], block_size, segments)
    return tuple(_pool(x, blocks.start, blocks.count, block_size, jax.ShapeDtypeStruct(x.shape, x.dtype))
                 for x in (key, value))
