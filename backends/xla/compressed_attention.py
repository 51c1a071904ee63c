"""Compressed attention (SPEC section 2) and top-k block selection (section 3), in plain XLA,
with section 9's geometry (compression block `l`, stride `d`, selection block `l'`).

Both score queries against the compressed keys chunk by chunk: the selection recomputes the scores
and normalizes them with the log-sum-exp that the compressed branch returned, instead of keeping
a `[T, num_blocks]` probability matrix alive between the two. With `l, d != l'` the selection
moves each chunk's compressed probabilities onto the selection blocks by the geometry's stencil
(`CompressionGeometry.transfer_taps`), still one chunk at a time.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ejkernel_nsa.backends.xla.layout import (
    chunk_len,
    count_visible,
    finite_or_zero,
    matmul,
    map_query_chunks,
    masked_softmax,
    merge_heads,
    nonfinite_rows,
    poisoned,
    poisoned_probs,
    query_positions,
    split_heads,
)
from ejkernel_nsa.geometry import CompressionGeometry, geometry_of
from ejkernel_nsa.problem import Segments, token_layout

NO_BLOCK = -1


def _scores(q_chunk, k_cmp, scale):
    """`[C, H, G, Dk] x [NB, H, Dk] -> [C, H, G, NB]` scaled scores in float32."""
    return matmul("chgd,nhd->chgn", q_chunk, k_cmp) * scale


def _visible(pos, first_block, num_blocks, geometry: CompressionGeometry):
    """`[C, NB]`: block n is visible to a token once it is complete and in the token's sequence."""
    blocks = jnp.arange(num_blocks, dtype=jnp.int32)[None, :]
    complete = geometry.num_visible(pos)
    return (blocks >= first_block[:, None]) & (blocks < (first_block + complete)[:, None])


def complete_blocks_only(k_cmp, v_cmp, kv_lengths, geometry: CompressionGeometry):
    """SPEC section 10: zero the compressed blocks past each row's last complete one, which no
    query of the row can see, so that whatever they hold (a serving cache's stale blocks, NaN)
    never meets a zero probability in a product."""
    if kv_lengths is None:
        return k_cmp, v_cmp
    complete = jnp.arange(k_cmp.shape[1])[None, :] < geometry.num_visible(kv_lengths - 1)[:, None]
    return tuple(jnp.where(complete[:, :, None, None], x, 0) for x in (k_cmp, v_cmp))


def compressed_attention(query, k_cmp, v_cmp, *, block_size: int, scale: float, segments: Segments | None,
                         compress_block_size: int | None = None, compress_stride: int | None = None,
                         kv_lengths=None):
    batch, num_tokens, num_q_heads, _ = query.shape
    num_blocks, num_kv_heads = k_cmp.shape[1:3]
    geometry = geometry_of(block_size, compress_block_size, compress_stride)
    layout = token_layout(num_tokens, geometry.stride, segments)
    positions = query_positions(layout.pos, batch, kv_lengths)
    k_cmp, v_cmp = complete_blocks_only(k_cmp, v_cmp, kv_lengths, geometry)
    chunk = chunk_len(num_tokens, batch * num_q_heads * num_blocks * 4 * 4)

    def row(q, kc, vc, row_pos):
        bad = nonfinite_rows(kc, vc)
        kc, vc = finite_or_zero(kc), finite_or_zero(vc)

        def body(start, q_chunk, pos, first_block):
            scores = _scores(split_heads(q_chunk, num_kv_heads), kc, scale)
            visible = _visible(pos, first_block, num_blocks, geometry)
            probs, lse = masked_softmax(scores, visible[:, None, None, :])
            seen_bad = count_visible("cn,nh->ch", visible, bad)
            probs = poisoned_probs(probs, visible[:, None, None, :], seen_bad)
            out = matmul("chgn,nhd->chgd", probs.astype(vc.dtype), vc)
            lse = poisoned(lse, seen_bad)
            return merge_heads(out).astype(q.dtype), lse.reshape(lse.shape[0], num_q_heads)

        return map_query_chunks(body, chunk, q, row_pos, layout.first_block)

    return jax.vmap(row)(query, k_cmp, v_cmp, positions)


def select_blocks(
    query, k_cmp, lse, *, block_counts, num_slots: int, block_size: int, scale: float, segments: Segments | None,
    compress_block_size: int | None = None, compress_stride: int | None = None, kv_lengths=None,
):
    """Top-`n` compressed blocks per (token, kv head), as local block indices `[B, T, H, S]`.

    Ties go to the larger block index: `lax.top_k` prefers the lower index among equals, so it
    runs on the block axis reversed.
    """
    batch, num_tokens, num_q_heads, _ = query.shape
    num_kv_heads = k_cmp.shape[2]
    if isinstance(block_counts, int):
        block_counts = jnp.full((batch, num_tokens, num_kv_heads), block_counts, jnp.int32)
    geometry = geometry_of(block_size, compress_block_size, compress_stride)
    k_cmp, _ = complete_blocks_only(k_cmp, k_cmp, kv_lengths, geometry)
    if not geometry.is_default:
        return _select_transferred(query, k_cmp, lse, block_counts, num_slots, geometry, scale, segments,
                                   kv_lengths)
    num_blocks = k_cmp.shape[1]
    group = num_q_heads // num_kv_heads
    layout = token_layout(num_tokens, block_size, segments)
    positions = query_positions(layout.pos, batch, kv_lengths)
    chunk = chunk_len(num_tokens, batch * num_q_heads * num_blocks * 4 * 4)

    def row(q, kc, row_lse, counts, row_pos):
        def body(start, q_chunk, lse_chunk, counts_chunk, pos, first_block):
            block_scores = _block_probabilities(q_chunk, kc, lse_chunk, pos, first_block, geometry, scale)
            return _top_blocks(block_scores, pos, counts_chunk, group, block_size, num_slots, first_block)

        return map_query_chunks(body, chunk, q, row_lse, counts, row_pos, layout.first_block)

    return jax.vmap(row)(query, k_cmp, lse, block_counts.astype(jnp.int32), positions)


def _block_probabilities(q_chunk, kc, lse_chunk, pos, first_block, geometry: CompressionGeometry, scale):
    """`[C, H, NB]`: each compressed block's attention probability summed over the group's query
    heads (SPEC 3's score), 0 for blocks a query cannot see; a query whose lse is -inf sees none."""
    num_blocks, num_kv_heads = kc.shape[0], kc.shape[1]
    scores = _scores(split_heads(q_chunk, num_kv_heads), kc, scale)
    visible = _visible(pos, first_block, num_blocks, geometry)[:, None, None, :]
    lse_chunk = split_heads(lse_chunk[..., None], num_kv_heads)
    lse_chunk = jnp.where(jnp.isfinite(lse_chunk), lse_chunk, 0.0)
    return jnp.sum(jnp.where(visible, jnp.exp(scores - lse_chunk), 0.0), axis=2)


def _top_blocks(block_scores, pos, counts_chunk, group: int, block_size: int, num_slots: int, first_block=None):
    """`[C, H, S]` local block indices from `[C, H, NB]` block scores: the forced blocks, the
    candidates `[0, IC]`, top-k with ties to the later block, -1 padding. The scores are over
    local blocks, or over the packed block axis when each token's `first_block` is given."""
    num_blocks = block_scores.shape[-1]
    top = min(num_slots, num_blocks)
    first = jnp.zeros_like(pos) if first_block is None else first_block
    local = jnp.arange(num_blocks, dtype=jnp.int32)[None, :] - first[:, None]  # [C, NB]
    current = (pos // block_size)[:, None]
    candidate = (local >= 0) & (local <= current)
    forced = candidate & ((local == 0) | (local == current - 1) | (local == current))
    block_scores = jnp.where(forced[:, None, :], float(group), block_scores)
    block_scores = jnp.where(candidate[:, None, :], block_scores, -jnp.inf)
    best, reversed_index = jax.lax.top_k(block_scores[..., ::-1], top)
    chosen = (num_blocks - 1 - reversed_index) - first[:, None, None]
    keep = jnp.isfinite(best) & (jnp.arange(top)[None, None, :] < counts_chunk[..., None])
    chosen = jnp.where(keep, chosen, NO_BLOCK).astype(jnp.int32)
    return jnp.pad(chosen, ((0, 0), (0, 0), (0, num_slots - top)), constant_values=NO_BLOCK)


def _transfer(probs, geometry: CompressionGeometry, num_selection_blocks: int):
    """`[..., NBc]` compressed probabilities over a token's own (local) blocks -> `[..., NBs]`
    selection scores: `score_j = sum_u w_u * p[j*r + u]` over the geometry's taps."""
    ratio = geometry.block_size // geometry.stride
    taps = geometry.transfer_taps()
    left = -taps[0][0]
    needed = left + num_selection_blocks * ratio + taps[-1][0] - ratio + 1
    padded = jnp.pad(probs, [(0, 0)] * (probs.ndim - 1) + [(left, max(0, needed - left - probs.shape[-1]))])
    scores = 0.0
    for u, weight in taps:
        start = left + u
        picked = jax.lax.slice_in_dim(padded, start, start + (num_selection_blocks - 1) * ratio + 1, ratio, axis=-1)
        scores = scores + weight * picked
    return scores


def _select_transferred(query, k_cmp, lse, block_counts, num_slots, geometry: CompressionGeometry, scale,
                        segments, kv_lengths):
    """SPEC 9's selection: scores of the selection blocks by the transfer of each chunk's
    compressed probabilities, in each token's local block frame."""
    batch, num_tokens, num_q_heads, _ = query.shape
    num_blocks, num_kv_heads = k_cmp.shape[1:3]
    group = num_q_heads // num_kv_heads
    layout = token_layout(num_tokens, geometry.stride, segments)
    positions = query_positions(layout.pos, batch, kv_lengths)
    # A sequence has at most ceil(TK / d) compressed and ceil(TK / l') selection blocks. Against
    # longer keys (SPEC 10, one sequence per row) TK is not the query's T: the block axis gives
    # ceil(TK / d) * d keys, which round up to the same selection blocks since d divides l'.
    key_tokens = num_tokens if kv_lengths is None else num_blocks * geometry.stride
    local_blocks = -(-key_tokens // geometry.stride)
    selection_blocks = -(-key_tokens // geometry.block_size)
    chunk = chunk_len(num_tokens, batch * num_q_heads * (num_blocks + local_blocks + selection_blocks) * 4 * 4)

    def row(q, kc, row_lse, counts, row_pos):
        def body(start, q_chunk, lse_chunk, counts_chunk, pos, first_block):
            probs = _block_probabilities(q_chunk, kc, lse_chunk, pos, first_block, geometry, scale)
            if segments is not None:
                # Packed rows: move each token's own blocks to the front (local index i).
                local = first_block[:, None] + jnp.arange(local_blocks, dtype=jnp.int32)[None, :]
                inside = local < num_blocks
                probs = jnp.take_along_axis(probs, jnp.minimum(local, num_blocks - 1)[:, None, :], axis=2)
                probs = jnp.where(inside[:, None, :], probs, 0.0)
            block_scores = _transfer(probs, geometry, selection_blocks)
            return _top_blocks(block_scores, pos, counts_chunk, group, geometry.block_size, num_slots)

        return map_query_chunks(body, chunk, q, row_lse, counts, row_pos, layout.first_block)

    return jax.vmap(row)(query, k_cmp, lse, block_counts.astype(jnp.int32), positions)
