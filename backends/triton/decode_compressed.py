"""A decoding step's compressed branch (SPEC sections 2, 9 and 10) in Triton: one query per row.

The row's one query sits at position `L - 1` and sees the compressed blocks complete there
(`i * d + l <= L`: with the default geometry `l = d = BS`, the first `L // BS`); the split-K
kernel of `decode_span` attends the group's `G` heads over them and the splits are merged by
their log-sum-exps. Returns what the piece returns everywhere, `(out, lse)`: the selection (on
XLA for decoding steps) scores the blocks by `exp(q . k_cmp * scale - lse)` summed over the group,
so the lse is all it needs. The blocks are read as they are stored (the cache's are float32) and
rounded to the query's dtype in the kernel; blocks past the row's last complete one are never read.
"""

from __future__ import annotations

from ejkernel_nsa.backends.triton import decode_span
from ejkernel_nsa.problem import NSAProblem, Piece

PIECE = Piece.COMPRESSED_ATTENTION
# SPEC section 10 (decoding steps are all it takes) and section 9's geometry (blocks of length l
# at stride d; visibility is all that changes).
LONGER_KEYS = True
COMPRESSION_GEOMETRY = True


def supports(problem: NSAProblem) -> str | None:
    return decode_span.decline(problem)


def run(query, k_cmp, v_cmp, *, block_size: int, scale: float, segments, compress_block_size: int | None = None,
        compress_stride: int | None = None, kv_lengths):
    length = compress_block_size or block_size
    return decode_span.attend(query, k_cmp, v_cmp, kv_lengths, scale=scale, block_length=length,
                              stride=compress_stride or length)


def compile_specs():
    # (dtype, blocks' dtype, Dk, Dv, G, splits): issue 14's serving shape (128k at batch 1: 64
    # splits), float32, one head at batch 64, odd head dims, supplied 16-bit blocks, and the
    # paper's geometry with a wide head.
    cases = [("bfloat16", "float32", 128, 128, 16, 64), ("float32", "float32", 64, 64, 4, 8),
             ("bfloat16", "float32", 128, 128, 1, 1), ("float16", "float16", 40, 24, 3, 4),
             ("bfloat16", "bfloat16", 64, 64, 8, 16), ("bfloat16", "float32", 256, 256, 64, 2)]
    return (decode_span.compile_specs(cases[:-1], "decode_compressed_fwd", block_length=64, stride=64)
            + decode_span.compile_specs(cases[-1:], "decode_compressed_fwd", block_length=32, stride=16))
