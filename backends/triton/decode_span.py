"""A decoding step's attention over one contiguous span of key rows, split-K ("flash decoding").

The compressed branch (SPEC sections 2 and 9: the compressed blocks visible at the row's
position) and the sliding window (section 5: the row's last `W` keys) of a decoding step are both
softmax attention of the `G` query heads of one kv head over a contiguous run of rows of a
`[B, N, H, D]` tensor, `[lo, hi)`, that depends only on the row's length. So one kernel serves
both (`decode_compressed`, `decode_window` register it for their pieces): one program per (row,
kv head, split), the `G` heads as the rows of its tiles, so each key tile is loaded once for the
whole group; the span is cut into `SPLITS` equal runs of whole tiles, computed in the kernel from
the row's length, so every program has work whatever the length (the grid is static, the length
is not). Each program writes a normalized partial output and its log-sum-exp; `merge_splits`
combines them in XLA (a `[B, H, SPLITS, G, Dv]` float32 tensor, small).

Containment (SPEC 8, section 10): every row of a tile belongs to the same query, so the span is
the mask of the loads themselves; a key row outside it (past the row's length, before the window,
a compressed block not yet complete) is never read, and nothing is added to the inner loop.

Forward only: differentiating raises (the XLA backend differentiates decoding calls).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import triton
import triton.language as tl

from ejkernel_nsa.backends.common import host
from ejkernel_nsa.backends.triton import launch
from ejkernel_nsa.backends.triton.launch import CompileSpec, cdiv, next_pow2, pointer
from ejkernel_nsa.problem import NSAProblem

LOG2E = tl.constexpr(host.LOG2E)
LN2 = tl.constexpr(host.LN2)

# The G query heads of a group are one tile's rows (padded to a power of two of at least 16).
MAX_GROUP = 64
# Programs a launch aims at (an H200 has 132 SMs): the span is split until (rows x kv heads x
# splits) reaches this, so a batch-1 step still spreads over the GPU; large batches need no split.
TARGET_PROGRAMS = 256


def decline_unless_decoding_step(problem: NSAProblem, full_length: str) -> str | None:
    """What every decoding kernel (this one and `decode.py`'s) declines: anything but a decoding
    step, which the kernel named `full_length` runs, and what no Triton kernel does."""
    if not problem.against_longer_keys:
        return f"decoding steps only (SPEC section 10 with one query per row); {full_length} runs the rest"
    if (problem.query_len or problem.seq_len) != 1:
        return f"one query per row (a decoding step), got TQ={problem.query_len}; chunked prefill runs on XLA"
    return launch.common_decline(problem)


def decline(problem: NSAProblem) -> str | None:
    """What both pieces of this kernel decline: anything but a decoding step, and tiles it lacks."""
    reason = decline_unless_decoding_step(problem, "the full-length kernel")
    if reason is not None:
        return reason
    if problem.group_size > MAX_GROUP:
        return f"at most {MAX_GROUP} query heads per kv head (one tile of rows), got G={problem.group_size}"
    return None


@triton.jit
def decode_span_fwd_kernel(
    q_ptr, k_ptr, v_ptr, lengths_ptr,
    N,
    o_part_ptr, lse_part_ptr,
    H: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, SPLITS: tl.constexpr, KT: tl.constexpr,
    DK: tl.constexpr, DKP: tl.constexpr, DV: tl.constexpr, DVP: tl.constexpr, SCALE: tl.constexpr,
    PRECISION: tl.constexpr, F32_DOTS: tl.constexpr, WINDOW: tl.constexpr, CL: tl.constexpr, CD: tl.constexpr,
):
    """Program (b * H + h, split): the G heads' attention over the split's part of the row's span
    of `N` key rows: with `WINDOW > 0` the keys `[L - WINDOW, L)`, else the compressed blocks of
    length `CL` at stride `CD` complete at position `L - 1` (`i * CD + CL <= L`)."""
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    length = tl.load(lengths_ptr + b)
    if WINDOW > 0:
        hi = length
        lo = tl.maximum(length - WINDOW, 0)
    else:
        lo = 0
        # Integer division truncates toward zero: rows shorter than one block are cut off first.
        hi = tl.where(length >= CL, (length - CL) // CD + 1, 0)
    hi = tl.minimum(hi, N)
    per_split = tl.cdiv(tl.cdiv(hi - lo, KT), SPLITS) * KT
    start = lo + split * per_split
    end = tl.minimum(hi, start + per_split)

    heads = tl.arange(0, GP)
    dk = tl.arange(0, DKP)
    dv = tl.arange(0, DVP)
    head_ok = heads < G
    q = tl.load(q_ptr + ((b * H + h) * G + heads)[:, None] * DK + dk[None, :],
                mask=head_ok[:, None] & (dk < DK)[None, :], other=0.0)
    if F32_DOTS:
        q = q.to(tl.float32)
    rows = tl.arange(0, KT)
    # Scalar 64-bit pointers to the split's first row, advanced a tile at a time.
    k_tile = k_ptr + ((b * N + start) * H + h) * DK
    v_tile = v_ptr + ((b * N + start) * H + h) * DV

    m_i = tl.full([GP], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([GP], dtype=tl.float32)
    acc = tl.zeros([GP, DVP], dtype=tl.float32)
    for r0 in range(start, end, KT):
        row_ok = r0 + rows < end
        # Both operands in the dots' dtype (`dot_dtype`): the cache's float32 compressed blocks
        # stay float32, read as stored, with no conversion pass over the cache before the launch.
        k = tl.load(k_tile + rows[:, None] * (H * DK) + dk[None, :], mask=row_ok[:, None] & (dk < DK)[None, :],
                    other=0.0).to(q.dtype)
        v = tl.load(v_tile + rows[:, None] * (H * DV) + dv[None, :], mask=row_ok[:, None] & (dv < DV)[None, :],
                    other=0.0).to(q.dtype)
        k_tile += KT * H * DK
        v_tile += KT * H * DV
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * (SCALE * LOG2E)
        s = tl.where(row_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # Rows padding the group see nothing only if the span is empty; shift by 0 then.
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - shift[:, None])
        alpha = tl.exp2(m_i - shift)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v, input_precision=PRECISION)
        m_i = m_new

    seen = l_i > 0.0
    safe_l = tl.where(seen, l_i, 1.0)
    part = ((b * H + h) * SPLITS + split) * G + heads
    tl.store(o_part_ptr + part[:, None] * DV + dv[None, :], acc / safe_l[:, None],
             mask=head_ok[:, None] & (dv < DV)[None, :])
    tl.store(lse_part_ptr + part, tl.where(seen, (m_i + tl.log2(safe_l)) * LN2, float("-inf")), mask=head_ok)


def merge_splits(o_part, lse_part):
    """`(out, lse)` `[..., G, Dv]`, `[..., G]` from partials `[..., P, G, Dv]`, `[..., P, G]`
    (axis -3 / -2), each normalized over its own keys with its natural-log lse: -inf for a part
    that saw none, which weighs nothing (a row that saw nothing at all gets 0 and -inf). A NaN part
    (a row whose own keys held one) stays NaN: only -inf parts are dropped."""
    finite = jnp.isfinite(lse_part)
    peak = jnp.max(jnp.where(finite, lse_part, -jnp.inf), axis=-2, keepdims=True)
    peak = jnp.where(jnp.isfinite(peak), peak, 0.0)
    weights = jnp.where(lse_part == -jnp.inf, 0.0, jnp.exp(lse_part - peak))
    total = jnp.sum(weights, axis=-2, keepdims=True)
    out = jnp.sum((weights / jnp.where(total == 0, 1.0, total))[..., None] * o_part, axis=-3)
    lse = jnp.where(total == 0, -jnp.inf, peak + jnp.log(total))[..., 0, :]
    return out, lse


def dot_dtype(query_dtype, rows_dtype):
    """The dots' operand dtype: float32 when either side is (the cache's compressed blocks are:
    the selection then normalizes its float32 scores by an lse of float32 scores, as on XLA; a
    decoding step is bound by its loads, so three tf32 passes cost nothing that shows), else the
    16-bit dtype."""
    query_dtype, rows_dtype = jnp.dtype(query_dtype), jnp.dtype(rows_dtype)
    return query_dtype if query_dtype == rows_dtype and query_dtype.itemsize == 2 else jnp.dtype(jnp.float32)


def key_tile(head_dim: int, value_dim: int, dots) -> int:
    """Key rows per step: 64 for 16-bit dots up to 128 wide; float32 operands (split in two for
    tf32x3) and 256-wide heads halve it, for the registers (ptxas -v on sm_90; see `num_warps`)."""
    tile = 64 if max(next_pow2(head_dim), next_pow2(value_dim)) <= 128 else 32
    return tile if jnp.dtype(dots).itemsize == 2 else tile // 2


def num_splits(batch: int, num_kv_heads: int, max_rows: int, tile: int) -> int:
    """Splits of a span of at most `max_rows` rows: enough for `TARGET_PROGRAMS` programs, at
    most one tile each."""
    return max(1, min(cdiv(TARGET_PROGRAMS, batch * num_kv_heads), cdiv(max_rows, tile)))


def constexprs(num_kv_heads, group, splits, head_dim, value_dim, dots, scale, *, window=0, block_length=1,
               stride=1) -> dict:
    return dict(H=num_kv_heads, G=group, GP=max(16, next_pow2(group)), SPLITS=splits,
                KT=key_tile(head_dim, value_dim, dots), DK=head_dim, DKP=host.padded_dim(head_dim), DV=value_dim,
                DVP=host.padded_dim(value_dim), SCALE=float(scale), PRECISION=launch.dot_precision(dots),
                F32_DOTS=jnp.dtype(dots) == jnp.float32, WINDOW=window, CL=block_length, CD=stride)


def num_warps(group: int, head_dim: int, value_dim: int, dots) -> int:
    """Warps per program. Float32 dots split every operand for three tf32 passes: with 4 warps
    64-wide tiles spilled a few bytes on sm_90 (ptxas -v), 8 compile without up to 64 heads x 128
    wide or 16 heads x 256. Past that (32 or more heads x 256 wide) they spill about a kilobyte,
    as the full-length kernels' widest float32 tiles do; 16 warps spilled more (128 registers)."""
    width = max(host.padded_dim(head_dim), host.padded_dim(value_dim))
    return 4 if width <= 64 and jnp.dtype(dots).itemsize == 2 else 8


def attend(query, key, value, kv_lengths, *, scale: float, window: int = 0, block_length: int = 1,
           stride: int = 1):
    """`(out, lse)`: `out` `[B, 1, HQ, Dv]` in the query's dtype, `lse` `[B, 1, HQ]` float32, of
    each row's one query over its span of `key` / `value` rows `[B, N, H, D]` (the window of
    `window` keys, or with `window=0` the compressed blocks of length `block_length` at `stride`)."""
    batch, _, num_q_heads, head_dim = query.shape
    num_rows, num_kv_heads, value_dim = key.shape[1], key.shape[2], value.shape[3]
    span = min(window, num_rows) if window else num_rows
    dots = dot_dtype(query.dtype, jnp.promote_types(key.dtype, value.dtype))
    splits = num_splits(batch, num_kv_heads, span, key_tile(head_dim, value_dim, dots))
    meta = constexprs(num_kv_heads, num_q_heads // num_kv_heads, splits, head_dim, value_dim, dots, scale,
                      window=window, block_length=block_length, stride=stride)
    return _attend(query, key, value, kv_lengths.astype(jnp.int32), tuple(sorted(meta.items())))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attend(query, key, value, kv_lengths, meta):
    meta = dict(meta)
    batch, _, num_q_heads, _ = query.shape
    H, G, P, DV = meta["H"], meta["G"], meta["SPLITS"], meta["DV"]
    o_part, lse_part = launch.triton_call(
        query, key, value, kv_lengths, key.shape[1],
        kernel=decode_span_fwd_kernel,
        out_shape=[jax.ShapeDtypeStruct((batch, H, P, G, DV), jnp.float32),
                   jax.ShapeDtypeStruct((batch, H, P, G), jnp.float32)],
        grid=(batch * H, P), num_warps=num_warps(G, meta["DK"], DV, jnp.float32 if meta["F32_DOTS"] else query.dtype),
        num_stages=2, **meta,
    )
    out, lse = merge_splits(o_part, lse_part)
    return (out.reshape(batch, 1, num_q_heads, DV).astype(query.dtype),
            lse.reshape(batch, 1, num_q_heads))


def _attend_fwd(query, key, value, kv_lengths, meta):
    return _attend(query, key, value, kv_lengths, meta), None


def _attend_bwd(meta, residuals, d_out):
    raise NotImplementedError(
        "the Triton decoding kernels (backends/triton/decode_span.py) have no backward: differentiate decoding "
        "calls with backend='xla'"
    )


_attend.defvjp(_attend_fwd, _attend_bwd)


def compile_specs(cases, name: str, **span) -> list[CompileSpec]:
    """The instances of `cases` (dtype, dtype of the span's rows, Dk, Dv, G, splits) for one piece."""
    specs = []
    for dtype, rows_dtype, head_dim, value_dim, group, splits in cases:
        q, rows, f32 = pointer(dtype), pointer(rows_dtype), "*fp32"
        signature = dict(q_ptr=q, k_ptr=rows, v_ptr=rows, lengths_ptr="*i32", N="i32", o_part_ptr=f32,
                         lse_part_ptr=f32)
        dots = dot_dtype(dtype, rows_dtype)
        specs.append(CompileSpec(
            f"{name}-{dtype}-{rows_dtype}-d{head_dim}x{value_dim}-g{group}-p{splits}", decode_span_fwd_kernel,
            signature, constexprs(4, group, splits, head_dim, value_dim, dots, head_dim**-0.5, **span),
            num_warps=num_warps(group, head_dim, value_dim, dots), num_stages=2,
        ))
    return specs
