"""Checks on integer inputs and sizes that the shape checks of `validation` cannot express.

Every backend computes indices in int32. An int64 input (NumPy, or JAX with x64) whose values do
not fit would wrap in the conversion: a far-future block `2**32 + 1` would become block 1 and be
attended, a decreasing `cu_seqlens` could wrap into a valid one. So concrete values are checked
before any conversion, and traced ones are saturated (clamped to the int32 range) instead of
wrapped: a clamped block index or count keeps its meaning (still in the future, still negative =
empty, still more than every slot), so no traced value can become a different valid one.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

INT32_MIN, INT32_MAX = int(np.iinfo(np.int32).min), int(np.iinfo(np.int32).max)


def is_concrete(value) -> bool:
    return not isinstance(value, jax.core.Tracer)


def checked_int32_values(name: str, value):
    """`value` unchanged (a list becomes a NumPy array), after checking that its concrete integer
    values fit int32; raises a ValueError naming `name` otherwise. Traced values pass through."""
    if isinstance(value, (list, tuple)):
        try:
            value = np.asarray(value)
        except (ValueError, OverflowError) as error:
            raise ValueError(f"{name}: expected a rectangular array of integers, got {error}") from None
    dtype = getattr(value, "dtype", None)
    if dtype is None or not is_concrete(value) or not np.issubdtype(dtype, np.integer):
        return value
    if np.iinfo(dtype).min >= INT32_MIN and np.iinfo(dtype).max <= INT32_MAX:
        return value  # int8/16/32, uint8/16: nothing to check
    values = np.asarray(value)
    if values.size and (values.min() < INT32_MIN or values.max() > INT32_MAX):
        worst = values.max() if values.max() > INT32_MAX else values.min()
        raise ValueError(
            f"{name}: values must fit int32 (the backends index in int32), got {worst} ({dtype})"
        )
    return value


def saturated_int32(x: jax.Array) -> jax.Array:
    """`x` as int32, clamping (never wrapping) values outside the int32 range; only traced int64
    values can still be outside it here, concrete ones were rejected by `checked_int32_values`."""
    if jnp.iinfo(x.dtype).min < INT32_MIN or jnp.iinfo(x.dtype).max > INT32_MAX:
        x = jnp.clip(x, INT32_MIN, INT32_MAX)
    return x.astype(jnp.int32)


def check_token_indices(token_indices, cu_seqlens) -> None:
    """When both are concrete, `token_indices[t]` must be (sequence id, position in it) of token
    `t` as `cu_seqlens` places it: the backends read one or the other, so a disagreement would
    give a result that depends on the backend."""
    if not (is_concrete(token_indices) and is_concrete(cu_seqlens)):
        return
    offsets = np.asarray(cu_seqlens, np.int64)
    given = np.asarray(token_indices, np.int64)
    tokens = np.arange(given.shape[0])
    seq = np.searchsorted(offsets[1:], tokens, side="right")
    expected = np.stack([seq, tokens - offsets[seq]], axis=1)
    wrong = np.flatnonzero(np.any(given != expected, axis=1))
    if wrong.size:
        t = int(wrong[0])
        raise ValueError(
            f"token_indices: disagrees with cu_seqlens at token {t}: got (sequence, position) "
            f"{tuple(given[t].tolist())}, cu_seqlens={offsets.tolist()} places it at {tuple(expected[t].tolist())}"
        )


def check_nonempty_dims(query, key, value) -> None:
    """Heads and head dims must be at least 1 (the group size and the default softmax scale
    divide by them); zero tokens or a zero batch are allowed and give an empty output."""
    for name, x, dims in (("query", query, ((2, "HQ"), (3, "Dk"))), ("key", key, ((2, "H"), (3, "Dk"))),
                          ("value", value, ((3, "Dv"),))):
        for axis, dim in dims:
            if x.shape[axis] < 1:
                raise ValueError(f"{name}: expected {dim} >= 1, got shape {x.shape}")


def is_empty_call(query) -> bool:
    """No token to compute: the output is `[B, T, HQ, Dv]` with `B * T == 0`."""
    return query.shape[0] * query.shape[1] == 0
