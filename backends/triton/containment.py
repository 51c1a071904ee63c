"""SPEC section 8, containment, for the Triton kernels' online softmax.

A key tile is shared by query rows that see different keys; a masked row has `p = 0`, and
`0 * NaN` (or `0 * Inf`) is NaN, so a NaN value in a row's future or in another packed sequence
would reach it through the `p @ v` dot. So the forward kernels take the values with their
non-finite entries zeroed, and a row whose visible keys hold a non-finite value ends as NaN, as its
own arithmetic would have made it. Every forward kernel's rows see a contiguous range of value
rows (per selected block for the selected branch), so one prefix count of the non-finite rows,
read twice per row after the loop, says which rows saw one (`finite_values`, one fused
elementwise pass and a cumulative sum before the launch). Nothing is added to the inner loop.

Why not inside the loop: zeroing the values per tile (`where(isfinite(v), v, 0)`) makes the value
tile an elementwise operand, no longer streamed straight into the tensor-core dot; on an H200
(bf16, 64k, G=1) that took the compressed forward from 2.8 to 5.9 ms, the window from 3.3 to 5.3 ms
and block-major selected attention from 12.1 to 16.8 ms. Loading one flag per key and reducing it
over the visible mask in the loop instead still cost the G=1 compressed forward 10.6 ms.
Non-finite keys need nothing: a masked score is replaced by -inf before the softmax.

The backward kernels meet masked keys too, in three products: `dp = do . v` (NaN for a masked NaN
value, and `ds = p * (dp - delta)` is `0 * NaN`), `ds @ k` (a masked NaN key), and, in the dk/dv
kernels, a masked row whose own output saw the poison (`delta` NaN, so `0 * (dp - NaN)`) against a
key it cannot see. `finite_backward_operands` removes all three before the launch, again with no
work in the loops: keys and values with their non-finite entries zeroed, and for each row whose
`delta` is not finite, `delta = 0` and `lse = NaN`. The kernels write `p = where(visible,
exp2(s - lse), 0)`, so such a row's visible probabilities are NaN, as its NaN delta made its `ds`
before, and its masked ones stay 0: its own gradients (and those of the keys it sees) are still
NaN, and nothing else is.
"""

import jax
import jax.numpy as jnp
import triton
import triton.language as tl


def finite_values(value: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`value` `[B, N, H, D]` with its non-finite entries zeroed, and `[B, N + 1, H]` int32: the
    number of rows `< n` (per batch row and head) that held a NaN or Inf."""
    finite = jnp.isfinite(value)
    flags = (~jnp.all(finite, axis=-1)).astype(jnp.int32)
    prefix = jnp.pad(jnp.cumsum(flags, axis=1), ((0, 0), (1, 0), (0, 0)))
    return jnp.where(finite, value, jnp.zeros((), value.dtype)), prefix


def finite_backward_operands(key: jax.Array, value: jax.Array, lse: jax.Array, delta: jax.Array):
    """`(key, value, lse, delta)` for a backward launch: `key` and `value` with their non-finite
    entries zeroed; `lse` NaN and `delta` 0 where `delta` (a row's `rowsum(do * o)`) is not finite."""
    bad_row = ~jnp.isfinite(delta)
    finite_key, finite_value = (jnp.where(jnp.isfinite(x), x, jnp.zeros((), x.dtype)) for x in (key, value))
    return (finite_key, finite_value, jnp.where(bad_row, jnp.asarray(jnp.nan, lse.dtype), lse),
            jnp.where(bad_row, jnp.zeros((), delta.dtype), delta))


@triton.jit
def nonfinite_in(prefix_ptr, b, h, lo, hi, mask, N, H):
    """Per row: whether value rows `[lo, hi)` of batch row `b`, kv head `h` hold a non-finite
    entry (`prefix_ptr` is `finite_values`' count, `N` the value rows per batch row)."""
    base = prefix_ptr + b.to(tl.int64) * (N + 1) * H + h
    count_hi = tl.load(base + hi * H, mask=mask, other=0)
    count_lo = tl.load(base + lo * H, mask=mask, other=0)
    return mask & (hi > lo) & (count_hi > count_lo)
