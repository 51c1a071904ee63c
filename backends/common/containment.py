"""SPEC section 8, containment, on the host side: what every kernel backend runs in XLA around its
launches so that a NaN or Inf in a key or value reaches only the queries that see it.

A kernel tile is shared by query rows that see different keys; a masked row has `p = 0`, and
`0 * NaN` (or `0 * Inf`) is NaN, so a NaN value in a row's future or in another packed sequence
would reach it through the `p @ v` product. The fix costs the kernels nothing in their loops:

- forward: the launch gets the values with their non-finite entries zeroed, and a prefix count of
  the rows that held one (`finite_values`, one fused elementwise pass and a cumulative sum). Each
  row of every forward kernel sees a contiguous range of value rows (per selected block for the
  selected branch), so after its loop a row reads the count twice and sets its output to NaN when
  the range held a non-finite row: what its own arithmetic would have made it. How a kernel reads
  the count is its lowering's business (Triton: `backends/triton/containment.py`; Pallas Triton:
  `backends/pallas_triton/common.py`; Mosaic GPU, whose kernels load TMA boxes rather than
  gathers, takes the per-row flag from `seen_nonfinite` in XLA).
- backward (`finite_backward_operands`): masked keys meet three products, `dp = do . v` (a masked
  NaN value, then `ds = p * (dp - delta)` is `0 * NaN`), `ds @ k` (a masked NaN key) and, in the
  dk/dv kernels, a masked row whose own output saw the poison (`delta` NaN) against a key it cannot
  see. So keys and values come zeroed where non-finite, and a row whose `delta` is not finite gets
  `delta = 0` and `lse = NaN`. The kernels compute `p = where(visible, exp2(s - lse), 0)`, so such a
  row's visible probabilities are NaN and its masked ones 0: its own gradients, and those of the
  keys and values it sees, are NaN (its result is undefined, so is its gradient), nothing else is.

Non-finite keys need nothing in the forward: a masked score is replaced by -inf before the softmax.
Why not in the loop: zeroing each value tile (`where(isfinite(v), v, 0)`) makes it an elementwise
operand instead of a tile streamed into the tensor-core dot; on an H200 that slowed the Triton
kernels 1.5-2x (backends/triton/containment.py has the numbers).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def finite_or_zero(x: jax.Array) -> jax.Array:
    return jnp.where(jnp.isfinite(x), x, jnp.zeros((), x.dtype))


def nonfinite_prefix(*arrays: jax.Array) -> jax.Array:
    """`[B, N + 1, H]` int32 for `[B, N, H, D*]` arrays: how many rows `< n` (per batch row and head)
    hold a NaN or Inf in any of them."""
    bad = jnp.zeros(arrays[0].shape[:3], bool)
    for x in arrays:
        bad |= ~jnp.all(jnp.isfinite(x), axis=-1)
    return jnp.pad(jnp.cumsum(bad.astype(jnp.int32), axis=1), ((0, 0), (1, 0), (0, 0)))


def finite_values(value: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`value` `[B, N, H, D]` with its non-finite entries zeroed, and its `nonfinite_prefix`."""
    return finite_or_zero(value), nonfinite_prefix(value)


def seen_nonfinite(prefix: jax.Array, lo: jax.Array, hi: jax.Array) -> jax.Array:
    """Whether rows `[lo, hi)` held a non-finite entry, from a `nonfinite_prefix` `[B, N + 1, H]`;
    `lo`, `hi` are int `[B, ..., H]` (any axes between batch and head), empty where `hi <= lo`."""
    batch, heads = prefix.shape[0], prefix.shape[2]
    flat = prefix.transpose(0, 2, 1)  # [B, H, N + 1]
    middle = lo.shape[1:-1]

    def count(at):
        at = jnp.clip(at, 0, prefix.shape[1] - 1).reshape(batch, -1, heads).transpose(0, 2, 1)
        return jnp.take_along_axis(flat, at, axis=2).transpose(0, 2, 1).reshape((batch,) + middle + (heads,))

    return (hi > lo) & (count(hi) > count(lo))


def finite_backward_rows(lse: jax.Array, delta: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`lse` NaN and `delta` 0 where `delta` (a row's `rowsum(do * o)`) is not finite."""
    bad_row = ~jnp.isfinite(delta)
    return (jnp.where(bad_row, jnp.asarray(jnp.nan, lse.dtype), lse),
            jnp.where(bad_row, jnp.zeros((), delta.dtype), delta))


def finite_backward_operands(key: jax.Array, value: jax.Array, lse: jax.Array, delta: jax.Array):
    """`(key, value, lse, delta)` for a backward launch: `key` and `value` with their non-finite
    entries zeroed, and `finite_backward_rows(lse, delta)`."""
    return (finite_or_zero(key), finite_or_zero(value)) + finite_backward_rows(lse, delta)
