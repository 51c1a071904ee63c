"""Mean pooling of keys and values into compressed blocks (SPEC section 1), as Triton kernels.

Every compressed block is described by two ints computed in `jnp` from the segments: the global
index of its first token and how many tokens it averages (`BS`, fewer for a sequence's partial
last block, 0 for the unused tail of the packed varlen axis). With that, ordinary rows and packed
sequences are the same kernel, and the backward pass is the same walk in the other direction:
each token receives its block's gradient divided by the block's count.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import triton
import triton.language as tl

from ejkernel_nsa.backends.triton import launch
from ejkernel_nsa.problem import NSAProblem, Piece, Segments, block_layout

PIECE = Piece.COMPRESSION

# Tokens summed per step: a [TOKENS, D] tile stays within ~16 fp32 registers per thread.
_TILE_ELEMENTS = 2048
_NUM_WARPS = 4


@triton.jit
def _block_program(block_start_ptr, block_count_ptr, H: tl.constexpr, D: tl.constexpr, BD: tl.constexpr,
                   TOKENS: tl.constexpr):
    """What both directions need of this program's (compressed block, batch row x head): the
    block, `b` (int64, for the addresses) and `h`, the block's first token and token count, the
    head-dim columns and which are real, and the token offsets of one loop step."""
    block = tl.program_id(0)
    batch_head = tl.program_id(1)
    b = (batch_head // H).to(tl.int64)
    h = batch_head % H

    start = tl.load(block_start_ptr + block)
    count = tl.load(block_count_ptr + block)
    dims = tl.arange(0, BD)
    dim_ok = dims < D
    offsets = tl.arange(0, TOKENS)
    return block, b, h, start, count, dims, dim_ok, offsets


@triton.jit
def _step_rows(start, step, offsets, count, b, h, T, H: tl.constexpr, D: tl.constexpr):
    """The first element of each token of loop step `step` in a [B, T, H, D] tensor (int64:
    B * T * H * D may pass 2^31), and which of those tokens belong to the block."""
    tokens = (start + step + offsets).to(tl.int64)
    token_ok = step + offsets < count
    rows = ((b * T + tokens) * H + h) * D
    return rows, token_ok


@triton.jit
def mean_pool_fwd_kernel(
    x_ptr,  # [B, T, H, D]
    block_start_ptr,  # [NB] int32: global index of each block's first token
    block_count_ptr,  # [NB] int32: tokens in the block (0 for an unused packed block)
    T,
    NB,
    out_ptr,  # [B, NB, H, D] float32
    H: tl.constexpr,
    D: tl.constexpr,
    BD: tl.constexpr,
    BS: tl.constexpr,
    TOKENS: tl.constexpr,
):
    block, b, h, start, count, dims, dim_ok, offsets = _block_program(block_start_ptr, block_count_ptr, H, D, BD,
                                                                      TOKENS)

    total = tl.zeros([BD], dtype=tl.float32)
    for step in range(0, BS, TOKENS):
        rows, token_ok = _step_rows(start, step, offsets, count, b, h, T, H, D)
        x = tl.load(x_ptr + rows[:, None] + dims[None, :], mask=token_ok[:, None] & dim_ok[None, :], other=0.0)
        total += tl.sum(x.to(tl.float32), axis=0)

    mean = total / tl.maximum(count, 1).to(tl.float32)
    out = ((b * NB + block) * H + h) * D
    tl.store(out_ptr + out + dims, mean, mask=dim_ok)


@triton.jit
def mean_pool_bwd_kernel(
    d_out_ptr,  # [B, NB, H, D] float32
    block_start_ptr,
    block_count_ptr,
    T,
    NB,
    d_x_ptr,  # [B, T, H, D] in the input's dtype
    H: tl.constexpr,
    D: tl.constexpr,
    BD: tl.constexpr,
    BS: tl.constexpr,
    TOKENS: tl.constexpr,
):
    block, b, h, start, count, dims, dim_ok, offsets = _block_program(block_start_ptr, block_count_ptr, H, D, BD,
                                                                      TOKENS)

    d_out = tl.load(d_out_ptr + ((b * NB + block) * H + h) * D + dims, mask=dim_ok, other=0.0)
    share = (d_out / tl.maximum(count, 1).to(tl.float32)).to(d_x_ptr.dtype.element_ty)
    tile = tl.zeros([TOKENS, BD], dtype=d_x_ptr.dtype.element_ty) + share[None, :]
    # Every token lies in exactly one block, so these stores cover d_x without zero-filling it.
    for step in range(0, BS, TOKENS):
        rows, token_ok = _step_rows(start, step, offsets, count, b, h, T, H, D)
        tl.store(d_x_ptr + rows[:, None] + dims[None, :], tile, mask=token_ok[:, None] & dim_ok[None, :])


def _tile(dim: int, block_size: int) -> dict[str, int]:
    """The constexprs of both kernels: padded head dim and tokens handled per step."""
    padded = launch.next_pow2(max(dim, 16))
    tokens = min(launch.next_pow2(block_size), max(1, _TILE_ELEMENTS // padded))
    return {"D": dim, "BD": padded, "BS": block_size, "TOKENS": tokens}


def _mean_pool_fwd(x, block_start, block_count, block_size: int):
    batch, num_tokens, num_heads, dim = x.shape
    num_blocks = block_start.shape[0]
    return launch.triton_call(
        x, block_start, block_count, num_tokens, num_blocks,
        kernel=mean_pool_fwd_kernel,
        out_shape=jax.ShapeDtypeStruct((batch, num_blocks, num_heads, dim), jnp.float32),
        grid=(num_blocks, batch * num_heads),
        H=num_heads, **_tile(dim, block_size), num_warps=_NUM_WARPS, num_stages=1,
    )


def _mean_pool_bwd(d_out, block_start, block_count, block_size: int, num_tokens: int, dtype):
    batch, num_blocks, num_heads, dim = d_out.shape
    return launch.triton_call(
        d_out, block_start, block_count, num_tokens, num_blocks,
        kernel=mean_pool_bwd_kernel,
        out_shape=jax.ShapeDtypeStruct((batch, num_tokens, num_heads, dim), dtype),
        grid=(num_blocks, batch * num_heads),
        H=num_heads, **_tile(dim, block_size), num_warps=_NUM_WARPS, num_stages=1,
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _pool(x, block_start, block_count, block_size: int, num_tokens: int, dtype: str):
    return _mean_pool_fwd(x, block_start, block_count, block_size)


def _pool_fwd(x, block_start, block_count, block_size, num_tokens, dtype):
    # The backward pass needs x's length and dtype (static arguments), not its values.
    return _mean_pool_fwd(x, block_start, block_count, block_size), (block_start, block_count)


def _pool_bwd(block_size, num_tokens, dtype, residuals, d_out):
    block_start, block_count = residuals
    d_x = _mean_pool_bwd(d_out, block_start, block_count, block_size, num_tokens, jnp.dtype(dtype))
    return d_x, None, None


_pool.defvjp(_pool_fwd, _pool_bwd)


def supports(problem: NSAProblem) -> str | None:
    return launch.common_decline(problem)


# ---- SPEC section 9: blocks of length l at stride d ------------------------------------------
# The forward kernel averages `count` tokens from `start`, so overlapping blocks are its launch
# with stride-d starts and counts up to l. Its backward stores each token once (disjoint blocks);
# with overlap a token belongs to l/d blocks, so the cotangents are first gathered per stride-d
# piece (a few adds over [B, T/d, H, D] in jnp) and the disjoint kernel spreads them.
COMPRESSION_GEOMETRY = True


def _piece_cotangent(d_out, count, same_sequence, span: int):
    """`[B, NB, H, D]`: for each stride-d piece p, the sum of d_out[i] / count[i] over the blocks
    i = p - k (k < span) of its sequence that cover it."""
    scaled = d_out / jnp.maximum(count, 1).astype(jnp.float32)[None, :, None, None]
    padded = jnp.pad(scaled, ((0, 0), (span - 1, 0), (0, 0), (0, 0)))
    num_blocks = d_out.shape[1]
    total = scaled
    for k in range(1, span):
        total += jnp.where(same_sequence[k][None, :, None, None], padded[:, span - 1 - k : span - 1 - k + num_blocks],
                           0.0)
    return total


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _overlapping_pool(x, start, count, piece_count, same_sequence, length: int, stride: int, num_tokens: int,
                      dtype: str):
    return _mean_pool_fwd(x, start, count, length)


def _overlapping_pool_fwd(x, start, count, piece_count, same_sequence, length, stride, num_tokens, dtype):
    return _mean_pool_fwd(x, start, count, length), (start, count, piece_count, same_sequence)


def _overlapping_pool_bwd(length, stride, num_tokens, dtype, residuals, d_out):
    start, count, piece_count, same_sequence = residuals
    per_piece = _piece_cotangent(d_out, count, same_sequence, length // stride)
    # The disjoint kernel divides by the piece's own count: hand it that count's multiple.
    d_x = _mean_pool_bwd(per_piece * piece_count.astype(jnp.float32)[None, :, None, None], start, piece_count,
                         stride, num_tokens, jnp.dtype(dtype))
    return d_x, None, None, None, None


_overlapping_pool.defvjp(_overlapping_pool_fwd, _overlapping_pool_bwd)


def _run_overlapping(key, value, length: int, stride: int, segments: Segments | None):
    num_tokens = key.shape[1]
    pieces = block_layout(num_tokens, stride, segments)
    count = jnp.clip(pieces.seq_end - pieces.start, 0, length).astype(jnp.int32)
    count = jnp.where(pieces.count > 0, count, 0)
    span = length // stride
    # Block p - k is of piece p's sequence when both end where that sequence ends and p - k >= 0.
    ends = jnp.pad(pieces.seq_end, (span - 1, 0), constant_values=-1)
    num_blocks = pieces.start.shape[0]
    same_sequence = jnp.stack([ends[span - 1 - k : span - 1 - k + num_blocks] == pieces.seq_end
                               for k in range(span)])
    return tuple(_overlapping_pool(x, pieces.start, count, pieces.count, same_sequence, length, stride,
                                   num_tokens, jnp.dtype(x.dtype).name) for x in (key, value))


def run(key, value, *, block_size: int, segments: Segments | None, compress_block_size: int | None = None,
        compress_stride: int | None = None):
    length = compress_block_size or block_size
    stride = compress_stride or length
    if (length, stride) != (block_size, block_size):
        if length == stride:
            block_size = length  # disjoint blocks of their own length: the kernels as they are
        else:
            return _run_overlapping(key, value, length, stride, segments)
    blocks = block_layout(key.shape[1], block_size, segments)
    block_start, block_count = blocks.start, blocks.count
    k_cmp = _pool(key, block_start, block_count, block_size, key.shape[1], jnp.dtype(key.dtype).name)
    v_cmp = _pool(value, block_start, block_count, block_size, value.shape[1], jnp.dtype(value.dtype).name)
    return k_cmp, v_cmp


def compile_specs() -> list[launch.CompileSpec]:
    specs = []
    ints = {"block_start_ptr": "*i32", "block_count_ptr": "*i32", "T": "i32", "NB": "i32"}
    for dtype, dim, block_size in [("float32", 64, 16), ("bfloat16", 128, 64), ("float16", 192, 128),
                                   ("bfloat16", 256, 64), ("float32", 40, 128)]:
        constexprs = {"H": 4, **_tile(dim, block_size)}
        fwd = {"x_ptr": launch.pointer(dtype), **ints, "out_ptr": "*fp32"}
        bwd = {"d_out_ptr": "*fp32", **ints, "d_x_ptr": launch.pointer(dtype)}
        for name, kernel, signature in [("fwd", mean_pool_fwd_kernel, fwd), ("bwd", mean_pool_bwd_kernel, bwd)]:
            specs.append(launch.CompileSpec(f"{name}_{dtype}_d{dim}_bs{block_size}", kernel, signature, constexprs,
                                            num_warps=_NUM_WARPS, num_stages=1))
    # SPEC 9, the paper's l=32 at d=16: the forward runs with BS=l, the backward with BS=d.
    for name, kernel, signature, block_size in [
            ("fwd", mean_pool_fwd_kernel, {"x_ptr": "*bf16", **ints, "out_ptr": "*fp32"}, 32),
            ("bwd", mean_pool_bwd_kernel, {"d_out_ptr": "*fp32", **ints, "d_x_ptr": "*bf16"}, 16)]:
        specs.append(launch.CompileSpec(f"{name}_bfloat16_d128_bs{block_size}_overlap", kernel, signature,
                                        {"H": 4, **_tile(128, block_size)}, num_warps=_NUM_WARPS, num_stages=1))
    return specs
