"""Mean pooling of keys and values into compressed blocks (SPEC sections 1, 9 and 10), in plain XLA."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ejkernel_nsa.geometry import geometry_of
from ejkernel_nsa.problem import Segments, TokenLayout, block_layout, num_compressed_blocks, token_layout


def block_ids(layout: TokenLayout, block_size: int) -> jax.Array:
    """Index of each token's compressed block on the (packed) block axis."""
    return layout.first_block + layout.pos // block_size


def pool_row(x: jax.Array, ids: jax.Array, num_blocks: int, length: jax.Array | None = None,
             same_sequence: list[jax.Array] | None = None) -> jax.Array:
    """`[T, H, D]` -> `[NB, H, D]`: the float32 mean of each block's tokens (a partial block is
    averaged over the tokens it has; a block with none is zero).

    `length` (SPEC 10): only the first `length` tokens count; the slots past it are zeroed before
    the sum, so whatever they hold (NaN included) never reaches a block.
    `same_sequence` (SPEC 9, `span = l / d` entries): block `i` is the mean over `[i*d, i*d + l)`,
    the stride-`d` pieces `i .. i + span - 1` of its own sequence. The pieces' sums are shared by
    the blocks that cover them, so the cost is that of disjoint pooling plus `span` adds.
    """
    x = x.astype(jnp.float32)
    ones = jnp.ones_like(ids, jnp.float32)
    if length is not None:
        kept = jnp.arange(x.shape[0]) < length
        x, ones = jnp.where(kept[:, None, None], x, 0.0), kept.astype(jnp.float32)
    sums = jax.ops.segment_sum(x, ids, num_blocks, indices_are_sorted=True)
    counts = jax.ops.segment_sum(ones, ids, num_blocks, indices_are_sorted=True)
    if same_sequence is not None and len(same_sequence) > 1:
        span = len(same_sequence)
        sums = jnp.pad(sums, ((0, span - 1), (0, 0), (0, 0)))
        counts = jnp.pad(counts, (0, span - 1))
        total, count = sums[:num_blocks], counts[:num_blocks]
        for k in range(1, span):
            total += jnp.where(same_sequence[k][:, None, None], sums[k : k + num_blocks], 0.0)
            count += jnp.where(same_sequence[k], counts[k : k + num_blocks], 0.0)
        sums, counts = total, count
    return sums / jnp.maximum(counts, 1.0)[:, None, None]


def mean_pool(key, value, *, block_size: int, segments: Segments | None, compress_block_size: int | None = None,
              compress_stride: int | None = None, kv_lengths=None):
    batch, num_tokens = key.shape[:2]
    num_seqs = None if segments is None else segments.num_seqs
    geometry = geometry_of(block_size, compress_block_size, compress_stride)
    stride = geometry.stride
    num_blocks = num_compressed_blocks(num_tokens, stride, num_seqs)
    ids = block_ids(token_layout(num_tokens, stride, segments), stride)
    same_sequence = None
    if geometry.length != stride:
        span = geometry.length // stride
        # Piece i + k belongs to block i's sequence when both end where that sequence ends (the
        # packed tail holds no tokens, so whatever it is matched with adds zero).
        seq_end = jnp.pad(block_layout(num_tokens, stride, segments).seq_end, (0, span - 1), constant_values=-1)
        same_sequence = [seq_end[k : k + num_blocks] == seq_end[:num_blocks] for k in range(span)]
    if kv_lengths is None:
        pool = jax.vmap(lambda x: pool_row(x, ids, num_blocks, same_sequence=same_sequence))
        return pool(key), pool(value)
    pool = jax.vmap(lambda x, length: pool_row(x, ids, num_blocks, length, same_sequence))
    return pool(key, kv_lengths), pool(value, kv_lengths)
