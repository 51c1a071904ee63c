"""A decoding step's sliding window (SPEC sections 5 and 10) in Triton: one query per row.

The row's one query at position `L - 1` attends to the keys `[max(0, L - W), L)`, sliced from the
cache by the loads' own mask (nothing copied, nothing past the row's length read); the split-K
kernel of `decode_span` spreads the `W` keys over programs and merges them by log-sum-exp.
"""

from __future__ import annotations

from ejkernel_nsa.backends.triton import decode_span
from ejkernel_nsa.problem import NSAProblem, Piece

PIECE = Piece.SLIDING_WINDOW
# SPEC section 10: decoding steps are all it takes.
LONGER_KEYS = True


def supports(problem: NSAProblem) -> str | None:
    return decode_span.decline(problem)


def run(query, key, value, *, window_size: int, scale: float, segments, kv_lengths):
    out, _ = decode_span.attend(query, key, value, kv_lengths, scale=scale, window=window_size)
    return out


def compile_specs():
    # (dtype, keys' dtype, Dk, Dv, G, splits): issue 14's serving shape (W=512, batch 1: 8 splits),
    # float32, batch 64 (one split), odd head dims, a wide head.
    cases = [("bfloat16", "bfloat16", 128, 128, 16, 8), ("float32", "float32", 64, 64, 4, 4),
             ("bfloat16", "bfloat16", 128, 128, 16, 1), ("float16", "float16", 40, 24, 3, 2),
             ("bfloat16", "bfloat16", 256, 256, 64, 4)]
    return decode_span.compile_specs(cases, "decode_window_fwd", window=512)
