"""Sliding-window attention (SPEC section 5), in plain XLA.

A chunk of `C` queries reads one contiguous span of `C + W - 1` keys, so the cost is
`O(T * (C + W))` and no `[T, T]` matrix exists.
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
    split_heads,
)
from ejkernel_nsa.problem import Segments, token_layout


def sliding_window_attention(query, key, value, *, window_size: int, scale: float, segments: Segments | None,
                             kv_lengths=None):
    if kv_lengths is not None:
        return _window_against_longer_keys(query, key, value, window_size, scale, kv_lengths)
    batch, num_tokens, num_q_heads, _ = query.shape
    num_kv_heads = key.shape[2]
    window = min(window_size, num_tokens)
    chunk = chunk_len(num_tokens, batch * num_q_heads * 2 * window * 4 * 3)
    padded = -(-num_tokens // chunk) * chunk
    span = chunk + window - 1
    layout = token_layout(num_tokens, 1, segments)
    # Key rows before the first and after the last token, so every chunk slices a full span.
    pad = ((window - 1, padded - num_tokens), (0, 0), (0, 0))

    def row(q, k, v):
        k_padded, v_padded = jnp.pad(k, pad), jnp.pad(v, pad)

        def body(start, q_chunk, seq_start):
            k_span = jax.lax.dynamic_slice_in_dim(k_padded, start, span)
            v_span = jax.lax.dynamic_slice_in_dim(v_padded, start, span)
            token = start + jnp.arange(q_chunk.shape[0])[:, None]
            key_token = start - (window - 1) + jnp.arange(span)[None, :]
            first = jnp.maximum(seq_start[:, None], token - window + 1)
            mask = (key_token >= first) & (key_token <= token)
            scores = matmul("chgd,khd->chgk", split_heads(q_chunk, num_kv_heads), k_span)
            probs, _ = masked_softmax(scores * scale, mask[:, None, None, :])
            out = matmul("chgk,khd->chgd", probs.astype(v.dtype), v_span)
            return merge_heads(out).astype(q.dtype)

        return map_query_chunks(body, chunk, q, layout.seq_start)

    return jax.vmap(row)(query, key, value)


def _window_against_longer_keys(query, key, value, window_size: int, scale: float, kv_lengths):
    """SPEC section 10: the queries are the last `T` of each row's `L_b` keys.

    A chunk's span of `C + W - 1` keys is sliced straight from the cache (its start clamped into
    it, which still covers every real query's window), never from a padded copy: a decoding step
    must not read or copy the whole cache. Loads past the row's length are masked.
    """
    batch, num_tokens, num_q_heads, _ = query.shape
    num_keys, num_kv_heads = key.shape[1:3]
    window = min(window_size, num_keys)
    chunk = chunk_len(num_tokens, batch * num_q_heads * 2 * window * 4 * 3)
    span = chunk + window - 1
    if span > num_keys:
        # Only for caches shorter than one chunk's span: pad them once (they are small).
        pad = ((0, span - num_keys), (0, 0), (0, 0))
        key, value = jnp.pad(key, ((0, 0),) + pad), jnp.pad(value, ((0, 0),) + pad)

    def row(q, k, v, length):
        first_query = length - num_tokens

        def body(start, q_chunk):
            pos = first_query + start + jnp.arange(q_chunk.shape[0], dtype=jnp.int32)
            span_start = jnp.clip(pos[0] - (window - 1), 0, k.shape[0] - span)
            k_span = jax.lax.dynamic_slice_in_dim(k, span_start, span)
            v_span = jax.lax.dynamic_slice_in_dim(v, span_start, span)
            key_pos = span_start + jnp.arange(span, dtype=jnp.int32)
            mask = (key_pos[None, :] > pos[:, None] - window) & (key_pos[None, :] <= pos[:, None])
            loaded = (key_pos < length)[:, None, None]
            k_span, v_span = jnp.where(loaded, k_span, 0), jnp.where(loaded, v_span, 0)
            scores = matmul("chgd,khd->chgk", split_heads(q_chunk, num_kv_heads), k_span)
            probs, _ = masked_softmax(scores * scale, mask[:, None, None, :])
            out = matmul("chgk,khd->chgd", probs.astype(v.dtype), v_span)
            return merge_heads(out).astype(q.dtype)

        return map_query_chunks(body, chunk, q)

    return jax.vmap(row)(query, key, value, kv_lengths)
