"""SPEC section 8, containment, inside the Triton kernels' online softmax.

A key tile is shared by query rows that see different keys; a masked row has `p = 0`, and
`0 * NaN` (or `0 * Inf`) is NaN, so a NaN value in a row's future or in another packed sequence
would reach it through the `p @ v` dot. `contained_values` zeroes the tile's non-finite values for
the dot and says which rows do see one; those rows are set to NaN, as their own arithmetic
would have made them.
"""

import triton
import triton.language as tl


@triton.jit
def contained_values(v, visible):
    """`v` `[keys, Dv]` with non-finite entries zeroed, and `[rows]` whether the row's `visible`
    `[rows, keys]` keys hold one. `x * 0 == 0` exactly when `x` is finite."""
    finite = (v * 0.0) == 0.0
    bad_key = tl.max(tl.where(finite, 0.0, 1.0), axis=1)
    seen = tl.max(tl.where(visible, bad_key[None, :], 0.0), axis=1)
    return tl.where(finite, v, 0.0).to(v.dtype), seen > 0.0
