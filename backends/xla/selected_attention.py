"""Attention over the selected blocks (SPEC section 4), in plain XLA.

Per query chunk and kv head, the `S * BS` keys of the selected blocks are gathered once and shared
by the `G` query heads of the group; the gather's transpose (a scatter-add) is the backward into
`key` and `value`.
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


def selected_blocks_mask(indices, counts, pos, block_size):
    """`[C, H, S]`: which slots name a block that counts, each distinct block once.

    A slot counts when it is within the token's quota `n`, names a block in `[0, IC]`, and no
    earlier slot names the same block.
    """
    num_slots = indices.shape[-1]
    slot = jnp.arange(num_slots)
    current = (pos // block_size)[:, None, None]
    valid = (slot < counts[..., None]) & (indices >= 0) & (indices <= current)
    same = indices[..., :, None] == indices[..., None, :]
    earlier = slot[:, None] > slot[None, :]
    duplicate = jnp.any(same & earlier & valid[..., None, :], axis=-1)
    return valid & ~duplicate


def selected_attention(
    query, key, value, block_indices, block_counts, *, block_size: int, scale: float, segments: Segments | None,
    kv_lengths=None,
):
    batch, num_tokens, num_q_heads, head_dim = query.shape
    num_kv_heads, value_dim = key.shape[2], value.shape[3]
    num_slots = block_indices.shape[-1]
    span = num_slots * block_size
    num_keys = key.shape[1]
    layout = token_layout(num_tokens, block_size, segments)
    positions = query_positions(layout.pos, batch, kv_lengths)
    if isinstance(block_counts, int):
        block_counts = jnp.full((batch, num_tokens, num_kv_heads), block_counts, jnp.int32)
    gathered_bytes = num_kv_heads * span * (head_dim + value_dim) * key.dtype.itemsize
    chunk = chunk_len(num_tokens, batch * (gathered_bytes + num_q_heads * span * 4 * 3))
    heads = jnp.arange(num_kv_heads)[None, :, None]
    in_block = jnp.arange(block_size, dtype=jnp.int32)

    def row(q, k, v, indices, counts, row_pos):
        def body(start, q_chunk, idx_chunk, counts_chunk, pos, seq_start):
            size = q_chunk.shape[0]
            slots = selected_blocks_mask(idx_chunk, counts_chunk, pos, block_size)
            offsets = idx_chunk[..., None] * block_size + in_block  # [C, H, S, BS]
            key_mask = slots[..., None] & (offsets <= pos[:, None, None, None])
            rows = jnp.clip(seq_start[:, None, None, None] + offsets, 0, num_keys - 1)
            rows = rows.reshape(size, num_kv_heads, span)
            k_sel, v_sel = k[rows, heads], v[rows, heads]  # [C, H, S*BS, D]
            if kv_lengths is not None:
                # A serving cache's slots past the row's length may hold anything: mask the loads,
                # so a NaN there never meets a zero probability (SPEC section 8).
                loaded = key_mask.reshape(size, num_kv_heads, span, 1)
                k_sel, v_sel = jnp.where(loaded, k_sel, 0), jnp.where(loaded, v_sel, 0)
            scores = matmul("chgd,chkd->chgk", split_heads(q_chunk, num_kv_heads), k_sel)
            probs, _ = masked_softmax(scores * scale, key_mask.reshape(size, num_kv_heads, 1, span))
            out = matmul("chgk,chkd->chgd", probs.astype(v.dtype), v_sel)
            return merge_heads(out).astype(q.dtype)

        return map_query_chunks(body, chunk, q, indices, counts, row_pos, layout.seq_start)

    return jax.vmap(row)(query, key, value, block_indices.astype(jnp.int32), block_counts.astype(jnp.int32),
                         positions)
