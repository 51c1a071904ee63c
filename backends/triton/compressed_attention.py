"""Compressed attention (SPEC section 2) as Triton kernels: forward, and a two-kernel backward.

Queries attend to the mean-pooled blocks `k_cmp`, `v_cmp` (`BS` times fewer rows than the keys;
float32 out of `mean_pool`, cast to the query's dtype inside the custom VJP). A query tile packs `BT`
consecutive tokens times the query heads of one kv head (the group padded to a power of two, `HP`
heads), so each compressed-key tile it loads serves the whole group, and small groups still fill
the 16-row minimum of a tensor-core dot. The tile walks the union of its rows' visible block
ranges `[first_block, first_block + (pos + 1) // BS)`; the per-row mask does the rest, which also
keeps rows of different packed sequences apart.

Dots take their operands in the problem's dtype. For bf16/fp16 problems: 16-bit q, k, v and do
straight from memory, with the probabilities `p` and `ds` rounded to 16 bits right before the dots
they feed (p @ v, ds @ k, p^T @ do, ds^T @ q), as FlashAttention does; the products accumulate in
float32, and softmax, lse, delta and the dk/dv partial sums stay float32. 16-bit tensor cores run
at twice the tf32 rate, and 16-bit blocks halve the loads and the shared memory of each stage.
Float32 problems keep float32 operands and three tf32 passes (`tf32x3`).

Backward: `dq` re-walks the forward's block range per query tile; `dk_cmp, dv_cmp` are owned by
one program per block tile, which walks the query tokens that can see those blocks (from the
block's last token to the end of its sequence). When the block tiles alone are too few programs
for the GPU (short or few sequences), the tokens are also split across programs, each writing
its own partial sums, added afterwards: no atomics, deterministic. `lse` is an output of the
piece, so its cotangent enters through `delta = rowsum(do * o) - dlse`.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import triton
import triton.language as tl

from ejkernel_nsa import sparsity
from ejkernel_nsa.backends.common import host
from ejkernel_nsa.backends.common.vjp import attention_vjp
from ejkernel_nsa.backends.common.containment import finite_backward_operands, finite_values
from ejkernel_nsa.backends.triton.containment import nonfinite_in
from ejkernel_nsa.backends.triton import launch
from ejkernel_nsa.problem import NSAProblem, Piece, Segments, token_layout

PIECE = Piece.COMPRESSED_ATTENTION

LOG2E = tl.constexpr(host.LOG2E)
LN2 = tl.constexpr(host.LN2)


def supports(problem: NSAProblem) -> str | None:
    return launch.common_decline(problem)


# ------------------------------------------------------------------------------------------------
# Kernels
# ------------------------------------------------------------------------------------------------


@triton.jit
def _query_tile(
    pos_ptr, first_block_ptr, t0, head0, T,
    G: tl.constexpr, BS: tl.constexpr, CL: tl.constexpr, HP: tl.constexpr, BT: tl.constexpr,
):
    """Rows `BT` tokens from `t0` x heads `[head0, head0 + HP)` of one group. Returns per row: its
    token and head offsets within the tile, whether it is real, and its visible packed blocks
    `[lo, hi)` (empty for padding rows and for tokens that see no complete block)."""
    rows = tl.arange(0, BT * HP)
    dt = rows // HP
    dh = rows % HP
    tok = t0 + dt
    tok_ok = tok < T
    row_ok = tok_ok & (head0 + dh < G)
    pos = tl.load(pos_ptr + tok, mask=tok_ok, other=0)
    lo = tl.load(first_block_ptr + tok, mask=tok_ok, other=0)
    # Blocks of CL tokens at stride BS (SPEC 9): block i is complete once i * BS + CL <= pos + 1.
    if CL == BS:
        complete = (pos + 1) // BS
    else:
        # Integer division truncates toward zero here: the early tokens are cut off explicitly.
        complete = tl.where(pos + 1 >= CL, (pos + 1 - CL) // BS + 1, 0)
    hi = tl.where(row_ok, lo + complete, lo)
    return dt, dh, row_ok, lo, hi


@triton.jit
def _row_base(ptr, b, t0, h, head0, T, HQ: tl.constexpr, G: tl.constexpr, D: tl.constexpr):
    """Scalar 64-bit address of row (token t0, query head h * G + head0) of a [B, T, HQ, D] (or,
    with D = 1, [B, T, HQ]) tensor; offsets within a tile then stay small int32."""
    return ptr + ((b.to(tl.int64) * T + t0) * HQ + h * G + head0) * D


@triton.jit
def _query_program(H: tl.constexpr, G: tl.constexpr, HP: tl.constexpr, BT: tl.constexpr):
    """The query tile of this program of the forward or dq grid (tokens on axis 0, batch row x
    kv head x head chunk on axis 1): its first token `t0` and head `head0`, batch row, kv head."""
    HEAD_CHUNKS: tl.constexpr = (G + HP - 1) // HP
    t0 = tl.program_id(0) * BT
    pid = tl.program_id(1)
    head0 = (pid % HEAD_CHUNKS) * HP
    bh = pid // HEAD_CHUNKS
    b = bh // H
    h = bh % H
    return t0, head0, b, h


@triton.jit
def _tile_blocks(lo, hi, NB):
    """Which rows see a block, and the tile's block range: the union of those rows' `[lo, hi)`."""
    seen = hi > lo
    c_lo = tl.min(tl.where(seen, lo, NB), axis=0)
    c_hi = tl.max(tl.where(seen, hi, 0), axis=0)
    return seen, c_lo, c_hi


@triton.jit
def _head_columns(DK: tl.constexpr, DV: tl.constexpr, DKP: tl.constexpr, DVP: tl.constexpr):
    """The key and value head-dim columns (padded to powers of two >= 16) and which are real."""
    dk = tl.arange(0, DKP)
    dv = tl.arange(0, DVP)
    return dk, dv, dk < DK, dv < DV


@triton.jit
def _load_rows(ptr, b, t0, h, head0, T, row, row_ok, cols, cols_ok, HQ: tl.constexpr, G: tl.constexpr,
               D: tl.constexpr):
    """A query-side tile [rows, len(cols)] of a [B, T, HQ, D] tensor (q, do), zero for padding.
    The forward and dq kernels load q with its row base computed first, as they always have:
    Triton evaluates a call's keyword arguments (the mask) before its positional ones, so going
    through here would move their mask's predicates in the PTX (same SASS, but not the same text)."""
    return tl.load(_row_base(ptr, b, t0, h, head0, T, HQ, G, D) + row[:, None] * D + cols[None, :],
                   mask=row_ok[:, None] & cols_ok[None, :], other=0.0)


@triton.jit
def _backward_rows(do_ptr, lse_ptr, delta_ptr, b, t0, h, head0, T, row, row_ok, lo, hi, dv, dv_ok,
                   HQ: tl.constexpr, G: tl.constexpr, DV: tl.constexpr):
    """What both backward kernels need of a query tile besides q: dO, lse in base 2 and delta."""
    do = _load_rows(do_ptr, b, t0, h, head0, T, row, row_ok, dv, dv_ok, HQ, G, DV)
    seen = hi > lo
    # Rows without a block have lse = -inf and no visible column; keep their shift finite.
    lse = tl.load(_row_base(lse_ptr, b, t0, h, head0, T, HQ, G, 1) + row, mask=row_ok & seen, other=0.0)
    lse = tl.where(seen, lse * LOG2E, 0.0)
    delta = tl.load(_row_base(delta_ptr, b, t0, h, head0, T, HQ, G, 1) + row, mask=row_ok, other=0.0)
    return do, lse, delta


@triton.jit
def _block_offset(b, c, h, NB, H: tl.constexpr, D: tl.constexpr):
    """Scalar 64-bit offset of compressed block `c` of kv head `h` in a [B, NB, H, D] tensor."""
    return ((b.to(tl.int64) * NB + c) * H + h) * D


@triton.jit
def _load_blocks(k_tile, v_tile, block, col_ok, dk, dv, dk_ok, dv_ok, H: tl.constexpr, DK: tl.constexpr,
                 DV: tl.constexpr, BC: tl.constexpr):
    """The keys and values of the `BC` blocks at the scalar pointers (zero where `col_ok` is not),
    and the pointers moved on to the next block tile."""
    k = tl.load(k_tile + block[:, None] * (H * DK) + dk[None, :], mask=col_ok[:, None] & dk_ok[None, :], other=0.0)
    v = tl.load(v_tile + block[:, None] * (H * DV) + dv[None, :], mask=col_ok[:, None] & dv_ok[None, :], other=0.0)
    return k, v, k_tile + BC * H * DK, v_tile + BC * H * DV


@triton.jit
def _visible(cols, lo, hi):
    """Scores [rows, blocks] that count: the block is in the row's `[lo, hi)`."""
    return (cols[None, :] >= lo[:, None]) & (cols[None, :] < hi[:, None])


@triton.jit
def _online_softmax_step(q, k, v, m_i, l_i, acc, visible, SCALE: tl.constexpr, PRECISION: tl.constexpr,
                         MASKED: tl.constexpr):
    """One block tile of the forward's online softmax (base 2). MASKED: `visible` [rows, BC]
    says which scores count; else every score does (a tile that all real rows see whole)."""
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * (SCALE * LOG2E)
    if MASKED:
        s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    if MASKED:
        # A row that has seen nothing yet keeps m = -inf; shift by 0 so no -inf - -inf appears.
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        shift = m_new
    p = tl.exp2(s - shift[:, None])
    alpha = tl.exp2(m_i - shift)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    # A tensor-core dot takes both operands in one dtype: p in [0, 1] rounds to v's 16-bit
    # dtype (relative error at most 2^-8 in bf16) and the sum over blocks stays float32.
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return m_new, l_i, acc


@triton.jit
def compressed_attention_fwd_kernel(
    q_ptr, k_ptr, v_ptr, v_bad_ptr, pos_ptr, first_block_ptr,
    T, NB,
    o_ptr, lse_ptr,
    H: tl.constexpr, G: tl.constexpr, HP: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, BS: tl.constexpr,
    CL: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, DKP: tl.constexpr, DVP: tl.constexpr,
    SCALE: tl.constexpr, PRECISION: tl.constexpr,
):
    HQ: tl.constexpr = H * G
    t0, head0, b, h = _query_program(H, G, HP, BT)
    dt, dh, row_ok, lo, hi = _query_tile(pos_ptr, first_block_ptr, t0, head0, T, G, BS, CL, HP, BT)
    seen, c_lo, c_hi = _tile_blocks(lo, hi, NB)

    dk, dv, dk_ok, dv_ok = _head_columns(DK, DV, DKP, DVP)
    row = dt * HQ + dh
    q_base = _row_base(q_ptr, b, t0, h, head0, T, HQ, G, DK)
    q = tl.load(q_base + row[:, None] * DK + dk[None, :], mask=row_ok[:, None] & dk_ok[None, :], other=0.0)
    # Scalar 64-bit pointers to the tile's first block, advanced block tile by block tile.
    k_tile = k_ptr + _block_offset(b, c_lo, h, NB, H, DK)
    v_tile = v_ptr + _block_offset(b, c_lo, h, NB, H, DV)
    block = tl.arange(0, BC)

    m_i = tl.full([BT * HP], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BT * HP], dtype=tl.float32)
    acc = tl.zeros([BT * HP, DVP], dtype=tl.float32)
    # Block tiles that every real row of the tile sees whole run without the mask (most of them:
    # the rows' ranges differ only at their ends); the rest, from the first partly visible tile
    # on, are masked per row.
    full_lo = tl.max(tl.where(row_ok, lo, 0), axis=0)
    full_hi = tl.min(tl.where(row_ok, hi, NB), axis=0)
    num_full = tl.where(full_lo == c_lo, tl.maximum(full_hi - c_lo, 0) // BC, 0)
    for c0 in range(c_lo, c_lo + num_full * BC, BC):
        k = tl.load(k_tile + block[:, None] * (H * DK) + dk[None, :], mask=dk_ok[None, :], other=0.0)
        v = tl.load(v_tile + block[:, None] * (H * DV) + dv[None, :], mask=dv_ok[None, :], other=0.0)
        k_tile += BC * H * DK
        v_tile += BC * H * DV
        m_i, l_i, acc = _online_softmax_step(q, k, v, m_i, l_i, acc, None, SCALE, PRECISION, False)
    for c0 in range(c_lo + num_full * BC, c_hi, BC):
        cols = c0 + block
        col_ok = cols < c_hi
        k, v, k_tile, v_tile = _load_blocks(k_tile, v_tile, block, col_ok, dk, dv, dk_ok, dv_ok, H, DK, DV, BC)
        visible = _visible(cols, lo, hi)
        m_i, l_i, acc = _online_softmax_step(q, k, v, m_i, l_i, acc, visible, SCALE, PRECISION, True)

    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    # SPEC 8 (common/containment.py): values came zeroed where non-finite; rows that saw one are NaN.
    out = tl.where(nonfinite_in(v_bad_ptr, b, h, lo, hi, row_ok, NB, H)[:, None], float("nan"), out)
    lse = tl.where(seen, (m_i + tl.log2(tl.where(seen, l_i, 1.0))) * LN2, float("-inf"))
    o_base = _row_base(o_ptr, b, t0, h, head0, T, HQ, G, DV)
    tl.store(o_base + row[:, None] * DV + dv[None, :], out.to(o_ptr.dtype.element_ty),
             mask=row_ok[:, None] & dv_ok[None, :])
    tl.store(_row_base(lse_ptr, b, t0, h, head0, T, HQ, G, 1) + row, lse, mask=row_ok)


@triton.jit
def compressed_attention_bwd_kernel_dq(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, pos_ptr, first_block_ptr,
    T, NB,
    dq_ptr,
    H: tl.constexpr, G: tl.constexpr, HP: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, BS: tl.constexpr,
    CL: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, DKP: tl.constexpr, DVP: tl.constexpr,
    SCALE: tl.constexpr, PRECISION: tl.constexpr,
):
    HQ: tl.constexpr = H * G
    t0, head0, b, h = _query_program(H, G, HP, BT)
    dt, dh, row_ok, lo, hi = _query_tile(pos_ptr, first_block_ptr, t0, head0, T, G, BS, CL, HP, BT)
    seen, c_lo, c_hi = _tile_blocks(lo, hi, NB)

    dk, dv, dk_ok, dv_ok = _head_columns(DK, DV, DKP, DVP)
    row = dt * HQ + dh
    q_base = _row_base(q_ptr, b, t0, h, head0, T, HQ, G, DK)
    q = tl.load(q_base + row[:, None] * DK + dk[None, :], mask=row_ok[:, None] & dk_ok[None, :], other=0.0)
    do, lse, delta = _backward_rows(do_ptr, lse_ptr, delta_ptr, b, t0, h, head0, T, row, row_ok, lo, hi, dv, dv_ok,
                                    HQ, G, DV)
    # Scalar 64-bit pointers to the tile's first block, advanced block tile by block tile.
    k_tile = k_ptr + _block_offset(b, c_lo, h, NB, H, DK)
    v_tile = v_ptr + _block_offset(b, c_lo, h, NB, H, DV)
    block = tl.arange(0, BC)

    dq = tl.zeros([BT * HP, DKP], dtype=tl.float32)
    for c0 in range(c_lo, c_hi, BC):
        cols = c0 + block
        col_ok = cols < c_hi
        k, v, k_tile, v_tile = _load_blocks(k_tile, v_tile, block, col_ok, dk, dv, dk_ok, dv_ok, H, DK, DV, BC)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * (SCALE * LOG2E)
        visible = _visible(cols, lo, hi)
        p = tl.where(visible, tl.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)

    tl.store(_row_base(dq_ptr, b, t0, h, head0, T, HQ, G, DK) + row[:, None] * DK + dk[None, :],
             (dq * SCALE).to(dq_ptr.dtype.element_ty),
             mask=row_ok[:, None] & dk_ok[None, :])


@triton.jit
def compressed_attention_bwd_kernel_dkv(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, pos_ptr, first_block_ptr, viewer_lo_ptr, viewer_hi_ptr,
    T, NB, SPLIT_TOKENS,
    dk_ptr, dv_ptr,
    H: tl.constexpr, G: tl.constexpr, HP: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, BS: tl.constexpr,
    CL: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, DKP: tl.constexpr, DVP: tl.constexpr,
    SCALE: tl.constexpr, PRECISION: tl.constexpr,
):
    HEAD_CHUNKS: tl.constexpr = (G + HP - 1) // HP
    HQ: tl.constexpr = H * G
    c0 = tl.program_id(0) * BC
    bh = tl.program_id(1)
    split = tl.program_id(2)
    b = bh // H
    h = bh % H
    block = tl.arange(0, BC)
    cols = c0 + block
    col_ok = cols < NB
    # Tokens that can see a block: from its last token to the end of its sequence (none for
    # a partial block or the unused tail). Blocks are sorted, so the union is one range; this
    # program takes its part in the split [split * SPLIT_TOKENS, (split + 1) * SPLIT_TOKENS).
    t_lo = tl.min(tl.load(viewer_lo_ptr + cols, mask=col_ok, other=T), axis=0)
    t_hi = tl.max(tl.load(viewer_hi_ptr + cols, mask=col_ok, other=0), axis=0)
    t_lo = tl.maximum(t_lo, split * SPLIT_TOKENS)
    t_hi = tl.minimum(t_hi, (split + 1) * SPLIT_TOKENS)

    dk, dv, dk_ok, dv_ok = _head_columns(DK, DV, DKP, DVP)
    k_off = _block_offset(b, c0, h, NB, H, DK)
    v_off = _block_offset(b, c0, h, NB, H, DV)
    k_tile = block[:, None] * (H * DK) + dk[None, :]
    v_tile = block[:, None] * (H * DV) + dv[None, :]
    k = tl.load(k_ptr + k_off + k_tile, mask=col_ok[:, None] & dk_ok[None, :], other=0.0)
    v = tl.load(v_ptr + v_off + v_tile, mask=col_ok[:, None] & dv_ok[None, :], other=0.0)

    dk_acc = tl.zeros([BC, DKP], dtype=tl.float32)
    dv_acc = tl.zeros([BC, DVP], dtype=tl.float32)
    for t0 in range(t_lo, t_hi, BT):
        # Unrolled, so that the token loop is the innermost loop, which Triton software-pipelines
        # (the next tile's loads overlap this one's dots); as a nested loop it ran one load-then-
        # compute step at a time.
        for head_chunk in tl.static_range(HEAD_CHUNKS):
            head0 = head_chunk * HP
            dt, dh, row_ok, lo, hi = _query_tile(pos_ptr, first_block_ptr, t0, head0, t_hi, G, BS, CL, HP, BT)
            row = dt * HQ + dh
            q = _load_rows(q_ptr, b, t0, h, head0, T, row, row_ok, dk, dk_ok, HQ, G, DK)
            do, lse, delta = _backward_rows(do_ptr, lse_ptr, delta_ptr, b, t0, h, head0, T, row, row_ok, lo, hi,
                                            dv, dv_ok, HQ, G, DV)

            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * (SCALE * LOG2E)
            visible = _visible(cols, lo, hi)
            p = tl.where(visible, tl.exp2(s - lse[:, None]), 0.0)
            dv_acc += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
            ds = p * (dp - delta[:, None])
            dk_acc += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)

    # Each split writes its own partial sums (summed outside): no atomics, deterministic.
    partial = split.to(tl.int64) * (tl.num_programs(1) // H) * NB * H
    tl.store(dk_ptr + partial * DK + k_off + k_tile, dk_acc * SCALE, mask=col_ok[:, None] & dk_ok[None, :])
    tl.store(dv_ptr + partial * DV + v_off + v_tile, dv_acc, mask=col_ok[:, None] & dv_ok[None, :])


# ------------------------------------------------------------------------------------------------
# Launch
# ------------------------------------------------------------------------------------------------


# (query rows, block tile, warps, pipeline stages) per kernel, by padded head-dim class and by
# whether the dots run three tf32 passes (float32 problems) or on 16-bit operands: chosen so that
# Hopper compiles them without register spills (float32 with 256-wide heads still spills a few
# hundred bytes). The 128-wide 16-bit tiles come from benchmarks/tile_sweep.py on an H100 (T=64k,
# G=16, bf16; in benchmarks/results/, *_tile_sweep_compressed_attention_bf16.txt): every query
# row shares the compressed blocks a tile loads, so more rows per tile means fewer reloads, and
# 16-bit blocks leave the shared memory for 64-block tiles and a third stage (fwd 3.55 ms, dq
# 3.72, dk/dv 9.20; with float32 blocks in one tf32 pass the best were 11.1, 14.7 and 28.6).
Tile = host.CompressedTile

TILES: dict[tuple[str, int, bool], Tile] = {
    # 16-bit problems: 16-bit operands, float32 accumulation.
    ("fwd", 64, False): Tile(64, 32, 8, 2), ("fwd", 128, False): Tile(256, 64, 8, 3),
    ("fwd", 256, False): Tile(64, 16, 8, 2),
    ("dq", 64, False): Tile(64, 32, 8, 2), ("dq", 128, False): Tile(128, 32, 8, 3),
    ("dq", 256, False): Tile(32, 16, 4, 2),
    ("dkv", 64, False): Tile(32, 32, 4, 2), ("dkv", 128, False): Tile(64, 64, 4, 2),
    ("dkv", 256, False): Tile(16, 16, 8, 2),
    # float32 problems: tf32x3 splits every operand in two, so tiles shrink.
    ("fwd", 64, True): Tile(64, 16, 8, 2), ("fwd", 128, True): Tile(16, 16, 4, 1),
    ("fwd", 256, True): Tile(16, 16, 8, 1),
    ("dq", 64, True): Tile(64, 16, 8, 2), ("dq", 128, True): Tile(16, 16, 8, 1),
    ("dq", 256, True): Tile(16, 16, 8, 1),
    ("dkv", 64, True): Tile(16, 32, 4, 2), ("dkv", 128, True): Tile(16, 16, 8, 1),
    ("dkv", 256, True): Tile(16, 16, 8, 1),
}


def default_tile(stage: str, head_dim: int, value_dim: int, dtype) -> Tile:
    """The tuned tile (`TILES`) of kernel `stage` (fwd, dq, dkv) for these head dims and dtype."""
    return TILES[stage, host.head_dim_class(head_dim, value_dim), launch.dot_precision(dtype) == "tf32x3"]


def _config(stage: str, group: int, head_dim: int, value_dim: int, block_size: int, scale: float, dtype,
            length: int | None = None, tile: Tile | None = None) -> dict:
    """The constexprs and launch options of one kernel (`stage` in fwd, dq, dkv) under `tile`
    (default: `default_tile`). `block_size` is the compressed blocks' stride `d`, `length` their
    length `l` (SPEC 9; default `d`)."""
    tile = tile or default_tile(stage, head_dim, value_dim, dtype)
    heads = min(launch.next_pow2(group), tile.rows)
    return {
        "G": group, "HP": heads, "BT": tile.rows // heads, "BC": tile.block_tile, "BS": block_size,
        "CL": length or block_size, "DK": head_dim, "DV": value_dim,
        "DKP": host.padded_dim(head_dim), "DVP": host.padded_dim(value_dim), "SCALE": float(scale),
        "PRECISION": launch.dot_precision(dtype), "num_warps": tile.num_warps, "num_stages": tile.num_stages,
    }


# One Python wrapper per kernel. `tile` (default: the tuned `TILES`) is what benchmarks/tile_sweep.py
# varies; the custom VJP below always runs the defaults.


def _fwd(query, k_cmp, v_cmp, pos, first_block, block_size: int, length: int, scale: float, tile: Tile | None = None):
    batch, num_tokens, num_q_heads, head_dim = query.shape
    num_blocks, num_kv_heads, value_dim = k_cmp.shape[1], k_cmp.shape[2], v_cmp.shape[3]
    config = _config("fwd", num_q_heads // num_kv_heads, head_dim, value_dim, block_size, scale, query.dtype, length,
                     tile)
    head_chunks = launch.cdiv(config["G"], config["HP"])
    v_finite, v_bad = finite_values(v_cmp)
    return launch.triton_call(
        query, k_cmp, v_finite, v_bad, pos, first_block, num_tokens, num_blocks,
        kernel=compressed_attention_fwd_kernel,
        out_shape=[jax.ShapeDtypeStruct((batch, num_tokens, num_q_heads, value_dim), query.dtype),
                   jax.ShapeDtypeStruct((batch, num_tokens, num_q_heads), jnp.float32)],
        grid=(launch.cdiv(num_tokens, config["BT"]), batch * num_kv_heads * head_chunks),
        H=num_kv_heads, **config,
    )


def _bwd_dq(query, k_cmp, v_cmp, d_out, lse, delta, pos, first_block, block_size: int, length: int, scale: float,
            tile: Tile | None = None):
    batch, num_tokens, num_q_heads, head_dim = query.shape
    num_blocks, num_kv_heads, value_dim = k_cmp.shape[1], k_cmp.shape[2], v_cmp.shape[3]
    config = _config("dq", num_q_heads // num_kv_heads, head_dim, value_dim, block_size, scale, query.dtype, length,
                     tile)
    head_chunks = launch.cdiv(config["G"], config["HP"])
    return launch.triton_call(
        query, k_cmp, v_cmp, d_out, lse, delta, pos, first_block, num_tokens, num_blocks,
        kernel=compressed_attention_bwd_kernel_dq,
        out_shape=jax.ShapeDtypeStruct(query.shape, query.dtype),
        grid=(launch.cdiv(num_tokens, config["BT"]), batch * num_kv_heads * head_chunks),
        H=num_kv_heads, **config,
    )


def _bwd_dkv(query, k_cmp, v_cmp, d_out, lse, delta, pos, first_block, viewer_lo, viewer_hi,
             block_size: int, length: int, scale: float, tile: Tile | None = None):
    batch, num_tokens, num_q_heads, head_dim = query.shape
    num_blocks, num_kv_heads, value_dim = k_cmp.shape[1], k_cmp.shape[2], v_cmp.shape[3]
    config = _config("dkv", num_q_heads // num_kv_heads, head_dim, value_dim, block_size, scale, query.dtype, length,
                     tile)
    block_tiles = launch.cdiv(num_blocks, config["BC"])
    split_tokens = host.dkv_split_tokens(num_tokens, block_tiles * batch * num_kv_heads)
    splits = launch.cdiv(num_tokens, split_tokens)
    d_k, d_v = launch.triton_call(
        query, k_cmp, v_cmp, d_out, lse, delta, pos, first_block, viewer_lo, viewer_hi,
        num_tokens, num_blocks, split_tokens,
        kernel=compressed_attention_bwd_kernel_dkv,
        out_shape=[jax.ShapeDtypeStruct((splits,) + k_cmp.shape, jnp.float32),
                   jax.ShapeDtypeStruct((splits,) + v_cmp.shape, jnp.float32)],
        grid=(block_tiles, batch * num_kv_heads, splits),
        H=num_kv_heads, **config,
    )
    return d_k.sum(axis=0), d_v.sum(axis=0)


def _blocks_for_dots(query, k_cmp, v_cmp):
    """The kernels' dots take both operands in the query's dtype: mean_pool's float32 blocks are
    rounded to it once, not per tile. Inside the custom VJP, so their gradients stay float32."""
    return k_cmp.astype(query.dtype), v_cmp.astype(query.dtype)


def _attend_forward(query, k_cmp, v_cmp, pos, first_block, viewer_lo, viewer_hi, block_size: int, length: int,
                    scale: float):
    k_dots, v_dots = _blocks_for_dots(query, k_cmp, v_cmp)
    out, lse = _fwd(query, k_dots, v_dots, pos, first_block, block_size, length, scale)
    return out, lse, (query, k_dots, v_dots, pos, first_block, viewer_lo, viewer_hi)


def _attend_backward(block_size, length, scale, saved, d_out, lse, delta):
    query, k_cmp, v_cmp, pos, first_block, viewer_lo, viewer_hi = saved
    k_cmp, v_cmp, lse, delta = finite_backward_operands(k_cmp, v_cmp, lse, delta)  # SPEC 8, common/containment.py
    dq = _bwd_dq(query, k_cmp, v_cmp, d_out, lse, delta, pos, first_block, block_size, length, scale)
    dk, dv = _bwd_dkv(query, k_cmp, v_cmp, d_out, lse, delta, pos, first_block, viewer_lo, viewer_hi,
                      block_size, length, scale)
    return dq, dk, dv, None, None, None, None


# The lse is an output too (the selection reads it); its cotangent is folded into delta.
_attend = attention_vjp(_attend_forward, _attend_backward, nondiff_argnums=(7, 8, 9), returns_lse=True)


# SPEC section 9: blocks of length l at stride d (the kernels see d as BS and l as CL).
COMPRESSION_GEOMETRY = True


def run(query, k_cmp, v_cmp, *, block_size: int, scale: float, segments: Segments | None,
        compress_block_size: int | None = None, compress_stride: int | None = None):
    num_tokens = query.shape[1]
    length = compress_block_size or block_size
    stride = compress_stride or length
    layout = token_layout(num_tokens, stride, segments)
    viewer_lo, viewer_hi = sparsity.block_viewers(num_tokens, stride, segments, length)
    # float32 blocks (mean_pool's output) in and float32 gradients out; the cast carries them back.
    k_cmp, v_cmp = k_cmp.astype(jnp.float32), v_cmp.astype(jnp.float32)
    return _attend(query, k_cmp, v_cmp, layout.pos, layout.first_block, viewer_lo, viewer_hi, stride, length,
                   float(scale))


# ------------------------------------------------------------------------------------------------
# Ahead-of-time compile specs
# ------------------------------------------------------------------------------------------------


def compile_specs() -> list[launch.CompileSpec]:
    specs = []
    cases = [  # dtype, group, (Dk, Dv), block size: every head-dim class of TILES, both precisions
        ("bfloat16", 1, (128, 128), 64),
        ("float16", 3, (40, 24), 16),
        ("float32", 16, (64, 64), 64),
        ("bfloat16", 32, (192, 128), 128),
        ("bfloat16", 16, (256, 256), 64),
        ("float32", 1, (128, 128), 16),
        ("float32", 4, (256, 256), 64),
        ("bfloat16", 16, (128, 128), 16, 32),  # SPEC 9, the paper's: stride d=16, length l=32
    ]
    ints = {"T": "i32", "NB": "i32"}
    for dtype, group, (head_dim, value_dim), block_size, *length in cases:
        length = length[0] if length else None
        # The kernels get the blocks in the query's dtype (`_blocks_for_dots`); dk/dv partials stay float32.
        q, f32, i32 = launch.pointer(dtype), "*fp32", "*i32"
        layout = {"pos_ptr": i32, "first_block_ptr": i32}
        fwd = {"q_ptr": q, "k_ptr": q, "v_ptr": q, "v_bad_ptr": i32, **layout, **ints, "o_ptr": q, "lse_ptr": f32}
        grads = {"q_ptr": q, "k_ptr": q, "v_ptr": q, "do_ptr": q, "lse_ptr": f32, "delta_ptr": f32, **layout}
        dq = {**grads, **ints, "dq_ptr": q}
        dkv = {**grads, "viewer_lo_ptr": i32, "viewer_hi_ptr": i32, **ints, "SPLIT_TOKENS": "i32",
               "dk_ptr": f32, "dv_ptr": f32}
        name = f"{dtype}_g{group}_d{head_dim}x{value_dim}_bs{block_size}" + (f"_l{length}" if length else "")
        for stage, kernel, signature in [("fwd", compressed_attention_fwd_kernel, fwd),
                                         ("dq", compressed_attention_bwd_kernel_dq, dq),
                                         ("dkv", compressed_attention_bwd_kernel_dkv, dkv)]:
            config = _config(stage, group, head_dim, value_dim, block_size, head_dim ** -0.5, dtype, length)
            num_warps, num_stages = config.pop("num_warps"), config.pop("num_stages")
            specs.append(launch.CompileSpec(f"{stage}_{name}", kernel, signature, {"H": 4, **config},
                                            num_warps=num_warps, num_stages=num_stages))
    return specs
