"""SPEC section 8, containment, for the Triton kernels' online softmax.

A key tile is shared by query rows that see different keys; a masked row has `p = 0`, and
`0 * NaN` (or `0 * Inf`) is NaN, so a NaN value in a row's future or in another packed sequence
would reach it through the `p @ v` dot. So the forward kernels take the values with their
non-finite entries zeroed and one flag per value row (`finite_values`, one fused elementwise pass
before the launch), and a row whose visible keys hold a flagged one ends as NaN, as its own
arithmetic would have made it (`nonfinite_seen`).

Why not inside the kernel: zeroing the values per tile (`where(isfinite(v), v, 0)`) makes the value
tile an elementwise operand, so it no longer streams straight into the tensor-core dot; on an
H200 that cost the compressed and window forwards about 2x and the block-major selected forward
about 1.4x. Non-finite keys need nothing: a masked score is replaced by -inf before the softmax.
"""

import jax
import jax.numpy as jnp
import triton
import triton.language as tl


def finite_values(value: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`value` `[..., D]` with its non-finite entries zeroed, and `[...]` float32 flags: 1 where
    the row held a NaN or Inf."""
    finite = jnp.isfinite(value)
    flags = (~jnp.all(finite, axis=-1)).astype(jnp.float32)
    return jnp.where(finite, value, jnp.zeros((), value.dtype)), flags


@triton.jit
def nonfinite_seen(seen, flags, visible):
    """`seen` `[rows]` (float, > 0 once a row saw a flagged value) updated with this tile: `flags`
    `[keys]` of its value rows, `visible` `[rows, keys]`."""
    return tl.maximum(seen, tl.max(tl.where(visible, flags[None, :], 0.0), axis=1))
