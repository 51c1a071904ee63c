"""Attention over the selected blocks (SPEC section 4), in plain XLA.

Two layouts, chosen per call by which reads fewer keys per query:
- gathered (`S * BS < TK`, the key count): per query chunk and kv head, the `S` selected blocks are gathered as
  `BS`-row slices (contiguous, one head at a time) and shared by the `G` query heads of the group;
  the gather's transpose (a scatter-add) is the backward into `key` and `value`.
- dense (`S * BS >= TK`, short rows or huge selections): every key of the row, masked by the
  selected blocks. Its cost follows `TK`, not `S * BS`, so a tiny `TK` with a huge block or slot
  count stays within the chunk budget.
With keys longer than the queries (SPEC 10) each query sits at its row's `L_b - TQ + i`; keys at
or past `L_b` are never in a query's mask, and containment keeps whatever they hold out.
Either way each distinct block counts once (slots are sorted, repeats dropped: `O(S log S)`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ejkernel_nsa.backends.xla.layout import (
    chunk_len,
    count_visible,
    finite_or_zero,
    map_query_chunks,
    masked_softmax,
    matmul,
    merge_heads,
    nonfinite_rows,
    poisoned_probs,
    query_positions,
    split_heads,
)
from ejkernel_nsa.problem import Segments, token_layout

_NO_SLOT = jnp.iinfo(jnp.int32).max
# Read the whole row densely once S * BS * DENSE_READ_RATIO >= T: a dense masked matmul reads
# more keys than the gather but streams them, where the gather copies S * BS rows per query.
DENSE_READ_RATIO = 1


def distinct_selected_blocks(indices, counts, pos, block_size):
    """`[C, H, S]` -> (blocks, keep): the slots' blocks sorted, and which of them count.

    A slot counts when it is within the token's quota `n` and names a block in `[0, IC]`; each
    distinct block counts once (after sorting, a repeat sits next to its first occurrence).
    """
    num_slots = indices.shape[-1]
    current = (pos // block_size)[:, None, None]
    valid = (jnp.arange(num_slots) < counts[..., None]) & (indices >= 0) & (indices <= current)
    blocks = jnp.sort(jnp.where(valid, indices, _NO_SLOT), axis=-1)
    repeat = jnp.concatenate([jnp.zeros_like(blocks[..., :1], bool), blocks[..., 1:] == blocks[..., :-1]], axis=-1)
    keep = (blocks != _NO_SLOT) & ~repeat
    return jnp.where(keep, blocks, 0), keep


def selected_attention(
    query, key, value, block_indices, block_counts, *, block_size: int, scale: float, segments: Segments | None,
    kv_lengths=None,
):
    batch, num_tokens, num_q_heads, head_dim = query.shape
    num_kv_heads, value_dim = key.shape[2], value.shape[3]
    num_slots = block_indices.shape[-1]
    num_keys = key.shape[1]
    layout = token_layout(num_tokens, block_size, segments)
    positions = query_positions(layout.pos, batch, kv_lengths)
    if isinstance(block_counts, int):
        block_counts = jnp.full((batch, num_tokens, num_kv_heads), block_counts, jnp.int32)
    dense = num_slots * block_size * DENSE_READ_RATIO >= num_keys
    span = num_keys if dense else num_slots * block_size
    gathered_bytes = 0 if dense else num_kv_heads * span * (head_dim + value_dim) * key.dtype.itemsize
    slot_bytes = num_kv_heads * num_slots * 4 * 4
    chunk = chunk_len(num_tokens, batch * (gathered_bytes + slot_bytes + num_q_heads * span * 4 * 3
                                           + num_kv_heads * span * 4 * 2))
    body = _dense_body if dense else _gathered_body

    def row(q, k, v, indices, counts, row_pos):
        bad = nonfinite_rows(k, v)
        k, v = finite_or_zero(k), finite_or_zero(v)
        run = body(q, k, v, bad, block_size=block_size, scale=scale)
        return map_query_chunks(run, chunk, q, indices, counts, row_pos, layout.seq_start)

    return jax.vmap(row)(query, key, value, block_indices.astype(jnp.int32), block_counts.astype(jnp.int32),
                         positions)


def _attend(q_chunk, k_rows, v_rows, key_mask, seen_bad, scale, spec_k, spec_v, dtype):
    num_kv_heads = key_mask.shape[1]
    scores = matmul(spec_k, split_heads(q_chunk, num_kv_heads), k_rows)
    probs, _ = masked_softmax(scores * scale, key_mask[:, :, None, :])
    probs = poisoned_probs(probs, key_mask[:, :, None, :], seen_bad)
    out = matmul(spec_v, probs.astype(v_rows.dtype), v_rows)
    return merge_heads(out).astype(dtype)


def _gathered_body(q, k, v, bad, *, block_size, scale):
    num_tokens, num_kv_heads = k.shape[:2]
    # Head-major, padded by one block: every block's BS rows are one contiguous in-bounds slice.
    pad = ((0, 0), (0, block_size), (0, 0))
    k_heads, v_heads = (jnp.pad(x.transpose(1, 0, 2), pad) for x in (k, v))
    bad_heads = jnp.pad(bad.T, ((0, 0), (0, block_size)))
    in_block = jnp.arange(block_size, dtype=jnp.int32)

    def take(x, head, start):
        zeros = (jnp.zeros((), jnp.int32),) * (x.ndim - 2)
        return jax.lax.dynamic_slice(x, (head, start) + zeros, (1, block_size) + x.shape[2:])[0]

    def body(start, q_chunk, idx_chunk, counts_chunk, pos, seq_start):
        size, _, num_slots = idx_chunk.shape
        blocks, keep = distinct_selected_blocks(idx_chunk, counts_chunk, pos, block_size)
        first_row = jnp.where(keep, seq_start[:, None, None] + blocks * block_size, 0)
        first_row = first_row.astype(jnp.int32)  # one index dtype for dynamic_slice, with x64 too
        heads = jnp.broadcast_to(jnp.arange(num_kv_heads, dtype=jnp.int32)[None, :, None], first_row.shape)
        gather = jax.vmap(take, in_axes=(None, 0, 0))
        flat_heads, flat_rows = heads.reshape(-1), first_row.reshape(-1)
        shape = (size, num_kv_heads, num_slots * block_size)
        k_sel = gather(k_heads, flat_heads, flat_rows).reshape(shape + (k.shape[2],))
        v_sel = gather(v_heads, flat_heads, flat_rows).reshape(shape + (v.shape[2],))
        bad_sel = gather(bad_heads, flat_heads, flat_rows).reshape(shape)
        offsets = blocks[..., None] * block_size + in_block  # position in the sequence, [C, H, S, BS]
        key_mask = (keep[..., None] & (offsets <= pos[:, None, None, None])).reshape(shape)
        seen_bad = jnp.sum(jnp.where(key_mask, bad_sel, 0.0), axis=-1)
        return _attend(q_chunk, k_sel, v_sel, key_mask, seen_bad, scale, "chgd,chkd->chgk", "chgk,chkd->chgd",
                       q.dtype)

    return body


def _dense_body(q, k, v, bad, *, block_size, scale):
    num_tokens = k.shape[0]
    num_local_blocks = -(-num_tokens // block_size)
    keys = jnp.arange(num_tokens, dtype=jnp.int32)

    def body(start, q_chunk, idx_chunk, counts_chunk, pos, seq_start):
        size, num_kv_heads, _ = idx_chunk.shape
        blocks, keep = distinct_selected_blocks(idx_chunk, counts_chunk, pos, block_size)
        # [C, H, NB + 1]: which local blocks are selected (dropped slots land in the last column).
        chosen = jnp.zeros((size, num_kv_heads, num_local_blocks + 1), bool)
        rows = jnp.arange(size)[:, None, None]
        chosen = chosen.at[rows, jnp.arange(num_kv_heads)[None, :, None], jnp.where(keep, blocks, num_local_blocks)].set(True)
        offset = keys[None, :] - seq_start[:, None]  # key position in the query's sequence, [C, T]
        own = (offset >= 0) & (offset <= pos[:, None])
        key_block = jnp.clip(offset // block_size, 0, num_local_blocks - 1)
        key_mask = jnp.take_along_axis(chosen, key_block[:, None, :], axis=-1) & own[:, None, :]
        seen_bad = count_visible("chk,kh->ch", key_mask, bad)
        return _attend(q_chunk, k, v, key_mask, seen_bad, scale, "chgd,khd->chgk", "chgk,khd->chgd", q.dtype)

    return body
