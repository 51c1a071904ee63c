"""Compressed attention (SPEC section 2) and top-k block selection (section 3), in plain XLA.

Both score queries against the compressed keys chunk by chunk: the selection recomputes the scores
and normalizes them with the log-sum-exp that the compressed branch returned, instead of keeping
a `[T, num_blocks]` probability matrix alive between the two.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ejkernel_nsa.backends.xla.layout import (
    chunk_len,
    matmul,
    map_query_chunks,
    masked_softmax,
    merge_heads,
    query_positions,
    split_heads,
)
from ejkernel_nsa.problem import Segments, token_layout

NO_BLOCK = -1


def _scores(q_chunk, k_cmp, scale):
    """`[C, H, G, Dk] x [NB, H, Dk] -> [C, H, G, NB]` scaled scores in float32."""
    return matmul("chgd,nhd->chgn", q_chunk, k_cmp) * scale


def _visible(pos, first_block, num_blocks, block_size):
    """`[C, NB]`: block n is visible to a token once it is complete and in the token's sequence."""
    blocks = jnp.arange(num_blocks, dtype=jnp.int32)[None, :]
    complete = (pos + 1) // block_size
    return (blocks >= first_block[:, None]) & (blocks < (first_block + complete)[:, None])


def complete_blocks_only(k_cmp, v_cmp, kv_lengths, block_size):
    """SPEC section 10: zero the compressed blocks past each row's last complete one, which no
    query of the row can see, so that whatever they hold (a serving cache's stale blocks, NaN)
    never meets a zero probability in a product."""
    if kv_lengths is None:
        return k_cmp, v_cmp
    complete = jnp.arange(k_cmp.shape[1])[None, :] < (kv_lengths // block_size)[:, None]
    return tuple(jnp.where(complete[:, :, None, None], x, 0) for x in (k_cmp, v_cmp))


def compressed_attention(query, k_cmp, v_cmp, *, block_size: int, scale: float, segments: Segments | None,
                         kv_lengths=None):
    batch, num_tokens, num_q_heads, _ = query.shape
    num_blocks, num_kv_heads = k_cmp.shape[1:3]
    layout = token_layout(num_tokens, block_size, segments)
    positions = query_positions(layout.pos, batch, kv_lengths)
    k_cmp, v_cmp = complete_blocks_only(k_cmp, v_cmp, kv_lengths, block_size)
    chunk = chunk_len(num_tokens, batch * num_q_heads * num_blocks * 4 * 4)

    def row(q, kc, vc, row_pos):
        def body(start, q_chunk, pos, first_block):
            scores = _scores(split_heads(q_chunk, num_kv_heads), kc, scale)
            mask = _visible(pos, first_block, num_blocks, block_size)[:, None, None, :]
            probs, lse = masked_softmax(scores, mask)
            out = matmul("chgn,nhd->chgd", probs.astype(vc.dtype), vc)
            return merge_heads(out).astype(q.dtype), lse.reshape(lse.shape[0], num_q_heads)

        return map_query_chunks(body, chunk, q, row_pos, layout.first_block)

    return jax.vmap(row)(query, k_cmp, v_cmp, positions)


def select_blocks(
    query, k_cmp, lse, *, block_counts, num_slots: int, block_size: int, scale: float, segments: Segments | None,
    kv_lengths=None,
):
    """Top-`n` compressed blocks per (token, kv head), as local block indices `[B, T, H, S]`.

    Ties go to the larger block index: `lax.top_k` prefers the lower index among equals, so it
    runs on the block axis reversed.
    """
    batch, num_tokens, num_q_heads, _ = query.shape
    num_blocks, num_kv_heads = k_cmp.shape[1:3]
    group = num_q_heads // num_kv_heads
    layout = token_layout(num_tokens, block_size, segments)
    positions = query_positions(layout.pos, batch, kv_lengths)
    k_cmp, _ = complete_blocks_only(k_cmp, k_cmp, kv_lengths, block_size)
    if isinstance(block_counts, int):
        block_counts = jnp.full((batch, num_tokens, num_kv_heads), block_counts, jnp.int32)
    top = min(num_slots, num_blocks)
    chunk = chunk_len(num_tokens, batch * num_q_heads * num_blocks * 4 * 4)
    blocks = jnp.arange(num_blocks, dtype=jnp.int32)

    def row(q, kc, row_lse, counts, row_pos):
        def body(start, q_chunk, lse_chunk, counts_chunk, pos, first_block):
            scores = _scores(split_heads(q_chunk, num_kv_heads), kc, scale)
            visible = _visible(pos, first_block, num_blocks, block_size)[:, None, None, :]
            lse_chunk = split_heads(lse_chunk[..., None], num_kv_heads)
            lse_chunk = jnp.where(jnp.isfinite(lse_chunk), lse_chunk, 0.0)
            probs = jnp.where(visible, jnp.exp(scores - lse_chunk), 0.0)
            block_scores = jnp.sum(probs, axis=2)  # [C, H, NB]

            local = blocks[None, :] - first_block[:, None]  # [C, NB]
            current = (pos // block_size)[:, None]
            candidate = (local >= 0) & (local <= current)
            forced = candidate & ((local == 0) | (local == current - 1) | (local == current))
            block_scores = jnp.where(forced[:, None, :], float(group), block_scores)
            block_scores = jnp.where(candidate[:, None, :], block_scores, -jnp.inf)

            best, reversed_index = jax.lax.top_k(block_scores[..., ::-1], top)
            chosen = (num_blocks - 1 - reversed_index) - first_block[:, None, None]
            keep = jnp.isfinite(best) & (jnp.arange(top)[None, None, :] < counts_chunk[..., None])
            chosen = jnp.where(keep, chosen, NO_BLOCK).astype(jnp.int32)
            return jnp.pad(chosen, ((0, 0), (0, 0), (0, num_slots - top)), constant_values=NO_BLOCK)

        return map_query_chunks(body, chunk, q, row_lse, counts, row_pos, layout.first_block)

    return jax.vmap(row)(query, k_cmp, lse, block_counts.astype(jnp.int32), positions)
