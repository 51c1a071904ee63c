"""Argument checks at the boundary of the public API, at trace time (shapes and dtypes are static).

Shapes are checked with jaxtyping (one memo per call, so a dimension name binds once across all
arguments); every failure becomes a `TypeError` (wrong kind of thing) or `ValueError` (right kind,
wrong value) that names the argument, what was expected and what came.
"""

from __future__ import annotations

import dataclasses
import numbers

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int, Integer, jaxtyped

from ejkernel_nsa.input_limits import (
    check_nonempty_dims,
    check_token_indices,
    checked_int32_values,
    saturated_int32,
)
from ejkernel_nsa.geometry import CompressionGeometry, geometry_of
from ejkernel_nsa.problem import NSAProblem, Segments, num_compressed_blocks, platform_of

_KINDS = {"float": (Float, "floating-point"), "int": (Int, "signed integer"), "integer": (Integer, "integer")}


class ShapeChecker:
    """Binds dimension names across the arguments of one call and explains any mismatch."""

    def __init__(self):
        self.dims: dict[str, tuple[int, str]] = {}

    def array(self, name: str, value, kind: str, spec: str) -> jax.Array:
        if kind != "float":  # before any conversion, which would wrap int64 into int32
            value = checked_int32_values(name, value)
        x = as_array(name, value)
        jaxtyping_kind, kind_word = _KINDS[kind]
        names = spec.split()
        if x.ndim != len(names):
            raise ValueError(f"{name}: expected a rank-{len(names)} array [{', '.join(names)}], got shape {x.shape}")
        if not isinstance(x, jaxtyping_kind[Array, "..."]):
            raise TypeError(f"{name}: expected a {kind_word} array, got dtype {x.dtype}")
        for dim, size in zip(names, x.shape, strict=True):
            if dim in self.dims and self.dims[dim][0] != size:
                bound, source = self.dims[dim]
                raise ValueError(
                    f"{name}: expected shape [{', '.join(names)}] with {dim}={bound} (from {source}), "
                    f"got shape {x.shape}"
                )
        if not isinstance(x, jaxtyping_kind[Array, spec]):
            raise ValueError(f"{name}: shape {x.shape} does not match [{', '.join(names)}]")
        for dim, size in zip(names, x.shape, strict=True):
            self.dims.setdefault(dim, (size, name))
        return x

    def optional(self, name: str, value, kind: str, spec: str) -> jax.Array | None:
        return None if value is None else self.array(name, value, kind, spec)


def as_array(name: str, value) -> jax.Array:
    if isinstance(value, jax.Array):
        return value
    if isinstance(value, (np.ndarray, np.generic, list, tuple)):
        return jnp.asarray(value)
    raise TypeError(f"{name}: expected an array, got {type(value).__name__}")


def static_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected a Python int (a static value), got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value}")
    return int(value)


def softmax_scale_of(value, head_dim: int) -> float:
    if head_dim < 1:
        raise ValueError(f"query: expected head dim Dk >= 1, got {head_dim}")
    if value is None:
        return head_dim**-0.5
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"softmax_scale: expected a Python float or None, got {type(value).__name__}")
    if not np.isfinite(value) or value <= 0:
        raise ValueError(f"softmax_scale: expected a finite positive number, got {value}")
    return float(value)


def segments_of(
    checker: ShapeChecker, cu_seqlens, batch: int, num_tokens: int, token_indices=None
) -> Segments | None:
    if cu_seqlens is None:
        if token_indices is not None:
            raise ValueError("token_indices: only meaningful with cu_seqlens, which is None")
        return None
    cu = checker.array("cu_seqlens", cu_seqlens, "int", "N1")
    if batch != 1:
        raise ValueError(f"cu_seqlens: packed sequences need batch size 1, got query batch {batch}")
    if cu.shape[0] < 2:
        raise ValueError(f"cu_seqlens: expected [N + 1] offsets with N >= 1, got shape {cu.shape}")
    if not isinstance(cu, jax.core.Tracer):
        offsets = np.asarray(cu)
        if offsets[0] != 0 or offsets[-1] != num_tokens or np.any(np.diff(offsets) < 0):
            raise ValueError(
                f"cu_seqlens: expected non-decreasing offsets from 0 to T={num_tokens}, got {offsets.tolist()}"
            )
    if token_indices is not None:
        token_indices = checker.array("token_indices", token_indices, "int", "T 2")
        check_token_indices(token_indices, cu)
    return Segments(saturated_int32(cu), None if token_indices is None else saturated_int32(token_indices))


def block_counts_of(checker: ShapeChecker, block_counts):
    if isinstance(block_counts, (bool, np.bool_)):
        raise TypeError("block_counts: expected an int or an integer array [B, T, H], got a bool")
    if isinstance(block_counts, numbers.Integral):
        checked_int32_values("block_counts", np.asarray(block_counts))
        return static_int("block_counts", block_counts, 0)
    if isinstance(block_counts, numbers.Number):
        raise TypeError(
            f"block_counts: expected a Python int or an integer array [B, T, H], "
            f"got {type(block_counts).__name__} {block_counts!r}"
        )
    if getattr(block_counts, "ndim", None) == 0:
        if isinstance(block_counts, jax.core.Tracer):
            # The count sizes the selection (top-k, slots): it must be static, or an array per token.
            raise TypeError(
                "block_counts: expected a Python int (a static value) or an integer array [B, T, H], "
                "got a traced scalar; pass it as a static argument, or broadcast it to [B, T, H]"
            )
        if np.issubdtype(block_counts.dtype, np.integer):
            return static_int("block_counts", int(block_counts), 0)
    return saturated_int32(checker.array("block_counts", block_counts, "integer", "B T H"))


def computed_slot_count(block_counts, max_block_counts) -> int:
    """The static slot count `S` of a computed selection: `max_block_counts` if given, else the
    int `block_counts`; never read from an array of counts, which may be traced."""
    if max_block_counts is not None:
        num_slots = static_int("max_block_counts", max_block_counts, 1)
        if isinstance(block_counts, int) and block_counts > num_slots:
            raise ValueError(f"block_counts: {block_counts} exceeds max_block_counts={num_slots}")
        return num_slots
    if not isinstance(block_counts, int):
        raise ValueError(
            "max_block_counts: an array block_counts with a computed selection needs the static number of "
            "slots; pass max_block_counts=<int> (it cannot be read from traced data)"
        )
    if block_counts < 1:
        raise ValueError("block_counts: a computed selection needs at least 1 block per token, got 0")
    return block_counts


@dataclasses.dataclass(frozen=True)
class NSACall:
    """The arguments of one call, checked and normalized, with its static description."""

    query: jax.Array
    key: jax.Array
    value: jax.Array
    g_cmp: jax.Array | None
    g_slc: jax.Array | None
    g_swa: jax.Array | None
    block_indices: jax.Array | None
    block_counts: int | jax.Array
    segments: Segments | None
    scale: float
    problem: NSAProblem
    # SPEC section 9: the compression geometry and the caller's compressed keys/values (or None).
    geometry: CompressionGeometry | None = None
    key_cmp: jax.Array | None = None
    value_cmp: jax.Array | None = None
    # `[B]` int32 key length per row for SPEC section 10's calls (TK each when not given); else None.
    kv_lengths: jax.Array | None = None


def check_qkv(checker: ShapeChecker, query, key, value, longer_keys: bool = False
              ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """With `longer_keys`, the keys may be longer than the query (SPEC section 10: TQ <= TK)."""
    query = checker.array("query", query, "float", "B T HQ Dk")
    key_tokens = "TK" if longer_keys else "T"
    key = checker.array("key", key, "float", f"B {key_tokens} H Dk")
    if key.shape[1] < query.shape[1]:
        raise ValueError(
            f"key: expected at least the query's T={query.shape[1]} tokens (the queries are the last "
            f"T positions of the keys, SPEC section 10), got shape {key.shape}"
        )
    value = checker.array("value", value, "float", f"B {key_tokens} H Dv")
    for name, x in (("key", key), ("value", value)):
        if x.dtype != query.dtype:
            raise TypeError(f"{name}: expected dtype {query.dtype} (the query's), got {x.dtype}")
    check_nonempty_dims(query, key, value)
    check_groups(query, key, "key/value (HQ = G * H for an integer group size G)")
    return query, key, value


@jaxtyped(typechecker=None)
def check_nsa_call(
    query,
    key,
    value,
    *,
    g_cmp=None,
    g_slc=None,
    g_swa=None,
    block_indices=None,
    block_counts=16,
    block_size=64,
    softmax_scale=None,
    cu_seqlens=None,
    token_indices=None,
    window_size=0,
    max_block_counts=None,
    compress_block_size=None,
    compress_stride=None,
    key_cmp=None,
    value_cmp=None,
    kv_lengths=None,
) -> NSACall:
    checker = ShapeChecker()
    query, key, value = check_qkv(checker, query, key, value, longer_keys=True)
    batch, num_tokens, num_q_heads, head_dim = query.shape
    block_size = static_int("block_size", block_size, 1)
    geometry = check_geometry(block_size, compress_block_size, compress_stride)
    window_size = static_int("window_size", window_size, 0)
    g_cmp, g_slc, g_swa = (
        checker.optional(name, gate, "float", "B T HQ")
        for name, gate in (("g_cmp", g_cmp), ("g_slc", g_slc), ("g_swa", g_swa))
    )
    block_indices = checker.optional("block_indices", block_indices, "int", "B T H S")
    block_indices = None if block_indices is None else saturated_int32(block_indices)
    block_counts = block_counts_of(checker, block_counts)
    kv_lengths = kv_lengths_of(checker, kv_lengths, num_tokens, key.shape[1], cu_seqlens)
    segments = segments_of(checker, cu_seqlens, batch, num_tokens, token_indices)
    # Supplied blocks compress the keys (TK tokens, longer than the query's under SPEC 10).
    key_cmp, value_cmp = check_supplied_compression(checker, key_cmp, value_cmp, key.shape[1], geometry, segments,
                                                    g_cmp is not None)

    if g_swa is not None and window_size == 0:
        raise ValueError("g_swa: the sliding-window gate needs window_size > 0, got window_size=0")
    if g_swa is None and window_size > 0:
        raise ValueError(f"window_size: {window_size} asks for the sliding-window branch, which needs its gate g_swa")
    if g_cmp is None and block_indices is None:
        raise ValueError("block_indices: required when g_cmp is None (there is no compressed branch to select from)")
    if block_indices is not None:
        if max_block_counts is not None:
            static_int("max_block_counts", max_block_counts, 1)
        num_slots = block_indices.shape[-1]
    else:
        num_slots = computed_slot_count(block_counts, max_block_counts)

    problem = NSAProblem(
        batch=batch,
        seq_len=key.shape[1],  # TK: the key length (SPEC section 10), T for a full-length call
        num_q_heads=num_q_heads,
        num_kv_heads=key.shape[2],
        head_dim=head_dim,
        value_dim=value.shape[3],
        dtype=str(query.dtype),
        block_size=block_size,
        num_slots=num_slots,
        window_size=window_size,
        num_seqs=None if segments is None else segments.num_seqs,
        per_token_counts=not isinstance(block_counts, int),
        selection="given" if block_indices is not None else "computed",
        has_g_cmp=g_cmp is not None,
        has_g_slc=g_slc is not None,
        has_g_swa=g_swa is not None,
        platform=platform_of(query, key, value),
        **problem_geometry(geometry, key_cmp is not None),
        query_len=None if key.shape[1] == num_tokens else num_tokens,
        kv_lengths=kv_lengths is not None,
    )
    if problem.against_longer_keys and kv_lengths is None:
        kv_lengths = jnp.full((batch,), key.shape[1], jnp.int32)
    return NSACall(
        query, key, value, g_cmp, g_slc, g_swa, block_indices, block_counts, segments,
        softmax_scale_of(softmax_scale, head_dim), problem, geometry, key_cmp, value_cmp, kv_lengths,
    )


# ---- SPEC section 9: compression geometry and supplied compressed blocks -----------------------


def check_geometry(block_size: int, compress_block_size, compress_stride) -> CompressionGeometry:
    """`l` and `d` as SPEC 9 allows them: positive static ints with `d` dividing `l` and `l'`."""
    if compress_block_size is not None:
        compress_block_size = static_int("compress_block_size", compress_block_size, 1)
    if compress_stride is not None:
        compress_stride = static_int("compress_stride", compress_stride, 1)
    geometry = geometry_of(block_size, compress_block_size, compress_stride)
    if geometry.length % geometry.stride:
        raise ValueError(
            f"compress_stride: the stride d={geometry.stride} must divide the compression block length "
            f"l={geometry.length} (compress_block_size)"
        )
    if geometry.block_size % geometry.stride:
        raise ValueError(
            f"compress_stride: the stride d={geometry.stride} must divide the selection block "
            f"l'={geometry.block_size} (block_size)"
        )
    return geometry


def problem_geometry(geometry: CompressionGeometry, supplied: bool) -> dict:
    """`NSAProblem`'s geometry fields: None for the default geometry, so that a call without
    section 9's arguments is described exactly as before."""
    fields = {"supplied_compression": supplied}
    if not geometry.is_default:
        fields.update(compress_block_size=geometry.length, compress_stride=geometry.stride)
    return fields


def check_supplied_compression(checker: ShapeChecker, key_cmp, value_cmp, num_tokens: int,
                               geometry: CompressionGeometry, segments, has_g_cmp: bool):
    """The caller's compressed keys/values (SPEC 9): both or neither, only with `g_cmp`, and
    `[B, NBc, H, D]` with NBc the geometry's block count. Cast to float32, the dtype of
    `mean_pool`'s blocks that the pieces expect (gradients return in the caller's dtype)."""
    if key_cmp is None and value_cmp is None:
        return None, None
    if key_cmp is None or value_cmp is None:
        missing = "key_cmp" if key_cmp is None else "value_cmp"
        raise ValueError(f"{missing}: key_cmp and value_cmp must be given together, got only one of them")
    if not has_g_cmp:
        raise ValueError("key_cmp: supplied compressed blocks are used only by the compressed branch, which needs g_cmp")
    key_cmp, value_cmp = check_compressed(checker, key_cmp, value_cmp, num_tokens, geometry.block_size, segments,
                                          geometry)
    return key_cmp.astype(jnp.float32), value_cmp.astype(jnp.float32)


def kv_lengths_of(checker: ShapeChecker, kv_lengths, query_len: int, key_len: int, cu_seqlens
                  ) -> jax.Array | None:
    """SPEC section 10's per-row key lengths `[B]`, checked against `[TQ, TK]` when concrete."""
    if cu_seqlens is not None and (kv_lengths is not None or query_len != key_len):
        raise ValueError(
            "cu_seqlens: packed sequences take queries as long as the keys and no kv_lengths; queries "
            f"against a longer key sequence (TQ={query_len}, TK={key_len}"
            f"{', kv_lengths given' if kv_lengths is not None else ''}) need one sequence per batch row"
        )
    if kv_lengths is None:
        return None
    lengths = checker.array("kv_lengths", kv_lengths, "integer", "B")
    if not isinstance(lengths, jax.core.Tracer):
        values = np.asarray(lengths)
        if np.any(values < query_len) or np.any(values > key_len):
            raise ValueError(
                f"kv_lengths: expected each row's key length in [TQ={query_len}, TK={key_len}], got {values.tolist()}"
            )
    return lengths.astype(jnp.int32)


def check_compressed(checker: ShapeChecker, k_cmp, v_cmp, num_tokens: int, block_size: int, segments,
                     geometry: CompressionGeometry | None = None):
    """The compressed keys/values that `mean_pool` returns, for the pieces that take them."""
    k_cmp = checker.array("key_cmp", k_cmp, "float", "B NB H Dk")
    v_cmp = checker.array("value_cmp", v_cmp, "float", "B NB H Dv")
    geometry = geometry or geometry_of(block_size)
    num_seqs = None if segments is None else segments.num_seqs
    expected = num_compressed_blocks(num_tokens, geometry.stride, num_seqs)
    if k_cmp.shape[1] != expected:
        if geometry.is_default:
            what = f"block_size={block_size}"
        else:
            what = f"stride compress_stride={geometry.stride}"
        layout = f"T // {geometry.stride} + N with N={num_seqs} packed sequences" if num_seqs else \
            f"ceil(T / {geometry.stride})"
        raise ValueError(
            f"key_cmp: expected {expected} compressed blocks ({layout}; mean_pool's output for T={num_tokens}, "
            f"{what}), got shape {k_cmp.shape}"
        )
    return k_cmp, v_cmp


def check_groups(query, kv: jax.Array, kv_name: str) -> None:
    if kv.shape[2] < 1 or query.shape[2] < 1:
        raise ValueError(f"query: expected at least one query head and one kv head, got {query.shape[2]} and "
                         f"{kv.shape[2]} (of {kv_name})")
    if query.shape[2] % kv.shape[2]:
        raise ValueError(
            f"query: its {query.shape[2]} heads must be a multiple of the {kv.shape[2]} kv heads of {kv_name}"
        )


# ---- the pieces' arguments ---------------------------------------------------------------------


@jaxtyped(typechecker=None)
def check_pool_args(key, value, block_size, cu_seqlens):
    checker = ShapeChecker()
    key = checker.array("key", key, "float", "B T H Dk")
    value = checker.array("value", value, "float", "B T H Dv")
    block_size = static_int("block_size", block_size, 1)
    return key, value, block_size, segments_of(checker, cu_seqlens, key.shape[0], key.shape[1])


@jaxtyped(typechecker=None)
def check_compressed_args(query, key_cmp, value_cmp, block_size, softmax_scale, cu_seqlens,
                          geometry: CompressionGeometry | None = None):
    checker = ShapeChecker()
    query = checker.array("query", query, "float", "B T HQ Dk")
    block_size = static_int("block_size", block_size, 1)
    segments = segments_of(checker, cu_seqlens, query.shape[0], query.shape[1])
    key_cmp, value_cmp = check_compressed(checker, key_cmp, value_cmp, query.shape[1], block_size, segments,
                                          geometry)
    check_groups(query, key_cmp, "key_cmp")
    scale = softmax_scale_of(softmax_scale, query.shape[3])
    return query, key_cmp, value_cmp, block_size, scale, segments


@jaxtyped(typechecker=None)
def check_select_args(query, key_cmp, lse, block_counts, block_size, softmax_scale, cu_seqlens, max_block_counts,
                      geometry: CompressionGeometry | None = None):
    checker = ShapeChecker()
    query = checker.array("query", query, "float", "B T HQ Dk")
    block_size = static_int("block_size", block_size, 1)
    segments = segments_of(checker, cu_seqlens, query.shape[0], query.shape[1])
    key_cmp, _ = check_compressed(checker, key_cmp, key_cmp, query.shape[1], block_size, segments, geometry)
    lse = checker.array("lse", lse, "float", "B T HQ")
    check_groups(query, key_cmp, "key_cmp")
    block_counts = block_counts_of(checker, block_counts)
    num_slots = computed_slot_count(block_counts, max_block_counts)
    scale = softmax_scale_of(softmax_scale, query.shape[3])
    return query, key_cmp, lse, block_counts, num_slots, block_size, scale, segments


@jaxtyped(typechecker=None)
def check_window_args(query, key, value, window_size, softmax_scale, cu_seqlens):
    checker = ShapeChecker()
    query, key, value = check_qkv(checker, query, key, value)
    window_size = static_int("window_size", window_size, 1)
    segments = segments_of(checker, cu_seqlens, query.shape[0], query.shape[1])
    return query, key, value, window_size, softmax_scale_of(softmax_scale, query.shape[3]), segments
