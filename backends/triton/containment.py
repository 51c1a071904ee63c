"""SPEC section 8, containment, inside the Triton kernels: the one in-kernel piece.

The host side (values zeroed where non-finite and their prefix count before a forward launch; keys,
values, lse and delta made safe before a backward launch) is shared by every kernel backend:
`backends/common/containment.py`, which also says why. Here a forward kernel, after its loop, asks
`nonfinite_in` whether the value rows a row saw held a non-finite entry, and sets that row to NaN.

Measured on an H200 (bf16, 64k, G=1) before this design: zeroing the values per tile in the loop
(`where(isfinite(v), v, 0)`) took the compressed forward from 2.8 to 5.9 ms, the window from 3.3
to 5.3 ms and block-major selected attention from 12.1 to 16.8 ms; loading one flag per key and
reducing it over the visible mask in the loop instead still cost the G=1 compressed forward 10.6 ms.
"""

import triton
import triton.language as tl


@triton.jit
def nonfinite_in(prefix_ptr, b, h, lo, hi, mask, N, H):
    """Per row: whether value rows `[lo, hi)` of batch row `b`, kv head `h` hold a non-finite
    entry (`prefix_ptr` is `finite_values`' count, `N` the value rows per batch row)."""
    base = prefix_ptr + b.to(tl.int64) * (N + 1) * H + h
    count_hi = tl.load(base + hi * H, mask=mask, other=0)
    count_lo = tl.load(base + lo * H, mask=mask, other=0)
    return mask & (hi > lo) & (count_hi > count_lo)
