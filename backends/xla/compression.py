"""Mean pooling of keys and values into compressed blocks (SPEC sections 1 and 9), in plain XLA."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ejkernel_nsa.geometry import geometry_of
from ejkernel_nsa.problem import Segments, TokenLayout, block_layout, num_compressed_blocks, token_layout


def block_ids(layout: TokenLayout, block_size: int) -> jax.Array:
    """Index of each token's compressed block on the (packed) block axis."""
    return layout.first_block + layout.pos // block_size


def mean_pool_row(x: jax.Array, ids: jax.Array, num_blocks: int) -> jax.Array:
    """`[T, H, D]` -> `[NB, H, D]`: the float32 mean of each block's tokens (a partial block is
    averaged over the tokens it has; a block with none is zero)."""
    sums = jax.ops.segment_sum(x.astype(jnp.float32), ids, num_blocks, indices_are_sorted=True)
    counts = jax.ops.segment_sum(jnp.ones_like(ids, jnp.float32), ids, num_blocks, indices_are_sorted=True)
    return sums / jnp.maximum(counts, 1.0)[:, None, None]


def overlapping_pool_row(x: jax.Array, ids: jax.Array, same_sequence: jax.Array, num_blocks: int,
                         span: int) -> jax.Array:
    """SPEC 9: block `i` is the mean over `[i*d, i*d + l)`, that is over the `span = l / d`
    stride-`d` pieces `i .. i + span - 1` of its own sequence. The pieces' sums are shared by the
    `span` blocks that cover them, so the cost is that of disjoint pooling plus `span` adds."""
    sums = jax.ops.segment_sum(x.astype(jnp.float32), ids, num_blocks, indices_are_sorted=True)
    counts = jax.ops.segment_sum(jnp.ones_like(ids, jnp.float32), ids, num_blocks, indices_are_sorted=True)
    sums = jnp.pad(sums, ((0, span - 1), (0, 0), (0, 0)))
    counts = jnp.pad(counts, (0, span - 1))
    total, count = sums[:num_blocks], counts[:num_blocks]
    for k in range(1, span):
        total += jnp.where(same_sequence[k][:, None, None], sums[k : k + num_blocks], 0.0)
        count += jnp.where(same_sequence[k], counts[k : k + num_blocks], 0.0)
    return total / jnp.maximum(count, 1.0)[:, None, None]


def mean_pool(key, value, *, block_size: int, segments: Segments | None, compress_block_size: int | None = None,
              compress_stride: int | None = None):
    batch, num_tokens = key.shape[:2]
    num_seqs = None if segments is None else segments.num_seqs
    geometry = geometry_of(block_size, compress_block_size, compress_stride)
    stride = geometry.stride
    num_blocks = num_compressed_blocks(num_tokens, stride, num_seqs)
    ids = block_ids(token_layout(num_tokens, stride, segments), stride)
    if geometry.length == stride:
        pool = jax.vmap(lambda x: mean_pool_row(x, ids, num_blocks))
        return pool(key), pool(value)
    span = geometry.length // stride
    # Piece i + k belongs to block i's sequence when both end where that sequence ends (the
    # packed tail holds no tokens, so whatever it is matched with adds zero).
    seq_end = jnp.pad(block_layout(num_tokens, stride, segments).seq_end, (0, span - 1), constant_values=-1)
    same_sequence = [seq_end[k : k + num_blocks] == seq_end[:num_blocks] for k in range(span)]
    pool = jax.vmap(lambda x: overlapping_pool_row(x, ids, same_sequence, num_blocks, span))
    return pool(key), pool(value)
