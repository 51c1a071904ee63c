"""A key/value cache for serving NSA: decoding and chunked prefill (SPEC section 10).

The cache is a small pytree: the keys and values of every row up to a static capacity, their
compressed blocks (float32, in SPEC section 9's geometry: block `i` covers `[i*d, i*d + l)`, the
mean of its tokens or a learned compressor's `phi` of them), and each row's length. `append`
writes new tokens and recomputes only the compressed blocks they touch (at most
`ceil((n - 1 + l) / d)` blocks for `n` new tokens: `l / d` for a decoding step), never the prefix;
`attend` runs NSA for queries that are the last tokens of each row, reading the compressed blocks,
the selected blocks and the window, not the whole cache. Rows may hold different lengths;
everything works under `jit` (one compiled function for every length), `lax.scan` over steps, and
buffer donation.

    cache = ejkernel_nsa.cache.init(batch, capacity, num_kv_heads, head_dim, block_size=64)
    cache = ejkernel_nsa.cache.append(cache, key, value)      # [B, n, H, D]: a prompt, or one token
    out = ejkernel_nsa.cache.attend(cache, query, g_cmp=..., g_slc=..., block_counts=16)

With the paper's geometry and its learned compressor (`ejkernel_nsa.compressor`'s parameters,
passed to every call that compresses; they are not kept in the cache, so donating the cache never
donates them):

    cache = init(batch, capacity, H, D, block_size=64, compress_block_size=32, compress_stride=16,
                 compressor=params)
    cache = append(cache, key, value, compressor=params)
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from ejkernel_nsa import compressor as learned_compressor
from ejkernel_nsa.api import _plan, _run
from ejkernel_nsa.geometry import CompressionGeometry, geometry_of
from ejkernel_nsa.validation import ShapeChecker, check_geometry, check_nsa_call, static_int


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class NSACache:
    """Keys `[B, C, H, Dk]`, values `[B, C, H, Dv]` (the model's dtype), compressed keys and values
    `[B, C // d, H, D*]` float32, and `lengths` `[B]` int32 (slots past a row's length are never
    read into a result, whatever they hold). Static: `block_size` (the selection block `l'`),
    `compress_block_size` `l` and `compress_stride` `d` (None: the defaults `l = block_size`,
    `d = l`), and `learned_compression` (the blocks are a learned compressor's: `append` then
    needs its parameters)."""

    key: jax.Array
    value: jax.Array
    key_cmp: jax.Array
    value_cmp: jax.Array
    lengths: jax.Array
    block_size: int = dataclasses.field(metadata=dict(static=True))
    compress_block_size: int | None = dataclasses.field(default=None, metadata=dict(static=True))
    compress_stride: int | None = dataclasses.field(default=None, metadata=dict(static=True))
    learned_compression: bool = dataclasses.field(default=False, metadata=dict(static=True))

    @property
    def capacity(self) -> int:
        return self.key.shape[1]

    @property
    def geometry(self) -> CompressionGeometry:
        return geometry_of(self.block_size, self.compress_block_size, self.compress_stride)

    def append(self, key: Float[Array, "B n H Dk"], value: Float[Array, "B n H Dv"],
               num_new: Int[Array, " B"] | None = None, *, compressor: dict | None = None) -> NSACache:
        return append(self, key, value, num_new, compressor=compressor)

    def attend(self, query: Float[Array, "B T HQ Dk"], *args: Any, **kwargs: Any) -> Float[Array, "B T HQ Dv"]:
        return attend(self, query, *args, **kwargs)


def _cache_geometry(name: str, capacity: int, block_size, compress_block_size, compress_stride,
                    compressor, key_dim: int, value_dim: int) -> CompressionGeometry:
    """SPEC 9's geometry (checked as the call checks it), a capacity that the selection blocks
    tile exactly (then so do the compressed blocks' starts, `d` dividing `l'`: `C / d` of them, the
    call's `ceil(C / d)`), and the compressor's parameters made for it. `name` is the argument
    that holds the capacity."""
    block_size = static_int("block_size", block_size, 1)
    geometry = check_geometry(block_size, compress_block_size, compress_stride)
    if capacity % block_size:
        raise ValueError(f"{name}: the capacity must be a multiple of block_size={block_size} (the selection "
                         f"block, which the cache's blocks tile exactly), got {capacity}")
    if compressor is not None:
        learned_compressor.check_params("compressor", compressor, geometry.length, key_dim, value_dim)
    return geometry


def _cache_of(key, value, key_cmp, value_cmp, lengths, geometry: CompressionGeometry, learned: bool) -> NSACache:
    return NSACache(key, value, key_cmp, value_cmp, lengths, geometry.block_size, geometry.length, geometry.stride,
                    learned)


def init(batch: int, capacity: int, num_kv_heads: int, head_dim: int, value_dim: int | None = None, *,
         block_size: int = 64, compress_block_size: int | None = None, compress_stride: int | None = None,
         compressor: dict | None = None, dtype=jnp.bfloat16) -> NSACache:
    """An empty cache (every row of length 0).

    `block_size`, `compress_block_size`, `compress_stride`: SPEC section 9's `l'`, `l` (default
    `block_size`) and `d` (default `l`), as in `native_sparse_attention`; `d` must divide `l` and
    `l'`. `capacity` must be a multiple of `block_size`, so that the blocks tile it exactly.
    `compressor`: a learned compressor's parameters (`ejkernel_nsa.compressor.init`, for blocks of
    `l` tokens), checked here; the cache then keeps its blocks and every `append` takes the same
    parameters. None: mean pooling."""
    batch, num_kv_heads, head_dim = (static_int(n, x, 1) for n, x in
                                     (("batch", batch), ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)))
    value_dim = head_dim if value_dim is None else static_int("value_dim", value_dim, 1)
    capacity = static_int("capacity", capacity, 1)
    geometry = _cache_geometry("capacity", capacity, block_size, compress_block_size, compress_stride, compressor,
                               head_dim, value_dim)
    dtype = jnp.dtype(dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"dtype: expected a floating-point dtype, got {dtype}")
    num_blocks = capacity // geometry.stride
    return _cache_of(
        jnp.zeros((batch, capacity, num_kv_heads, head_dim), dtype),
        jnp.zeros((batch, capacity, num_kv_heads, value_dim), dtype),
        jnp.zeros((batch, num_blocks, num_kv_heads, head_dim), jnp.float32),
        jnp.zeros((batch, num_blocks, num_kv_heads, value_dim), jnp.float32),
        jnp.zeros((batch,), jnp.int32),
        geometry, compressor is not None,
    )


def from_keys(key: Float[Array, "B C H Dk"], value: Float[Array, "B C H Dv"], lengths: Int[Array, " B"] | None = None,
              *, block_size: int = 64, compress_block_size: int | None = None,
              compress_stride: int | None = None, compressor: dict | None = None) -> NSACache:
    """A cache holding `key` `[B, C, H, Dk]` and `value` `[B, C, H, Dv]` (capacity `C`, a multiple
    of `block_size`), of row lengths `lengths` `[B]` (default `C`): for a prefix computed
    elsewhere. Geometry and `compressor` as in `init`. Compresses every block once; slots past a
    row's length are never read."""
    checker = ShapeChecker()
    key = checker.array("key", key, "float", "B C H Dk")
    value = checker.array("value", value, "float", "B C H Dv")
    if value.dtype != key.dtype:
        raise TypeError(f"value: expected the key's dtype {key.dtype}, got {value.dtype}")
    batch, capacity = key.shape[:2]
    geometry = _cache_geometry("key", capacity, block_size, compress_block_size, compress_stride, compressor,
                               key.shape[3], value.shape[3])
    if lengths is None:
        lengths = jnp.full((batch,), capacity, jnp.int32)
    lengths = checker.array("lengths", lengths, "integer", "B").astype(jnp.int32)
    key_cmp, value_cmp = _all_blocks(geometry, compressor, key, value, lengths)
    return _cache_of(key, value, key_cmp, value_cmp, lengths, geometry, compressor is not None)


def append(cache: NSACache, key: Float[Array, "B n H Dk"], value: Float[Array, "B n H Dv"],
           num_new: Int[Array, " B"] | None = None, *, compressor: dict | None = None) -> NSACache:
    """Write `key` `[B, n, H, Dk]` and `value` `[B, n, H, Dv]` after each row's last token.

    Every row gains `n` tokens, or `num_new[b]` (`[B]` int in `[0, n]`, may be traced): then row
    `b` keeps only its first `num_new[b]` new tokens (a batch of prompts of different lengths,
    padded to `n`; the padding lands in slots past the row's length, which are never read).
    `compressor`: the learned compressor's parameters, required exactly when the cache was made
    with them (`init(..., compressor=)`); they may change between calls (blocks already in the
    cache keep the values they were compressed with).
    The caller keeps `lengths + n <= capacity`: this is checked when the lengths are concrete;
    under `jit` it cannot be, and an overflowing row's write is shifted back to end at the
    capacity (overwriting its last tokens) and its length stops there.
    """
    key, value = _check_new_tokens(cache, key, value)
    geometry = cache.geometry
    if (compressor is not None) != cache.learned_compression:
        raise ValueError(
            "compressor: this cache keeps a learned compressor's blocks; pass its parameters to every append"
            if cache.learned_compression else
            "compressor: this cache keeps mean-pooled blocks; make it with init(..., compressor=params) to "
            "keep a learned compressor's"
        )
    if compressor is not None:
        learned_compressor.check_params("compressor", compressor, geometry.length, key.shape[3], value.shape[3])
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
    return _write(cache, key, value, added, compressor)


# One program for the write and the blocks: called eagerly (a prompt outside `jit`), `append`
# compiles once per shape instead of dispatching each of its operations; inside `jit` it inlines.
@jax.jit
def _write(cache: NSACache, key, value, added, compressor) -> NSACache:
    new_tokens = key.shape[1]
    # Where the write lands: dynamic_update_slice shifts an overflowing write back to end at the
    # capacity, and the blocks to recompute are those of the slots actually written.
    starts = jnp.minimum(cache.lengths, cache.capacity - new_tokens)
    write = jax.vmap(lambda slots, new, start: jax.lax.dynamic_update_slice_in_dim(slots, new, start, axis=0))
    keys = write(cache.key, key, starts)
    values = write(cache.value, value, starts)
    lengths = jnp.minimum(cache.lengths + added, cache.capacity)
    key_cmp, value_cmp = _update_blocks(cache, compressor, keys, values, starts, lengths, new_tokens)
    return _cache_of(keys, values, key_cmp, value_cmp, lengths, cache.geometry, cache.learned_compression)


@functools.partial(jax.jit, static_argnums=0)
def _all_blocks(geometry: CompressionGeometry, compressor, key, value, lengths):
    """Every compressed block of every row (`from_keys`), one program as `_write`."""
    num_blocks = key.shape[1] // geometry.stride
    return jax.vmap(lambda k, v, n: _row_blocks(geometry, compressor, k, v, 0, num_blocks, n))(key, value, lengths)


def _row_blocks(geometry: CompressionGeometry, compressor, slots_k, slots_v, first, count: int, length):
    """Compressed blocks `first .. first + count - 1` of one row (`count` static, `first` may be
    traced) from its cached keys `[C, H, D]`: block `i` of the tokens `[i*d, i*d + l)` below the
    row's `length` (the rest zero, as `compressor.apply` pads a sequence's end; a block with none
    is zero), mean-pooled or through the compressor."""
    index = first + jnp.arange(count, dtype=jnp.int32)
    rows = index[:, None] * geometry.stride + jnp.arange(geometry.length, dtype=jnp.int32)[None, :]  # [count, l]
    inside = rows < length
    # Blocks near the capacity reach past it; those slots are never inside a row.
    rows = jnp.clip(rows, 0, slots_k.shape[0] - 1)
    return tuple(
        learned_compressor.compress_blocks(None if compressor is None else compressor[branch], slots[None], rows,
                                           inside)[0]
        for branch, slots in (("key", slots_k), ("value", slots_v))
    )


def _update_blocks(cache: NSACache, compressor, keys, values, starts, lengths, new_tokens: int):
    """Recompute the compressed blocks that the new tokens touched, from the cached keys.

    The slots `[s, s + n)` written fall in blocks `max(0, (s - l) // d + 1) .. (s + n - 1) // d`:
    at most `ceil((n - 1 + l) / d)` consecutive blocks (a static count). The run is shifted back
    where it would pass the last block (recomputing an untouched block gives it again). A block
    only partly below the row's new length holds its tokens so far, as `compressor.apply` would
    for the row's sequence; it is not visible to a query until complete (SPEC 9).
    """
    geometry = cache.geometry
    num_blocks = cache.key_cmp.shape[1]
    touched = min(num_blocks, max(1, -(-(new_tokens - 1 + geometry.length) // geometry.stride)))

    def row(slots_k, slots_v, k_cmp, v_cmp, start, length):
        first = jnp.clip((start - geometry.length) // geometry.stride + 1, 0, num_blocks - touched)
        k_new, v_new = _row_blocks(geometry, compressor, slots_k, slots_v, first, touched, length)
        return (jax.lax.dynamic_update_slice_in_dim(k_cmp, k_new, first, axis=0),
                jax.lax.dynamic_update_slice_in_dim(v_cmp, v_new, first, axis=0))

    return jax.vmap(row)(keys, values, cache.key_cmp, cache.value_cmp, starts, lengths)


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


def attend(cache: NSACache, query: Float[Array, "B T HQ Dk"], g_cmp: Float[Array, "B T HQ"] | None = None,
           g_slc: Float[Array, "B T HQ"] | None = None, block_indices: Int[Array, "B T H S"] | None = None,
           block_counts: int | Int[Array, "B T H"] = 16, softmax_scale: float | None = None, *,
           g_swa: Float[Array, "B T HQ"] | None = None, window_size: int = 0,
           max_block_counts: int | None = None, backend: str | None = None) -> Float[Array, "B T HQ Dv"]:
    """NSA of `query` `[B, T, HQ, Dk]`, the last `T` tokens of each row (already `append`ed),
    against the cache: `native_sparse_attention(query, key, value, ..., kv_lengths=lengths)` with
    the cached compressed blocks as supplied ones (`key_cmp=`, `value_cmp=`). Arguments as there;
    the block size and compression geometry are the cache's. Returns `[B, T, HQ, Dv]` in the
    query's dtype.
    """
    geometry = cache.geometry
    supplied = g_cmp is not None  # without the compressed branch, supplied blocks are an error
    call = check_nsa_call(
        query, cache.key, cache.value, g_cmp=g_cmp, g_slc=g_slc, g_swa=g_swa, block_indices=block_indices,
        block_counts=block_counts, block_size=geometry.block_size, softmax_scale=softmax_scale,
        window_size=window_size, max_block_counts=max_block_counts, compress_block_size=geometry.length,
        compress_stride=geometry.stride, key_cmp=cache.key_cmp if supplied else None,
        value_cmp=cache.value_cmp if supplied else None, kv_lengths=cache.lengths,
    )
    return _run(call, _plan(call.problem, backend))
