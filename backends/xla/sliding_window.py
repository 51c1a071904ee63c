"""Sliding-window attention (SPEC section 5), in plain XLA, banded.

Tokens are cut into blocks of `L >= W` queries (`L` a power of two, at least 16); block `i` needs
only the keys of blocks `i - 1` and `i`. So every query scores `2 L` keys: the cost grows with the
window `W`, not with `T`, and no `[T, T]` matrix exists. Blocks are processed a group at a time
under `jax.checkpoint`, within the chunk budget.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ejkernel_nsa.backends.xla.layout import (
    CHUNK_BYTES,
    chunk_len,
    count_visible,
    finite_or_zero,
    map_query_chunks,
    masked_softmax,
    matmul,
    merge_heads,
    nonfinite_rows,
    poisoned_probs,
    split_heads,
)
from ejkernel_nsa.problem import Segments, token_layout

MIN_BAND = 16


def band_length(window_size: int) -> int:
    band = MIN_BAND
    while band < window_size:
        band *= 2
    return band


def sliding_window_attention(query, key, value, *, window_size: int, scale: float, segments: Segments | None,
                             kv_lengths=None):
    if kv_lengths is not None:
        return _window_against_longer_keys(query, key, value, window_size, scale, kv_lengths)
    batch, num_tokens, num_q_heads, head_dim = query.shape
    num_kv_heads, value_dim = key.shape[2], value.shape[3]
    band = band_length(min(window_size, num_tokens))
    num_bands = -(-num_tokens // band)
    padded = num_bands * band
    layout = token_layout(num_tokens, 1, segments)
    # Per band: its scores and probabilities, and the 2L keys and values it reads.
    band_bytes = batch * band * (num_q_heads * 2 * band * 4 * 3 + 2 * num_kv_heads * (head_dim + value_dim) * 4)
    bands_per_step = 1
    while bands_per_step * 2 <= min(num_bands, max(1, CHUNK_BYTES // band_bytes)):
        bands_per_step *= 2

    def to_bands(x, front=0):
        x = jnp.pad(x, [(front, padded - num_tokens)] + [(0, 0)] * (x.ndim - 1))
        return x.reshape((-1, band) + x.shape[1:])

    def row(q, k, v):
        bad = nonfinite_rows(k, v)
        k, v = finite_or_zero(k), finite_or_zero(v)
        # Keys of band i - 1 and band i side by side: [num_bands, 2L, ...] (band -1 is padding).
        k_bands, v_bands, bad_bands = (to_bands(x, front=band) for x in (k, v, bad))
        pair = lambda x: jnp.concatenate([x[:-1], x[1:]], axis=1)  # noqa: E731
        k_pairs, v_pairs, bad_pairs = pair(k_bands), pair(v_bands), pair(bad_bands)
        band_start = jnp.arange(num_bands, dtype=jnp.int32) * band

        def body(step_start, q_band, k_pair, v_pair, bad_pair, seq_start, first_token):
            token = first_token[:, None] + jnp.arange(band)[None, :]  # [n, L]
            key_token = first_token[:, None] - band + jnp.arange(2 * band)[None, :]  # [n, 2L]
            first = jnp.maximum(seq_start, token - window_size + 1)
            visible = (key_token[:, None, :] >= first[..., None]) & (key_token[:, None, :] <= token[..., None])
            scores = matmul("nqhgd,nkhd->nqhgk", split_heads(q_band, num_kv_heads), k_pair)
            probs, _ = masked_softmax(scores * scale, visible[:, :, None, None, :])
            seen_bad = count_visible("nqk,nkh->nqh", visible, bad_pair)
            probs = poisoned_probs(probs, visible[:, :, None, None, :], seen_bad)
            out = matmul("nqhgk,nkhd->nqhgd", probs.astype(v_pair.dtype), v_pair)
            return merge_heads(out).astype(q.dtype)

        outs = map_query_chunks(body, bands_per_step, to_bands(q), k_pairs, v_pairs, bad_pairs,
                                to_bands(layout.seq_start), band_start)
        return outs.reshape((padded,) + outs.shape[2:])[:num_tokens]

    return jax.vmap(row)(query, key, value)


def _window_against_longer_keys(query, key, value, window_size: int, scale: float, kv_lengths):
    """SPEC section 10: the queries are the last `T` of each row's `L_b` keys.

    A chunk's span of `C + W - 1` keys is sliced straight from the cache (its start clamped into
    it, which still covers every real query's window), never from a padded copy: a decoding step
    must not read or copy the whole cache. Whatever the span holds outside a query's window (past
    the row's length included) is contained as in the banded path.
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
            bad = nonfinite_rows(k_span, v_span)
            k_span, v_span = finite_or_zero(k_span), finite_or_zero(v_span)
            key_pos = span_start + jnp.arange(span, dtype=jnp.int32)
            visible = (key_pos[None, :] > pos[:, None] - window) & (key_pos[None, :] <= pos[:, None])
            scores = matmul("chgd,khd->chgk", split_heads(q_chunk, num_kv_heads), k_span)
            probs, _ = masked_softmax(scores * scale, visible[:, None, None, :])
            probs = poisoned_probs(probs, visible[:, None, None, :], count_visible("ck,kh->ch", visible, bad))
            out = matmul("chgk,khd->chgd", probs.astype(v.dtype), v_span)
            return merge_heads(out).astype(q.dtype)

        return map_query_chunks(body, chunk, q)

    return jax.vmap(row)(query, key, value, kv_lengths)
