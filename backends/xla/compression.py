"""Mean pooling of keys and values into compressed blocks (SPEC section 1), in plain XLA."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ejkernel_nsa.problem import Segments, TokenLayout, num_compressed_blocks, token_layout


def block_ids(layout: TokenLayout, block_size: int) -> jax.Array:
    """Index of each token's compressed block on the (packed) block axis."""
    return layout.first_block + layout.pos // block_size


def mean_pool_row(x: jax.Array, ids: jax.Array, num_blocks: int) -> jax.Array:
    """`[T, H, D]` -> `[NB, H, D]`: the float32 mean of each block's tokens (a partial block is
    averaged over the tokens it has; a block with none is zero)."""
    sums = jax.ops.segment_sum(x.astype(jnp.float32), ids, num_blocks, indices_are_sorted=True)
    counts = jax.ops.segment_sum(jnp.ones_like(ids, jnp.float32), ids, num_blocks, indices_are_sorted=True)
    return sums / jnp.maximum(counts, 1.0)[:, None, None]


def mean_pool(key, value, *, block_size: int, segments: Segments | None, kv_lengths=None):
    batch, num_tokens = key.shape[:2]
    num_seqs = None if segments is None else segments.num_seqs
    num_blocks = num_compressed_blocks(num_tokens, block_size, num_seqs)
    ids = block_ids(token_layout(num_tokens, block_size, segments), block_size)
    if kv_lengths is not None:
        pool = jax.vmap(lambda x, length: mean_pool_prefix(x, ids, num_blocks, length))
        return pool(key, kv_lengths), pool(value, kv_lengths)
    pool = jax.vmap(lambda x: mean_pool_row(x, ids, num_blocks))
    return pool(key), pool(value)


def mean_pool_prefix(x: jax.Array, ids: jax.Array, num_blocks: int, length: jax.Array) -> jax.Array:
    """`mean_pool_row` over the first `length` tokens only (SPEC section 10): the slots past it are
    zeroed before the sum, so whatever they hold (NaN included) never reaches a block."""
    kept = jnp.arange(x.shape[0]) < length
    sums = jax.ops.segment_sum(jnp.where(kept[:, None, None], x.astype(jnp.float32), 0.0), ids, num_blocks,
                               indices_are_sorted=True)
    counts = jax.ops.segment_sum(kept.astype(jnp.float32), ids, num_blocks, indices_are_sorted=True)
    return sums / jnp.maximum(counts, 1.0)[:, None, None]
