"""A key/value cache for serving NSA: decoding and chunked prefill (SPEC section 10).

The cache is a small pytree: the keys and values of every row up to a static capacity, their
compressed blocks (SPEC section 1's means, float32), and each row's length. `append` writes new
tokens and recomputes only the compressed blocks they touch (at most `ceil((n - 1) / BS) + 1`
blocks for `n` new tokens; one block for a decoding step), never the prefix; `attend` runs NSA for
queries that are the last tokens of each row, reading the compressed blocks, the selected blocks
and the window, not the whole cache. Rows may hold different lengths; everything works under
`jit` (one compiled function for every length), `lax.scan` over steps, and buffer donation.

    cache = ejkernel_nsa.cache.init(batch, capacity, num_kv_heads, head_dim, block_size=64)
    cache = ejkernel_nsa.cache.append(cache, key, value)      # [B, n, H, D]: a prompt, or one token
    out = ejkernel_nsa.cache.attend(cache, query, g_cmp=..., g_slc=..., block_counts=16)
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from ejkernel_nsa.api import _plan, _run
from ejkernel_nsa.problem import Piece
from ejkernel_nsa.validation import ShapeChecker, check_nsa_call, static_int


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class NSACache:
    """Keys `[B, C, H, Dk]`, values `[B, C, H, Dv]` (the model's dtype), compressed keys and values
    `[B, C // BS, H, D*]` float32, and `lengths` `[B]` int32 (slots past a row's length are never
    read into a result, whatever they hold). `block_size` is static."""

    key: jax.Array
    value: jax.Array
    key_cmp: jax.Array
    value_cmp: jax.Array
    lengths: jax.Array
    block_size: int = dataclasses.field(metadata=dict(static=True))

    @property
    def capacity(self) -> int:
        return self.key.shape[1]

    def append(self, key, value) -> NSACache:
        return append(self, key, value)

    def attend(self, query, *args, **kwargs) -> jax.Array:
        return attend(self, query, *args, **kwargs)


def init(batch: int, capacity: int, num_kv_heads: int, head_dim: int, value_dim: int | None = None, *,
         block_size: int = 64, dtype=jnp.bfloat16) -> NSACache:
    """An empty cache (every row of length 0). `capacity` must be a multiple of `block_size`, so
    that the compressed blocks tile it exactly."""
    batch, num_kv_heads, head_dim = (static_int(n, x, 1) for n, x in
                                     (("batch", batch), ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)))
    value_dim = head_dim if value_dim is None else static_int("value_dim", value_dim, 1)
    block_size = static_int("block_size", block_size, 1)
    capacity = static_int("capacity", capacity, block_size)
    if capacity % block_size:
        raise ValueError(f"capacity: expected a multiple of block_size={block_size}, got {capacity}")
    dtype = jnp.dtype(dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"dtype: expected a floating-point dtype, got {dtype}")
    num_blocks = capacity // block_size
    return NSACache(
        key=jnp.zeros((batch, capacity, num_kv_heads, head_dim), dtype),
        value=jnp.zeros((batch, capacity, num_kv_heads, value_dim), dtype),
        key_cmp=jnp.zeros((batch, num_blocks, num_kv_heads, head_dim), jnp.float32),
        value_cmp=jnp.zeros((batch, num_blocks, num_kv_heads, value_dim), jnp.float32),
        lengths=jnp.zeros((batch,), jnp.int32),
        block_size=block_size,
    )


def from_keys(key, value, lengths=None, *, block_size: int = 64) -> NSACache:
    """A cache holding `key` `[B, C, H, Dk]` and `value` `[B, C, H, Dv]` (capacity `C`, a multiple
    of `block_size`), of row lengths `lengths` `[B]` (default `C`): for a prefix computed
    elsewhere. Compresses every block once; slots past a row's length are never read."""
    checker = ShapeChecker()
    key = checker.array("key", key, "float", "B C H Dk")
    value = checker.array("value", value, "float", "B C H Dv")
    if value.dtype != key.dtype:
        raise TypeError(f"value: expected the key's dtype {key.dtype}, got {value.dtype}")
    block_size = static_int("block_size", block_size, 1)
    batch, capacity = key.shape[:2]
    if capacity % block_size:
        raise ValueError(f"key: its {capacity} slots must be a multiple of block_size={block_size}")
    if lengths is None:
        lengths = jnp.full((batch,), capacity, jnp.int32)
    lengths = checker.array("lengths", lengths, "integer", "B").astype(jnp.int32)
    kept = (jnp.arange(capacity)[None, :] < lengths[:, None]).reshape(batch, -1, block_size)
    counts = jnp.maximum(kept.sum(axis=2), 1).astype(jnp.float32)[:, :, None, None]

    def means(x):
        blocks = x.reshape((batch, -1, block_size) + x.shape[2:]).astype(jnp.float32)
        return jnp.where(kept[..., None, None], blocks, 0.0).sum(axis=2) / counts

    return NSACache(key, value, means(key), means(value), lengths, block_size)


def append(cache: NSACache, key, value, num_new=None) -> NSACache:
    """Write `key` `[B, n, H, Dk]` and `value` `[B, n, H, Dv]` after each row's last token.

    Every row gains `n` tokens, or `num_new[b]` (`[B]` int in `[0, n]`, may be traced): then row
    `b` keeps only its first `num_new[b]` new tokens (a batch of prompts of different lengths,
    padded to `n`; the padding lands in slots past the row's length, which are never read).
    The caller keeps `lengths + n <= capacity`: this is checked when the lengths are concrete;
    under `jit` it cannot be, and an overflowing row's write is shifted back to end at the
    capacity (overwriting its last tokens) and its length stops there.
    """
    key, value = _check_new_tokens(cache, key, value)
    new_tokens = key.shape[1]
    if num_new is None:
        added = jnp.full(cache.lengths.shape, new_tokens, jnp.int32)
    else:
        checker = ShapeChecker()
        checker.dims["B"] = (cache.lengths.shape[0], "the cache")
        added = checker.array("num_new", num_new, "integer", "B").astype(jnp.int32)
        if not isinstance(added, jax.core.Tracer) and (np.any(np.asarray(added) < 0) or
                                                        np.any(np.asarray(added) > new_tokens)):
            raise ValueError(f"num_new: expected ints in [0, {new_tokens}] (the new tokens), got {np.asarray(added)}")
    if not isinstance(cache.lengths, jax.core.Tracer):
        if np.any(np.asarray(cache.lengths) + new_tokens > cache.capacity):
            raise ValueError(
                f"key: {new_tokens} new tokens overflow the cache (capacity {cache.capacity}) for rows of lengths "
                f"{np.asarray(cache.lengths).tolist()}"
            )
    write = jax.vmap(lambda slots, new, start: jax.lax.dynamic_update_slice_in_dim(slots, new, start, axis=0))
    keys = write(cache.key, key, cache.lengths)
    values = write(cache.value, value, cache.lengths)
    lengths = jnp.minimum(cache.lengths + added, cache.capacity)
    key_cmp, value_cmp = _update_blocks(cache, keys, values, cache.lengths, lengths, new_tokens)
    return NSACache(keys, values, key_cmp, value_cmp, lengths, cache.block_size)


def _update_blocks(cache: NSACache, keys, values, old_lengths, lengths, new_tokens: int):
    """Recompute the compressed blocks that the new tokens touched, from the cached keys.

    The tokens `[L, L + n)` fall in at most `ceil((n - 1) / BS) + 1` consecutive blocks (a static
    count), starting at block `L // BS`; the run is shifted back where it would pass the last
    block (recomputing a complete block gives it again). Each block is the float32 mean of its
    tokens below the row's new length, the same sum and count as `mean_pool`.
    """
    block_size = cache.block_size
    num_blocks = cache.key_cmp.shape[1]
    touched = min(num_blocks, -(-(new_tokens - 1) // block_size) + 1)

    def row(slots_k, slots_v, k_cmp, v_cmp, old_length, length):
        first = jnp.clip(old_length // block_size, 0, num_blocks - touched)
        start = first * block_size
        positions = start + jnp.arange(touched * block_size)
        kept = (positions < length).reshape(touched, block_size)
        counts = jnp.maximum(kept.sum(axis=1), 1).astype(jnp.float32)[:, None, None]

        def means(slots):
            span = jax.lax.dynamic_slice_in_dim(slots, start, touched * block_size, axis=0)
            span = span.reshape((touched, block_size) + span.shape[1:]).astype(jnp.float32)
            return jnp.where(kept[:, :, None, None], span, 0.0).sum(axis=1) / counts

        return (jax.lax.dynamic_update_slice_in_dim(k_cmp, means(slots_k), first, axis=0),
                jax.lax.dynamic_update_slice_in_dim(v_cmp, means(slots_v), first, axis=0))

    return jax.vmap(row)(keys, values, cache.key_cmp, cache.value_cmp, old_lengths, lengths)


def _check_new_tokens(cache: NSACache, key, value):
    checker = ShapeChecker()
    batch, capacity, num_kv_heads, head_dim = cache.key.shape
    checker.dims.update(B=(batch, "the cache"), H=(num_kv_heads, "the cache"), Dk=(head_dim, "the cache"),
                        Dv=(cache.value.shape[3], "the cache"))
    key = checker.array("key", key, "float", "B N H Dk")
    value = checker.array("value", value, "float", "B N H Dv")
    for name, x in (("key", key), ("value", value)):
        if x.dtype != cache.key.dtype:
            raise TypeError(f"{name}: expected the cache's dtype {cache.key.dtype}, got {x.dtype}")
    if key.shape[1] > capacity:
        raise ValueError(f"key: {key.shape[1]} new tokens exceed the cache's capacity {capacity}")
    return key, value


def attend(cache: NSACache, query, g_cmp=None, g_slc=None, block_indices=None, block_counts=16,
           softmax_scale: float | None = None, *, g_swa=None, window_size: int = 0,
           max_block_counts: int | None = None, backend: str | None = None) -> jax.Array:
    """NSA of `query` `[B, T, HQ, Dk]`, the last `T` tokens of each row (already `append`ed),
    against the cache: `native_sparse_attention(query, key, value, ..., kv_lengths=lengths)` with
    the cached compressed blocks in place of a new compression. Arguments as there; the block
    size is the cache's. Returns `[B, T, HQ, Dv]` in the query's dtype.
    """
    call = check_nsa_call(
        query, cache.key, cache.value, g_cmp=g_cmp, g_slc=g_slc, g_swa=g_swa, block_indices=block_indices,
        block_counts=block_counts, block_size=cache.block_size, softmax_scale=softmax_scale,
        window_size=window_size, max_block_counts=max_block_counts, kv_lengths=cache.lengths,
    )
    pieces = tuple(piece for piece in call.problem.needed_pieces if piece != Piece.COMPRESSION)
    return _run(call, _plan(call.problem, backend, pieces), compressed=(cache.key_cmp, cache.value_cmp))
