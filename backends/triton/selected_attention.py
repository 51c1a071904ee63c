"""Attention over the selected blocks (SPEC section 4) in Triton, forward and backward.

Forward and dq: one program per (token, kv head). Each token selects its own key blocks, so tokens
cannot share a K/V tile; what is shared is the group: the program's rows are the token's `G`
query heads, and every K/V block tile is loaded once for all of them. Which slots count (within
the quota, not in the future, not a repeat of an earlier slot) is decided in registers from the
token's `S` indices, and the loop runs over the counted blocks only.

dk/dv: the selection is inverted first (plain jnp, static sizes): for each (batch row, kv head)
the counted (token, block) pairs are sorted by key block, giving every key block the list of
tokens that read it. A program owns one key block and walks its list, packing consecutive
(token, query head) pairs densely into the rows of a tile, so a small group still fills a tensor
core tile. No atomics contend inside the loop; only the long lists (block 0 is read by every
token of its sequence) are split across `SPLIT` programs, which add their partial sums once.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import triton
import triton.language as tl

from ejkernel_nsa import sparsity
from ejkernel_nsa.backends.triton import launch
from ejkernel_nsa.backends.triton.launch import CompileSpec, cdiv, next_pow2, pointer
from ejkernel_nsa.problem import NSAProblem, Piece, Segments
from ejkernel_nsa.sparsity import SelectedBlocks

PIECE = Piece.SELECTED_ATTENTION

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)

# The dedup compares every pair of slots in registers ([SP, SP]); beyond this it would spill.
MAX_SLOTS = 128
# dk/dv: fewer chunks than this per program are not worth another program and its atomic add.
MIN_CHUNKS_PER_PROGRAM = 2
MAX_SPLIT = 8


def supports(problem: NSAProblem) -> str | None:
    reason = launch.common_decline(problem)
    if reason is not None:
        return reason
    if problem.num_slots > MAX_SLOTS:
        return f"at most {MAX_SLOTS} selected-block slots (S), got {problem.num_slots}"
    return None


# ---- kernels ------------------------------------------------------------------------------------


@triton.jit
def _counted_blocks(indices_ptr, counts_ptr, slot_row, pos, S: tl.constexpr, SP: tl.constexpr, BS: tl.constexpr):
    """The token's slots as a vector: (block index, counts?, rank among the counted, how many).

    A slot counts when it is within the quota, names a block in [0, pos // BS], and no earlier
    counted slot names the same block."""
    slots = tl.arange(0, SP)
    index = tl.load(indices_ptr + slot_row * S + slots, mask=slots < S, other=-1)
    quota = tl.load(counts_ptr + slot_row)
    valid = (slots < quota) & (index >= 0) & (index <= pos // BS)
    repeat = (index[:, None] == index[None, :]) & (slots[:, None] < slots[None, :]) & valid[:, None]
    keep = valid & (tl.max(repeat.to(tl.int32), axis=0) == 0)
    counted = keep.to(tl.int32)
    rank = tl.cumsum(counted, axis=0) - 1
    return index, keep, rank, tl.sum(counted, axis=0)


@triton.jit
def _block_of_step(index, keep, rank, step, SUBS: tl.constexpr):
    """The selected block that loop step `step` visits (SUBS sub-tiles per block)."""
    return tl.sum(tl.where(keep & (rank == step // SUBS), index, 0), axis=0)


@triton.jit
def selected_attention_fwd_kernel(
    q_ptr, k_ptr, v_ptr, indices_ptr, counts_ptr, pos_ptr, seq_start_ptr,
    num_tokens,
    o_ptr, lse_ptr,
    H: tl.constexpr, G: tl.constexpr, ROWS: tl.constexpr, HEAD_CHUNKS: tl.constexpr,
    DK: tl.constexpr, DV: tl.constexpr, DKP: tl.constexpr, DVP: tl.constexpr,
    S: tl.constexpr, SP: tl.constexpr, BS: tl.constexpr, BK: tl.constexpr, SUBS: tl.constexpr,
    SCALE: tl.constexpr, PRECISION: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    pid = tl.program_id(1)
    b = (pid // (H * HEAD_CHUNKS)).to(tl.int64)
    h = (pid // HEAD_CHUNKS) % H
    heads = (pid % HEAD_CHUNKS) * ROWS + tl.arange(0, ROWS)
    head_ok = heads < G
    token = b * num_tokens + t
    q_rows = token * (H * G) + h * G + heads
    dk = tl.arange(0, DKP)
    dv = tl.arange(0, DVP)
    q = tl.load(q_ptr + q_rows[:, None] * DK + dk[None, :], mask=head_ok[:, None] & (dk[None, :] < DK), other=0.0)

    pos = tl.load(pos_ptr + t)
    first_key = b * num_tokens + tl.load(seq_start_ptr + t)
    index, keep, rank, num = _counted_blocks(indices_ptr, counts_ptr, token * H + h, pos, S, SP, BS)

    qk_scale = SCALE * LOG2E
    m = tl.full([ROWS], float("-inf"), tl.float32)
    l = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, DVP], tl.float32)
    in_tile = tl.arange(0, BK)
    for step in range(0, num * SUBS):
        block = _block_of_step(index, keep, rank, step, SUBS)
        in_block = (step % SUBS) * BK + in_tile
        local = block * BS + in_block
        visible = (in_block < BS) & (local <= pos)
        rows = (first_key + local) * H + h
        k = tl.load(k_ptr + rows[:, None] * DK + dk[None, :], mask=visible[:, None] & (dk[None, :] < DK), other=0.0)
        v = tl.load(v_ptr + rows[:, None] * DV + dv[None, :], mask=visible[:, None] & (dv[None, :] < DV), other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        s = tl.where(visible[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        # A sub-tile past the token can be fully masked; keep exp2 away from (-inf) - (-inf).
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m = m_new

    seen = l > 0.0
    safe_l = tl.where(seen, l, 1.0)
    out = acc / safe_l[:, None]
    lse = tl.where(seen, (m + tl.log2(safe_l)) * LN2, float("-inf"))
    tl.store(o_ptr + q_rows[:, None] * DV + dv[None, :], out.to(o_ptr.dtype.element_ty),
             mask=head_ok[:, None] & (dv[None, :] < DV))
    tl.store(lse_ptr + q_rows, lse, mask=head_ok)


@triton.jit
def selected_attention_bwd_kernel_dq(
    q_ptr, k_ptr, v_ptr, o_ptr, do_ptr, lse_ptr, indices_ptr, counts_ptr, pos_ptr, seq_start_ptr,
    num_tokens,
    dq_ptr, delta_ptr,
    H: tl.constexpr, G: tl.constexpr, ROWS: tl.constexpr, HEAD_CHUNKS: tl.constexpr,
    DK: tl.constexpr, DV: tl.constexpr, DKP: tl.constexpr, DVP: tl.constexpr,
    S: tl.constexpr, SP: tl.constexpr, BS: tl.constexpr, BK: tl.constexpr, SUBS: tl.constexpr,
    SCALE: tl.constexpr, PRECISION: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    pid = tl.program_id(1)
    b = (pid // (H * HEAD_CHUNKS)).to(tl.int64)
    h = (pid // HEAD_CHUNKS) % H
    heads = (pid % HEAD_CHUNKS) * ROWS + tl.arange(0, ROWS)
    head_ok = heads < G
    token = b * num_tokens + t
    q_rows = token * (H * G) + h * G + heads
    dk = tl.arange(0, DKP)
    dv = tl.arange(0, DVP)
    dk_ok = head_ok[:, None] & (dk[None, :] < DK)
    dv_ok = head_ok[:, None] & (dv[None, :] < DV)
    q = tl.load(q_ptr + q_rows[:, None] * DK + dk[None, :], mask=dk_ok, other=0.0)
    do = tl.load(do_ptr + q_rows[:, None] * DV + dv[None, :], mask=dv_ok, other=0.0)
    o = tl.load(o_ptr + q_rows[:, None] * DV + dv[None, :], mask=dv_ok, other=0.0)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), axis=1)
    tl.store(delta_ptr + q_rows, delta, mask=head_ok)
    lse2 = tl.load(lse_ptr + q_rows, mask=head_ok, other=0.0) * LOG2E

    pos = tl.load(pos_ptr + t)
    first_key = b * num_tokens + tl.load(seq_start_ptr + t)
    index, keep, rank, num = _counted_blocks(indices_ptr, counts_ptr, token * H + h, pos, S, SP, BS)

    qk_scale = SCALE * LOG2E
    acc = tl.zeros([ROWS, DKP], tl.float32)
    in_tile = tl.arange(0, BK)
    # A token with no counted block has lse = -inf and runs no step: its dq stays 0.
    for step in range(0, num * SUBS):
        block = _block_of_step(index, keep, rank, step, SUBS)
        in_block = (step % SUBS) * BK + in_tile
        local = block * BS + in_block
        visible = (in_block < BS) & (local <= pos)
        rows = (first_key + local) * H + h
        k = tl.load(k_ptr + rows[:, None] * DK + dk[None, :], mask=visible[:, None] & (dk[None, :] < DK), other=0.0)
        v = tl.load(v_ptr + rows[:, None] * DV + dv[None, :], mask=visible[:, None] & (dv[None, :] < DV), other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        p = tl.where(visible[None, :], tl.exp2(s - lse2[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        acc += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    tl.store(dq_ptr + q_rows[:, None] * DK + dk[None, :], (acc * SCALE).to(dq_ptr.dtype.element_ty), mask=dk_ok)


@triton.jit
def selected_attention_bwd_kernel_dkv(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, tokens_ptr, offsets_ptr, block_start_ptr, block_len_ptr,
    num_tokens, num_blocks,
    dk_ptr, dv_ptr,
    H: tl.constexpr, G: tl.constexpr, S: tl.constexpr, ROWS: tl.constexpr,
    DK: tl.constexpr, DV: tl.constexpr, DKP: tl.constexpr, DVP: tl.constexpr,
    BK: tl.constexpr, SUBS: tl.constexpr, SPLIT: tl.constexpr, MIN_CHUNKS: tl.constexpr,
    SCALE: tl.constexpr, PRECISION: tl.constexpr,
):
    block = tl.program_id(0) // SUBS
    sub = tl.program_id(0) % SUBS
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    part = tl.program_id(2)

    # This block's readers: tokens[first:last) of the (batch row, kv head) list, ascending.
    offsets = offsets_ptr + bh.to(tl.int64) * (num_blocks + 1) + block
    first = tl.load(offsets)
    pairs = (tl.load(offsets + 1) - first) * G
    chunks = tl.cdiv(pairs, ROWS)
    per_part = tl.maximum(tl.cdiv(chunks, SPLIT), MIN_CHUNKS)
    chunk_lo = part * per_part
    chunk_hi = tl.minimum(chunk_lo + per_part, chunks)
    tokens = tokens_ptr + bh.to(tl.int64) * num_tokens * S + first

    in_tile = tl.arange(0, BK)
    key_token = tl.load(block_start_ptr + block) + sub * BK + in_tile
    key_ok = in_tile < tl.load(block_len_ptr + block) - sub * BK
    key_rows = (b * num_tokens + key_token) * H + h
    dk = tl.arange(0, DKP)
    dv = tl.arange(0, DVP)
    dk_out = key_ok[:, None] & (dk[None, :] < DK)
    dv_out = key_ok[:, None] & (dv[None, :] < DV)
    # A part with nothing to do touches no memory.
    has_work = chunk_hi > chunk_lo
    k = tl.load(k_ptr + key_rows[:, None] * DK + dk[None, :], mask=dk_out & has_work, other=0.0)
    v = tl.load(v_ptr + key_rows[:, None] * DV + dv[None, :], mask=dv_out & has_work, other=0.0)

    qk_scale = SCALE * LOG2E
    dk_acc = tl.zeros([BK, DKP], tl.float32)
    dv_acc = tl.zeros([BK, DVP], tl.float32)
    for chunk in range(chunk_lo, chunk_hi):
        # Rows are consecutive (token, query head) pairs of the list: G heads of a token, then the next token.
        pair = chunk * ROWS + tl.arange(0, ROWS)
        row_ok = pair < pairs
        token = tl.load(tokens + pair // G, mask=row_ok, other=0)
        q_rows = (b * num_tokens + token) * (H * G) + h * G + pair % G
        q = tl.load(q_ptr + q_rows[:, None] * DK + dk[None, :], mask=row_ok[:, None] & (dk[None, :] < DK), other=0.0)
        do = tl.load(do_ptr + q_rows[:, None] * DV + dv[None, :], mask=row_ok[:, None] & (dv[None, :] < DV),
                     other=0.0)
        lse2 = tl.load(lse_ptr + q_rows, mask=row_ok, other=0.0) * LOG2E
        delta = tl.load(delta_ptr + q_rows, mask=row_ok, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        # The block and its readers share one sequence, so causality compares global rows.
        visible = row_ok[:, None] & key_ok[None, :] & (key_token[None, :] <= token[:, None])
        p = tl.where(visible, tl.exp2(s - lse2[:, None]), 0.0)
        dv_acc += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dk_acc += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
    dk_acc = dk_acc * SCALE

    dk_at = dk_ptr + key_rows[:, None] * DK + dk[None, :]
    dv_at = dv_ptr + key_rows[:, None] * DV + dv[None, :]
    if SPLIT > 1:
        # Float32 buffers, zeroed before the launch; one add per part, none inside the loop.
        tl.atomic_add(dk_at, dk_acc, mask=dk_out & has_work, sem="relaxed")
        tl.atomic_add(dv_at, dv_acc, mask=dv_out & has_work, sem="relaxed")
    else:
        # The only program of its block: it writes every row of the block, zeros included.
        tl.store(dk_at, dk_acc.to(dk_ptr.dtype.element_ty), mask=dk_out)
        tl.store(dv_at, dv_acc.to(dv_ptr.dtype.element_ty), mask=dv_out)


# ---- launch configuration (shared by the launches and compile_specs) ---------------------------


class _TokenConfig(NamedTuple):
    """Forward and dq: one program per (token, kv head, chunk of query heads)."""

    rows: int  # query heads per program, padded for tl.dot
    head_chunks: int
    block_tile: int  # keys per inner step (a selected block is SUBS steps)
    subs: int
    dkp: int
    dvp: int
    slots_padded: int
    num_warps: int
    num_stages: int


def _token_config(group: int, block_size: int, head_dim: int, value_dim: int, num_slots: int,
                  itemsize: int = 2) -> _TokenConfig:
    rows = min(max(16, next_pow2(group)), 64)
    dkp, dvp = max(16, next_pow2(head_dim)), max(16, next_pow2(value_dim))
    block_padded = max(16, next_pow2(block_size))
    # K and V tiles [tile, D] are held whole; float32 tiles take twice the registers.
    block_tile = min(block_padded, (64 if max(dkp, dvp) <= 128 else 32) * 2 // itemsize)
    big = rows * max(dkp, dvp) * itemsize >= 64 * 128 * 2
    return _TokenConfig(
        rows=rows, head_chunks=cdiv(group, rows), block_tile=block_tile, subs=block_padded // block_tile,
        dkp=dkp, dvp=dvp, slots_padded=max(2, next_pow2(num_slots)), num_warps=8 if big else 4, num_stages=2,
    )


class _BlockConfig(NamedTuple):
    """dk/dv: one program per (key block sub-tile, batch row x kv head, part of the block's list)."""

    rows: int  # (token, query head) pairs per chunk
    block_tile: int
    subs: int
    dkp: int
    dvp: int
    split: int
    num_warps: int
    num_stages: int


def _block_config(num_tokens: int, block_size: int, head_dim: int, value_dim: int, num_slots: int,
                  itemsize: int = 2) -> _BlockConfig:
    dkp, dvp = max(16, next_pow2(head_dim)), max(16, next_pow2(value_dim))
    block_padded = max(16, next_pow2(block_size))
    # Two float32 accumulators [tile, D] live in registers for the whole program.
    block_tile = max(16, min(block_padded, next_pow2(16384 * 2 // itemsize // (dkp + dvp) + 1) // 2))
    # The chunk's q and do tiles [rows, D] too.
    rows = max(16, (64 if dkp + dvp <= 256 else 32) * 2 // itemsize)
    # Block 0 is read by every token of its sequence, a typical block by about S * BS tokens: the
    # longest list is about T / (S * BS) times the typical one, and is split that many ways.
    split = min(MAX_SPLIT, next_pow2(max(1, num_tokens // max(1, num_slots * block_size))))
    return _BlockConfig(
        rows=rows, block_tile=block_tile, subs=block_padded // block_tile, dkp=dkp, dvp=dvp, split=split,
        # Measured on an H100 (G 1 and 16, D 128, BS 64): 4 warps beat 8 by 25-40% here, even
        # with a few spilled registers; a third stage did not help.
        num_warps=4, num_stages=2,
    )


# ---- one Python wrapper per kernel ---------------------------------------------------------------


def _forward(q, k, v, sel: SelectedBlocks, block_size: int, scale: float):
    batch, num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads, value_dim, num_slots = k.shape[2], v.shape[3], sel.indices.shape[3]
    group = num_q_heads // num_kv_heads
    cfg = _token_config(group, block_size, head_dim, value_dim, num_slots, q.dtype.itemsize)
    return launch.triton_call(
        q, k, v, sel.indices, sel.counts, sel.pos, sel.seq_start, num_tokens,
        kernel=selected_attention_fwd_kernel,
        out_shape=[
            jax.ShapeDtypeStruct((batch, num_tokens, num_q_heads, value_dim), q.dtype),
            jax.ShapeDtypeStruct((batch, num_tokens, num_q_heads), jnp.float32),
        ],
        grid=(num_tokens, batch * num_kv_heads * cfg.head_chunks),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        **_token_constexprs(cfg, num_kv_heads, group, head_dim, value_dim, num_slots, block_size, q.dtype, scale),
    )


def _token_constexprs(cfg: _TokenConfig, num_kv_heads, group, head_dim, value_dim, num_slots, block_size, dtype,
                      scale):
    # The scale is a compile-time constant: it is fixed per model (and a float kernel argument
    # would reach the kernel as float64 through jax_triton).
    return dict(
        H=num_kv_heads, G=group, ROWS=cfg.rows, HEAD_CHUNKS=cfg.head_chunks, DK=head_dim, DV=value_dim,
        DKP=cfg.dkp, DVP=cfg.dvp, S=num_slots, SP=cfg.slots_padded, BS=block_size, BK=cfg.block_tile,
        SUBS=cfg.subs, SCALE=float(scale), PRECISION=launch.dot_precision(dtype),
    )


def _backward_dq(q, k, v, o, do, lse, sel: SelectedBlocks, block_size: int, scale: float):
    batch, num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads, value_dim, num_slots = k.shape[2], v.shape[3], sel.indices.shape[3]
    group = num_q_heads // num_kv_heads
    cfg = _token_config(group, block_size, head_dim, value_dim, num_slots, q.dtype.itemsize)
    return launch.triton_call(
        q, k, v, o, do, lse, sel.indices, sel.counts, sel.pos, sel.seq_start, num_tokens,
        kernel=selected_attention_bwd_kernel_dq,
        out_shape=[
            jax.ShapeDtypeStruct(q.shape, q.dtype),
            jax.ShapeDtypeStruct((batch, num_tokens, num_q_heads), jnp.float32),
        ],
        grid=(num_tokens, batch * num_kv_heads * cfg.head_chunks),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        **_token_constexprs(cfg, num_kv_heads, group, head_dim, value_dim, num_slots, block_size, q.dtype, scale),
    )


def _backward_dkv(q, k, v, do, lse, delta, sel: SelectedBlocks, block_size: int, scale: float):
    batch, num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads, value_dim, num_slots = k.shape[2], v.shape[3], sel.indices.shape[3]
    num_blocks = sel.block_start.shape[0]
    cfg = _block_config(num_tokens, block_size, head_dim, value_dim, num_slots, q.dtype.itemsize)
    tokens, offsets = sparsity.readers_by_key_block(sel, block_size)
    # Split parts add into float32; a lone part writes the key dtype directly.
    acc_k, acc_v = (jnp.float32, jnp.float32) if cfg.split > 1 else (k.dtype, v.dtype)
    dk, dv = launch.triton_call(
        q, k, v, do, lse, delta, tokens, offsets, sel.block_start, sel.block_len, num_tokens, num_blocks,
        kernel=selected_attention_bwd_kernel_dkv,
        out_shape=[jax.ShapeDtypeStruct(k.shape, acc_k), jax.ShapeDtypeStruct(v.shape, acc_v)],
        grid=(num_blocks * cfg.subs, batch * num_kv_heads, cfg.split),
        zeroed_outputs=(0, 1) if cfg.split > 1 else (),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        **_dkv_constexprs(cfg, num_kv_heads, num_q_heads // num_kv_heads, num_slots, head_dim, value_dim, q.dtype,
                          scale),
    )
    return dk.astype(k.dtype), dv.astype(v.dtype)


def _dkv_constexprs(cfg: _BlockConfig, num_kv_heads, group, num_slots, head_dim, value_dim, dtype, scale):
    return dict(
        H=num_kv_heads, G=group, S=num_slots, ROWS=cfg.rows, DK=head_dim, DV=value_dim,
        DKP=cfg.dkp, DVP=cfg.dvp, BK=cfg.block_tile, SUBS=cfg.subs, SPLIT=cfg.split,
        MIN_CHUNKS=MIN_CHUNKS_PER_PROGRAM, SCALE=float(scale), PRECISION=launch.dot_precision(dtype),
    )


# ---- the differentiable piece --------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _selected_attention(q, k, v, sel: SelectedBlocks, block_size: int, scale: float):
    return _forward(q, k, v, sel, block_size, scale)[0]


def _selected_attention_fwd(q, k, v, sel, block_size, scale):
    out, lse = _forward(q, k, v, sel, block_size, scale)
    return out, (q, k, v, sel, out, lse)


def _selected_attention_bwd(block_size, scale, residuals, d_out):
    q, k, v, sel, out, lse = residuals
    d_out = d_out.astype(q.dtype)
    dq, delta = _backward_dq(q, k, v, out, d_out, lse, sel, block_size, scale)
    dk, dv = _backward_dkv(q, k, v, d_out, lse, delta, sel, block_size, scale)
    return dq, dk, dv, None


_selected_attention.defvjp(_selected_attention_fwd, _selected_attention_bwd)


def run(query, key, value, block_indices, block_counts, *, block_size: int, scale: float, segments: Segments | None):
    batch, num_tokens, num_q_heads, _ = query.shape
    num_kv_heads, value_dim = key.shape[2], value.shape[3]
    num_slots = block_indices.shape[-1]
    if num_tokens == 0 or num_slots == 0:
        return jnp.zeros((batch, num_tokens, num_q_heads, value_dim), query.dtype)
    sel = sparsity.selected_blocks(block_indices, block_counts, num_kv_heads=num_kv_heads, block_size=block_size,
                                   segments=segments)
    return _selected_attention(query, key, value, sel, int(block_size), float(scale))


# ---- ahead-of-time compiles for CI ---------------------------------------------------------------


def compile_specs() -> list[CompileSpec]:
    # (dtype, Dk, Dv, block size, G, S, T): the constexprs come from the launches' own configs.
    cases = [
        ("bfloat16", 128, 128, 64, 16, 16, 65536),
        ("bfloat16", 64, 64, 16, 1, 16, 4096),
        ("float16", 192, 128, 128, 3, 8, 8192),
        ("float32", 256, 256, 64, 32, 16, 2048),
        ("bfloat16", 256, 256, 128, 1, 16, 65536),
    ]
    specs = []
    for dtype, head_dim, value_dim, block_size, group, num_slots, num_tokens in cases:
        num_kv_heads = 2
        ptr, f32, i32 = pointer(dtype), "*fp32", "*i32"
        tag = f"{dtype}-d{head_dim}x{value_dim}-bs{block_size}-g{group}"
        itemsize = jnp.dtype(dtype).itemsize
        token_cfg = _token_config(group, block_size, head_dim, value_dim, num_slots, itemsize)
        scale = head_dim**-0.5
        token_meta = _token_constexprs(token_cfg, num_kv_heads, group, head_dim, value_dim, num_slots, block_size,
                                       dtype, scale)
        scalars = {"num_tokens": "i32"}
        fwd_sig = dict(q_ptr=ptr, k_ptr=ptr, v_ptr=ptr, indices_ptr=i32, counts_ptr=i32, pos_ptr=i32,
                       seq_start_ptr=i32, **scalars, o_ptr=ptr, lse_ptr=f32)
        dq_sig = dict(q_ptr=ptr, k_ptr=ptr, v_ptr=ptr, o_ptr=ptr, do_ptr=ptr, lse_ptr=f32, indices_ptr=i32,
                      counts_ptr=i32, pos_ptr=i32, seq_start_ptr=i32, **scalars, dq_ptr=ptr, delta_ptr=f32)
        block_cfg = _block_config(num_tokens, block_size, head_dim, value_dim, num_slots, itemsize)
        out = f32 if block_cfg.split > 1 else ptr
        dkv_sig = dict(q_ptr=ptr, k_ptr=ptr, v_ptr=ptr, do_ptr=ptr, lse_ptr=f32, delta_ptr=f32, tokens_ptr=i32,
                       offsets_ptr=i32, block_start_ptr=i32, block_len_ptr=i32, **scalars, num_blocks="i32",
                       dk_ptr=out, dv_ptr=out)
        dkv_meta = _dkv_constexprs(block_cfg, num_kv_heads, group, num_slots, head_dim, value_dim, dtype, scale)
        specs += [
            CompileSpec(f"selected_attention_fwd[{tag}]", selected_attention_fwd_kernel, fwd_sig, token_meta,
                        token_cfg.num_warps, token_cfg.num_stages),
            CompileSpec(f"selected_attention_bwd_dq[{tag}]", selected_attention_bwd_kernel_dq, dq_sig, token_meta,
                        token_cfg.num_warps, token_cfg.num_stages),
            CompileSpec(f"selected_attention_bwd_dkv[{tag}]", selected_attention_bwd_kernel_dkv, dkv_sig, dkv_meta,
                        block_cfg.num_warps, block_cfg.num_stages),
        ]
    return specs
