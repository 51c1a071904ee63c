"""Attention over the selected blocks (SPEC section 4) in Triton, forward and backward.

Each token selects its own key blocks, so the natural loop (one program per token, over its `S`
blocks) puts only the token's `G` query heads in a tensor-core tile and reads `S * BS` keys per
token: at small `G` the tile is mostly padding and the loop is bound by re-reading keys. The
kernels here turn the loop around (docs/triton.md, "Selected attention"):

- the selection is inverted once (`sparsity.reader_pairs_by_key_block`): for each key block, the
  (token, slot) pairs that read it, and cut into load-balanced work tiles (`sparsity.reader_tiles`);
- **block-major forward**: a program owns a key block, loads its keys and values once, and walks
  its readers in chunks of `ROWS` (reader, query head) rows packed densely, so the tile is full for
  any `G`. Each row's attention over this one block is a partial result (normalized output and
  log-sum-exp), written to a `[B, T, H, S, G]` buffer; a **combine** kernel merges a row's `S`
  partials by their log-sum-exps, exactly as split-K attention does;
- **block-major backward**: the same tiles; dk/dv accumulate in registers (one add per tile when a
  block spans several), and dq, which a row receives from each of its `S` blocks, is added with
  float32 atomics, so one kernel computes all three gradients with no second pass;
- the **token-major forward** (one program per token and kv head) is kept: it needs no partials,
  and with `G >= 16` its tile is already full; `forward_loop_order` picks between the two.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import triton
import triton.language as tl

from ejkernel_nsa import sparsity
from ejkernel_nsa.backends.common import host
# The token-major tiles, the same for the Pallas Triton kernels; named here too (Tiles, the benchmarks).
from ejkernel_nsa.backends.common.host import TokenConfig, token_config
from ejkernel_nsa.backends.common.vjp import attention_vjp
from ejkernel_nsa.backends.common.containment import finite_backward_operands, finite_values
from ejkernel_nsa.backends.triton.containment import nonfinite_in
from ejkernel_nsa.backends.triton import launch
from ejkernel_nsa.backends.triton.launch import CompileSpec, cdiv, next_pow2, pointer
from ejkernel_nsa.problem import NSAProblem, Piece, Segments
from ejkernel_nsa.sparsity import SelectedBlocks

PIECE = Piece.SELECTED_ATTENTION

LOG2E = tl.constexpr(host.LOG2E)
LN2 = tl.constexpr(host.LN2)



def supports(problem: NSAProblem) -> str | None:
    # The token-major dedup compares every pair of slots in registers ([SP, SP]); beyond
    # host.MAX_SLOTS it would spill.
    return launch.common_decline(problem) or host.too_many_slots(problem)


# ---- kernels: token-major forward ------------------------------------------------------------


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
def _token_rows(num_tokens, H: tl.constexpr, G: tl.constexpr, ROWS: tl.constexpr, HEAD_CHUNKS: tl.constexpr):
    """A token-major program's rows: one token, a chunk of the query heads of one kv head."""
    t = tl.program_id(0).to(tl.int64)
    pid = tl.program_id(1)
    b = (pid // (H * HEAD_CHUNKS)).to(tl.int64)
    h = (pid // HEAD_CHUNKS) % H
    heads = (pid % HEAD_CHUNKS) * ROWS + tl.arange(0, ROWS)
    token = b * num_tokens + t
    return t, b, h, heads < G, token, token * (H * G) + h * G + heads


@triton.jit
def _token_blocks(indices_ptr, counts_ptr, pos_ptr, seq_start_ptr, t, b, h, token, num_tokens, H: tl.constexpr,
                  S: tl.constexpr, SP: tl.constexpr, BS: tl.constexpr):
    """What a token-major program walks: the token's position, its sequence's first key (a row of
    the batch row), and its counted blocks (`_counted_blocks`)."""
    pos = tl.load(pos_ptr + t)
    first_key = b * num_tokens + tl.load(seq_start_ptr + t)
    index, keep, rank, num = _counted_blocks(indices_ptr, counts_ptr, token * H + h, pos, S, SP, BS)
    return pos, first_key, index, keep, rank, num


@triton.jit
def _online_softmax_step(s, v, m, l, acc, visible, PRECISION: tl.constexpr):
    """One key tile of the forward's online softmax (base 2), from its scores `s` [rows, keys]
    (scaled by `qk_scale`); `visible` broadcasts against them and says which count. The caller
    computes the scores before the mask: the other way round reorders the compiled code."""
    s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, axis=1))
    # A tile can be fully masked for a row (a sub-tile past the token, a padding row); keep exp2
    # away from (-inf) - (-inf).
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l = l * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return m_new, l, acc


@triton.jit
def _token_step(k_ptr, v_ptr, index, keep, rank, step, pos, first_key, h, H: tl.constexpr, DK: tl.constexpr,
                DV: tl.constexpr, DKP: tl.constexpr, DVP: tl.constexpr, BS: tl.constexpr, BK: tl.constexpr,
                SUBS: tl.constexpr):
    """Loop step `step` of a token's counted blocks: its key and value tile, and which keys the
    token sees (loads past the token are masked, so nothing of its future is read)."""
    block = _block_of_step(index, keep, rank, step, SUBS)
    in_block = (step % SUBS) * BK + tl.arange(0, BK)
    local = block * BS + in_block
    visible = (in_block < BS) & (local <= pos)
    rows = (first_key + local) * H + h
    dk = tl.arange(0, DKP)
    dv = tl.arange(0, DVP)
    k = tl.load(k_ptr + rows[:, None] * DK + dk[None, :], mask=visible[:, None] & (dk[None, :] < DK), other=0.0)
    v = tl.load(v_ptr + rows[:, None] * DV + dv[None, :], mask=visible[:, None] & (dv[None, :] < DV), other=0.0)
    return k, v, visible


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
    t, b, h, head_ok, token, q_rows = _token_rows(num_tokens, H, G, ROWS, HEAD_CHUNKS)
    dk = tl.arange(0, DKP)
    dv = tl.arange(0, DVP)
    q = tl.load(q_ptr + q_rows[:, None] * DK + dk[None, :], mask=head_ok[:, None] & (dk[None, :] < DK), other=0.0)
    pos, first_key, index, keep, rank, num = _token_blocks(indices_ptr, counts_ptr, pos_ptr, seq_start_ptr, t, b, h,
                                                           token, num_tokens, H, S, SP, BS)

    qk_scale = SCALE * LOG2E
    m = tl.full([ROWS], float("-inf"), tl.float32)
    l = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, DVP], tl.float32)
    for step in range(0, num * SUBS):
        k, v, visible = _token_step(k_ptr, v_ptr, index, keep, rank, step, pos, first_key, h, H, DK, DV, DKP, DVP,
                                    BS, BK, SUBS)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        m, l, acc = _online_softmax_step(s, v, m, l, acc, visible[None, :], PRECISION)

    seen = l > 0.0
    safe_l = tl.where(seen, l, 1.0)
    out = acc / safe_l[:, None]
    lse = tl.where(seen, (m + tl.log2(safe_l)) * LN2, float("-inf"))
    tl.store(o_ptr + q_rows[:, None] * DV + dv[None, :], out.to(o_ptr.dtype.element_ty),
             mask=head_ok[:, None] & (dv[None, :] < DV))
    tl.store(lse_ptr + q_rows, lse, mask=head_ok)


@triton.jit
def selected_attention_bwd_kernel_dq(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, indices_ptr, counts_ptr, pos_ptr, seq_start_ptr,
    num_tokens,
    dq_ptr,
    H: tl.constexpr, G: tl.constexpr, ROWS: tl.constexpr, HEAD_CHUNKS: tl.constexpr,
    DK: tl.constexpr, DV: tl.constexpr, DKP: tl.constexpr, DVP: tl.constexpr,
    S: tl.constexpr, SP: tl.constexpr, BS: tl.constexpr, BK: tl.constexpr, SUBS: tl.constexpr,
    SCALE: tl.constexpr, PRECISION: tl.constexpr,
):
    """dq, token-major (the split backward: `selected_attention_bwd_kernel` without COMPUTE_DQ
    gives dk and dv). No atomics: a token's program owns its rows."""
    t, b, h, head_ok, token, q_rows = _token_rows(num_tokens, H, G, ROWS, HEAD_CHUNKS)
    dk = tl.arange(0, DKP)
    dv = tl.arange(0, DVP)
    dk_ok = head_ok[:, None] & (dk[None, :] < DK)
    q = tl.load(q_ptr + q_rows[:, None] * DK + dk[None, :], mask=dk_ok, other=0.0)
    do = tl.load(do_ptr + q_rows[:, None] * DV + dv[None, :], mask=head_ok[:, None] & (dv[None, :] < DV), other=0.0)
    delta = tl.load(delta_ptr + q_rows, mask=head_ok, other=0.0)
    lse2 = tl.load(lse_ptr + q_rows, mask=head_ok, other=0.0) * LOG2E
    pos, first_key, index, keep, rank, num = _token_blocks(indices_ptr, counts_ptr, pos_ptr, seq_start_ptr, t, b, h,
                                                           token, num_tokens, H, S, SP, BS)

    qk_scale = SCALE * LOG2E
    acc = tl.zeros([ROWS, DKP], tl.float32)
    # A token with no counted block runs no step: its dq stays 0.
    for step in range(0, num * SUBS):
        k, v, visible = _token_step(k_ptr, v_ptr, index, keep, rank, step, pos, first_key, h, H, DK, DV, DKP, DVP,
                                    BS, BK, SUBS)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        p = tl.where(visible[None, :], tl.exp2(s - lse2[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        acc += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    tl.store(dq_ptr + q_rows[:, None] * DK + dk[None, :], (acc * SCALE).to(dq_ptr.dtype.element_ty), mask=dk_ok)


# ---- kernels: block-major forward, combine and backward ----------------------------------------


@triton.jit
def _reader_tile(tile_block_ptr, tile_chunk_ptr, offsets_ptr, tile, num_tiles, num_blocks,
                 H: tl.constexpr, G: tl.constexpr, ROWS: tl.constexpr, CHUNKS: tl.constexpr):
    """Work tile `tile` of this program's batch row x kv head (grid axis 1): `bh`, the batch row
    `b` (int64) and kv head `h`, the tile's key block (-1 for an unused tile), the first entry of
    the block's reader list, the list's length in rows, and the tile's chunk range."""
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    at = bh.to(tl.int64) * num_tiles + tile
    block = tl.load(tile_block_ptr + at)
    offsets = offsets_ptr + bh.to(tl.int64) * (num_blocks + 1) + tl.maximum(block, 0)
    first = tl.load(offsets)
    num_rows = (tl.load(offsets + 1) - first) * G
    chunk_lo = tl.load(tile_chunk_ptr + at)
    chunk_hi = tl.minimum(chunk_lo + CHUNKS, tl.cdiv(num_rows, ROWS))
    return bh, b, h, block, first, num_rows, chunk_lo, chunk_hi


@triton.jit
def _reader_sees(row_ok, token, key_ok, key_token):
    """Scores [rows, keys] of a chunk against a key tile that count. A block and its readers share
    one sequence: causality compares rows of the batch row."""
    return row_ok[:, None] & key_ok[None, :] & (key_token[None, :] <= token[:, None])


@triton.jit
def _chunk_rows(pairs_ptr, list_base, chunk, num_rows, num_tokens, b, h,
                H: tl.constexpr, G: tl.constexpr, S: tl.constexpr, ROWS: tl.constexpr):
    """The rows of one chunk: consecutive (reader, query head) pairs of a key block's list (the G
    heads of a reader, then the next reader). Returns the row mask, each row's token (its row in
    the batch row), its slot, and its query row and partial-result row in memory."""
    at = chunk * ROWS + tl.arange(0, ROWS)
    row_ok = at < num_rows
    pair = tl.load(pairs_ptr + list_base + at // G, mask=row_ok, other=0)
    token = pair // S
    slot = pair % S
    head = at % G
    token_row = b * num_tokens + token
    q_row = token_row * (H * G) + h * G + head
    part_row = ((token_row * H + h) * S + slot) * G + head
    return row_ok, token, q_row, part_row


@triton.jit
def _key_tile(k_ptr, v_ptr, block_start, block_len, sub, b, h, num_tokens,
              H: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, DKP: tl.constexpr, DVP: tl.constexpr,
              BK: tl.constexpr):
    """Sub-tile `sub` of a packed key block that starts at row `block_start` of its batch row and
    holds `block_len` keys (a sequence's last block may be partial): keys [BK, DKP], values
    [BK, DVP], the keys' rows in the batch row, and which of them exist."""
    in_tile = tl.arange(0, BK)
    key_token = block_start + sub * BK + in_tile
    key_ok = sub * BK + in_tile < block_len
    key_rows = (b * num_tokens + key_token) * H + h
    dk = tl.arange(0, DKP)
    dv = tl.arange(0, DVP)
    k = tl.load(k_ptr + key_rows[:, None] * DK + dk[None, :], mask=key_ok[:, None] & (dk[None, :] < DK), other=0.0)
    v = tl.load(v_ptr + key_rows[:, None] * DV + dv[None, :], mask=key_ok[:, None] & (dv[None, :] < DV), other=0.0)
    return k, v, key_token, key_ok, key_rows


@triton.jit
def selected_attention_fwd_kernel_by_block(
    q_ptr, k_ptr, v_ptr, v_bad_ptr, pairs_ptr, offsets_ptr, tile_block_ptr, tile_chunk_ptr, block_start_ptr, block_len_ptr,
    num_tokens, num_blocks, num_tiles,
    o_part_ptr, lse_part_ptr,
    H: tl.constexpr, G: tl.constexpr, S: tl.constexpr, ROWS: tl.constexpr, CHUNKS: tl.constexpr,
    DK: tl.constexpr, DV: tl.constexpr, DKP: tl.constexpr, DVP: tl.constexpr,
    BK: tl.constexpr, SUBS: tl.constexpr, SCALE: tl.constexpr, PRECISION: tl.constexpr,
):
    tile = tl.program_id(0)
    bh, b, h, block, first, num_rows, chunk_lo, chunk_hi = _reader_tile(
        tile_block_ptr, tile_chunk_ptr, offsets_ptr, tile, num_tiles, num_blocks, H, G, ROWS, CHUNKS)
    if block < 0:
        return
    list_base = bh.to(tl.int64) * num_tokens * S + first
    dk = tl.arange(0, DKP)
    dv = tl.arange(0, DVP)
    block_start = tl.load(block_start_ptr + block)
    block_len = tl.load(block_len_ptr + block)
    # SPEC 8 (common/containment.py): the values came zeroed where non-finite. A clean block (nearly
    # always) needs no per-row check; the per-row gathers cost ~3 ms at G=1, 64k on an H200.
    block_has_bad = nonfinite_in(v_bad_ptr, b, h, block_start, block_start + block_len, block_len > 0,
                                 num_tokens, H)
    if SUBS == 1:
        # The whole block in one tile: its keys and values are read once for every chunk.
        k, v, key_token, key_ok, _ = _key_tile(k_ptr, v_ptr, block_start, block_len, 0, b, h, num_tokens,
                                               H, DK, DV, DKP, DVP, BK)
    qk_scale = SCALE * LOG2E
    for chunk in range(chunk_lo, chunk_hi):
        row_ok, token, q_row, part_row = _chunk_rows(pairs_ptr, list_base, chunk, num_rows, num_tokens, b, h,
                                                     H, G, S, ROWS)
        q = tl.load(q_ptr + q_row[:, None] * DK + dk[None, :], mask=row_ok[:, None] & (dk[None, :] < DK), other=0.0)
        m = tl.full([ROWS], float("-inf"), tl.float32)
        l = tl.zeros([ROWS], tl.float32)
        acc = tl.zeros([ROWS, DVP], tl.float32)
        for sub in tl.static_range(SUBS):
            if SUBS > 1:
                k, v, key_token, key_ok, _ = _key_tile(k_ptr, v_ptr, block_start, block_len, sub, b, h,
                                                       num_tokens, H, DK, DV, DKP, DVP, BK)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
            visible = _reader_sees(row_ok, token, key_ok, key_token)
            m, l, acc = _online_softmax_step(s, v, m, l, acc, visible, PRECISION)
        # A counted block starts at or before its reader, so every real row saw a key (l > 0).
        safe_l = tl.where(l > 0.0, l, 1.0)
        out = acc / safe_l[:, None]
        if block_has_bad:
            # A row sees the block's keys [start, min(end, token + 1)): NaN if one of their values was.
            start = block_start + tl.zeros_like(token)
            end = tl.minimum(start + block_len, token + 1)
            bad = nonfinite_in(v_bad_ptr, b, h, start, end, row_ok, num_tokens, H)
            out = tl.where(bad[:, None], float("nan"), out)
        tl.store(o_part_ptr + part_row[:, None] * DV + dv[None, :], out.to(o_part_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & (dv[None, :] < DV))
        tl.store(lse_part_ptr + part_row, m + tl.log2(safe_l), mask=row_ok)


@triton.jit
def selected_attention_combine_kernel(
    o_part_ptr, lse_part_ptr, keep_ptr,
    num_tokens,
    o_ptr, lse_ptr,
    H: tl.constexpr, G: tl.constexpr, S: tl.constexpr, ROWS: tl.constexpr, DV: tl.constexpr, DVP: tl.constexpr,
):
    """Merge each (token, query head) row's partial results over its counted slots: a softmax
    over the blocks' log-sum-exps (base 2) weighs their normalized outputs."""
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    at = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    token = at // G
    head = at % G
    row_ok = token < num_tokens
    token_row = b * num_tokens + token
    dv = tl.arange(0, DVP)
    m = tl.full([ROWS], float("-inf"), tl.float32)
    l = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, DVP], tl.float32)
    for slot in range(S):
        counted = tl.load(keep_ptr + (token_row * H + h) * S + slot, mask=row_ok, other=0) != 0
        part_row = ((token_row * H + h) * S + slot) * G + head
        # Uncounted slots were never written: nothing of theirs is read.
        lse2 = tl.load(lse_part_ptr + part_row, mask=counted, other=float("-inf"))
        o = tl.load(o_part_ptr + part_row[:, None] * DV + dv[None, :], mask=counted[:, None] & (dv[None, :] < DV),
                    other=0.0).to(tl.float32)
        m_new = tl.maximum(m, lse2)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m - m_safe)
        weight = tl.where(counted, tl.exp2(lse2 - m_safe), 0.0)
        l = l * alpha + weight
        acc = acc * alpha[:, None] + weight[:, None] * o
        m = m_new
    seen = l > 0.0
    safe_l = tl.where(seen, l, 1.0)
    q_row = token_row * (H * G) + h * G + head
    tl.store(o_ptr + q_row[:, None] * DV + dv[None, :], (acc / safe_l[:, None]).to(o_ptr.dtype.element_ty),
             mask=row_ok[:, None] & (dv[None, :] < DV))
    tl.store(lse_ptr + q_row, tl.where(seen, (m + tl.log2(safe_l)) * LN2, float("-inf")), mask=row_ok)


@triton.jit
def selected_attention_bwd_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, pairs_ptr, offsets_ptr, tile_block_ptr, tile_chunk_ptr,
    block_start_ptr, block_len_ptr,
    num_tokens, num_blocks, num_tiles,
    dq_ptr, dk_ptr, dv_ptr,
    H: tl.constexpr, G: tl.constexpr, S: tl.constexpr, ROWS: tl.constexpr, CHUNKS: tl.constexpr,
    DK: tl.constexpr, DV: tl.constexpr, DKP: tl.constexpr, DVP: tl.constexpr,
    BK: tl.constexpr, SUBS: tl.constexpr, SCALE: tl.constexpr, PRECISION: tl.constexpr, COMPUTE_DQ: tl.constexpr,
):
    """dk, dv (and, with COMPUTE_DQ, dq) of one work tile (one key sub-tile), into float32
    buffers zeroed before the launch."""
    tile = tl.program_id(0) // SUBS
    sub = tl.program_id(0) % SUBS
    bh, b, h, block, first, num_rows, chunk_lo, chunk_hi = _reader_tile(
        tile_block_ptr, tile_chunk_ptr, offsets_ptr, tile, num_tiles, num_blocks, H, G, ROWS, CHUNKS)
    if block < 0:
        return
    list_base = bh.to(tl.int64) * num_tokens * S + first
    dk = tl.arange(0, DKP)
    dv = tl.arange(0, DVP)
    k, v, key_token, key_ok, key_rows = _key_tile(k_ptr, v_ptr, tl.load(block_start_ptr + block),
                                                  tl.load(block_len_ptr + block), sub, b, h, num_tokens,
                                                  H, DK, DV, DKP, DVP, BK)
    qk_scale = SCALE * LOG2E
    dk_acc = tl.zeros([BK, DKP], tl.float32)
    dv_acc = tl.zeros([BK, DVP], tl.float32)
    for chunk in range(chunk_lo, chunk_hi):
        row_ok, token, q_row, _ = _chunk_rows(pairs_ptr, list_base, chunk, num_rows, num_tokens, b, h, H, G, S, ROWS)
        dk_ok = row_ok[:, None] & (dk[None, :] < DK)
        q = tl.load(q_ptr + q_row[:, None] * DK + dk[None, :], mask=dk_ok, other=0.0)
        do = tl.load(do_ptr + q_row[:, None] * DV + dv[None, :], mask=row_ok[:, None] & (dv[None, :] < DV), other=0.0)
        lse2 = tl.load(lse_ptr + q_row, mask=row_ok, other=0.0) * LOG2E
        delta = tl.load(delta_ptr + q_row, mask=row_ok, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        visible = _reader_sees(row_ok, token, key_ok, key_token)
        p = tl.where(visible, tl.exp2(s - lse2[:, None]), 0.0)
        dv_acc += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = (p * (dp - delta[:, None])).to(q.dtype)
        dk_acc += tl.dot(tl.trans(ds), q, input_precision=PRECISION)
        if COMPUTE_DQ:
            # A row gets dq from each of its S blocks, in different programs: add it.
            dq = tl.dot(ds, k, input_precision=PRECISION) * SCALE
            tl.atomic_add(dq_ptr + q_row[:, None] * DK + dk[None, :], dq, mask=dk_ok, sem="relaxed")
    dk_at = dk_ptr + key_rows[:, None] * DK + dk[None, :]
    dv_at = dv_ptr + key_rows[:, None] * DV + dv[None, :]
    dk_out = key_ok[:, None] & (dk[None, :] < DK)
    dv_out = key_ok[:, None] & (dv[None, :] < DV)
    if (chunk_lo == 0) & (chunk_hi == tl.cdiv(num_rows, ROWS)):
        # The block's only tile: nobody else writes these rows.
        tl.store(dk_at, dk_acc * SCALE, mask=dk_out)
        tl.store(dv_at, dv_acc, mask=dv_out)
    else:
        tl.atomic_add(dk_at, dk_acc * SCALE, mask=dk_out, sem="relaxed")
        tl.atomic_add(dv_at, dv_acc, mask=dv_out, sem="relaxed")


# ---- launch configuration (shared by the launches and compile_specs) ---------------------------


@dataclasses.dataclass(frozen=True)
class BlockConfig:
    """Block-major kernels: one program per work tile (a key block, `chunks` chunks of `rows`
    reader rows) and batch row x kv head; a block of more than `block_tile` keys is `subs`
    sub-tiles (an inner loop in the forward, programs in the backward)."""

    rows: int
    chunks: int
    block_tile: int
    subs: int
    num_warps: int
    num_stages: int = 2


def block_config(block_size: int, head_dim: int, value_dim: int, itemsize: int = 2, *,
                 backward: bool = False, split: bool = False) -> BlockConfig:
    dkp, dvp = _padded(head_dim), _padded(value_dim)
    block_padded = max(16, next_pow2(block_size))
    # Register budget, in 16-bit elements, for K and V [tile, D] (the backward adds float32 dk/dv
    # accumulators of the same shape). Measured on an H200 (G 1/4/16, D 128, BS 64): 64-key tiles
    # and 8 warps beat 32-key tiles in the backward by 20-30%, despite ~140 bytes of spills.
    budget = 16384 * 2 // itemsize
    block_tile = max(16, min(block_padded, 64, next_pow2(budget // (dkp + dvp) + 1) // 2))
    # A warpgroup's wgmma tile is 64 rows; wide or float32 heads halve it.
    rows = max(16, (64 if dkp + dvp <= 256 else 32) * 2 // itemsize)
    # Chunks per tile: measured on an H200, 8 beat 4 by 3-4% in the forward and the backward.
    chunks, num_warps = 8, 8 if backward or dkp + dvp > 256 else 4
    if backward and split and dkp + dvp <= 256:
        # The split backward's dk/dv kernel (no dq: fewer registers) at G >= 16, where a chunk is
        # only rows / G readers: longer tiles add fewer dk/dv partials by atomics, and 4 warps keep
        # more programs resident. H200, G=16, D=128, bf16, 64k (benchmarks/NOTES.md), fwd+bwd ms:
        # 8 chunks / 8 warps 59.1, 32 / 8 57.1, 64 / 8 56.3, 32 / 4 46.4.
        chunks, num_warps = 32, 4
    return BlockConfig(rows=rows, chunks=chunks, block_tile=block_tile, subs=block_padded // block_tile,
                       num_warps=num_warps)


# The measured crossovers (docs/triton.md): below these group sizes the block-major forward and
# the fused backward win.
BLOCK_MAJOR_BELOW_GROUP = 16
FUSED_BACKWARD_BELOW_GROUP = 16
# The block-major forward's partial results take S times the output's memory; past this it runs
# token-major instead, whatever the group.
MAX_PARTIAL_BYTES = 16 << 30


def forward_loop_order(group: int, num_slots: int, rows: int, value_dim: int, itemsize: int) -> str:
    """`"block"` (block-major, with partial results) or `"token"` (one program per token)."""
    partial_bytes = rows * num_slots * group * value_dim * max(itemsize, 2)
    return "block" if group < BLOCK_MAJOR_BELOW_GROUP and partial_bytes <= MAX_PARTIAL_BYTES else "token"


def backward_loop_order(group: int) -> str:
    """`"fused"` (dq, dk, dv in one block-major kernel, dq by atomics) or `"split"` (dk, dv
    block-major, dq token-major)."""
    return "fused" if group < FUSED_BACKWARD_BELOW_GROUP else "split"


@dataclasses.dataclass(frozen=True)
class Tiles:
    """The piece's launch configuration: the forward's loop order and each kernel's tiles. None
    fields are derived from the shapes (`forward_loop_order`, `token_config`, `block_config`);
    benchmarks pass explicit ones. Tiles never change the result beyond rounding."""

    loop_order: str | None = None
    backward_order: str | None = None
    token: TokenConfig | None = None
    forward: BlockConfig | None = None
    backward: BlockConfig | None = None


def _padded(dim: int) -> int:
    return host.padded_dim(dim)


# ---- one Python wrapper per kernel ---------------------------------------------------------------


def _forward_by_token(q, k, v, sel: SelectedBlocks, block_size: int, scale: float, cfg: TokenConfig | None = None):
    batch, num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads, value_dim, num_slots = k.shape[2], v.shape[3], sel.indices.shape[3]
    group = num_q_heads // num_kv_heads
    cfg = cfg or token_config(group, block_size, head_dim, value_dim, q.dtype.itemsize)
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


def _token_constexprs(cfg: TokenConfig, num_kv_heads, group, head_dim, value_dim, num_slots, block_size, dtype,
                      scale):
    # The scale is a compile-time constant: it is fixed per model (and a float kernel argument
    # would reach the kernel as float64 through jax_triton).
    return dict(
        H=num_kv_heads, G=group, ROWS=cfg.rows, HEAD_CHUNKS=cfg.head_chunks, DK=head_dim, DV=value_dim,
        DKP=_padded(head_dim), DVP=_padded(value_dim), S=num_slots, SP=max(2, next_pow2(num_slots)), BS=block_size,
        BK=cfg.block_tile, SUBS=cfg.subs, SCALE=float(scale), PRECISION=launch.dot_precision(dtype),
    )


def _block_constexprs(cfg: BlockConfig, num_kv_heads, group, num_slots, head_dim, value_dim, dtype, scale):
    return dict(
        H=num_kv_heads, G=group, S=num_slots, ROWS=cfg.rows, CHUNKS=cfg.chunks, DK=head_dim, DV=value_dim,
        DKP=_padded(head_dim), DVP=_padded(value_dim), BK=cfg.block_tile, SUBS=cfg.subs, SCALE=float(scale),
        PRECISION=launch.dot_precision(dtype),
    )


class Readers(NamedTuple):
    """The selection inverted (`sparsity.reader_pairs_by_key_block`): built once per call and
    shared by the forward and the backward."""

    pairs: jax.Array
    offsets: jax.Array


def _tiles_of(readers: Readers, sel: SelectedBlocks, group: int, cfg: BlockConfig) -> sparsity.ReaderTiles:
    return sparsity.reader_tiles(readers.offsets, num_tokens=sel.indices.shape[1], num_slots=sel.indices.shape[3],
                                 group=group, rows=cfg.rows, chunks=cfg.chunks)


def _forward_by_block(q, k, v, sel: SelectedBlocks, readers: Readers, block_size: int, scale: float,
                      cfg: BlockConfig | None = None):
    batch, num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads, value_dim, num_slots = k.shape[2], v.shape[3], sel.indices.shape[3]
    num_blocks = sel.block_start.shape[0]
    group = num_q_heads // num_kv_heads
    cfg = cfg or block_config(block_size, head_dim, value_dim, q.dtype.itemsize)
    tiles = _tiles_of(readers, sel, group, cfg)
    # 16-bit problems keep their partial outputs in 16 bits (the merge is in float32).
    part_dtype = q.dtype if q.dtype.itemsize == 2 else jnp.float32
    num_parts = batch * num_tokens * num_kv_heads * num_slots * group
    v_finite, v_bad = finite_values(v)
    o_part, lse_part = launch.triton_call(
        q, k, v_finite, v_bad, readers.pairs, readers.offsets, tiles.block, tiles.chunk, sel.block_start, sel.block_len,
        num_tokens, num_blocks, tiles.block.shape[1],
        kernel=selected_attention_fwd_kernel_by_block,
        out_shape=[jax.ShapeDtypeStruct((num_parts, value_dim), part_dtype),
                   jax.ShapeDtypeStruct((num_parts,), jnp.float32)],
        grid=(tiles.block.shape[1], batch * num_kv_heads),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        **_block_constexprs(cfg, num_kv_heads, group, num_slots, head_dim, value_dim, q.dtype, scale),
    )
    keep = sparsity.counted_slots(sel, block_size).astype(jnp.int8)
    rows = _combine_rows(value_dim)
    return launch.triton_call(
        o_part, lse_part, keep, num_tokens,
        kernel=selected_attention_combine_kernel,
        out_shape=[
            jax.ShapeDtypeStruct((batch, num_tokens, num_q_heads, value_dim), q.dtype),
            jax.ShapeDtypeStruct((batch, num_tokens, num_q_heads), jnp.float32),
        ],
        grid=(cdiv(num_tokens * group, rows), batch * num_kv_heads),
        num_warps=4, num_stages=2,
        H=num_kv_heads, G=group, S=num_slots, ROWS=rows, DV=value_dim, DVP=_padded(value_dim),
    )


def _combine_rows(value_dim: int) -> int:
    # A float32 accumulator and one partial [rows, Dv] per step: 32 rows of 128 stay in registers.
    return max(16, min(64, 4096 // _padded(value_dim)))


def _backward(q, k, v, d_out, lse, delta, sel: SelectedBlocks, readers: Readers, block_size: int, scale: float,
              tiles: Tiles):
    batch, num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads, value_dim, num_slots = k.shape[2], v.shape[3], sel.indices.shape[3]
    num_blocks = sel.block_start.shape[0]
    group = num_q_heads // num_kv_heads
    order = tiles.backward_order or backward_loop_order(group)
    cfg = tiles.backward or block_config(block_size, head_dim, value_dim, q.dtype.itemsize, backward=True,
                                         split=order == "split")
    work = _tiles_of(readers, sel, group, cfg)
    fused = order == "fused"
    dq, dk, dv = launch.triton_call(
        q, k, v, d_out, lse, delta, readers.pairs, readers.offsets, work.block, work.chunk,
        sel.block_start, sel.block_len, num_tokens, num_blocks, work.block.shape[1],
        kernel=selected_attention_bwd_kernel,
        # Split: the dq buffer is not written; a one-element stand-in keeps one kernel signature.
        out_shape=[jax.ShapeDtypeStruct(q.shape if fused else (1,), jnp.float32),
                   jax.ShapeDtypeStruct(k.shape, jnp.float32), jax.ShapeDtypeStruct(v.shape, jnp.float32)],
        grid=(work.block.shape[1] * cfg.subs, batch * num_kv_heads),
        zeroed_outputs=(0, 1, 2),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        **_block_constexprs(cfg, num_kv_heads, group, num_slots, head_dim, value_dim, q.dtype, scale),
        COMPUTE_DQ=fused,
    )
    if not fused:
        token_cfg = tiles.token or token_config(group, block_size, head_dim, value_dim, q.dtype.itemsize)
        dq = launch.triton_call(
            q, k, v, d_out, lse, delta, sel.indices, sel.counts, sel.pos, sel.seq_start, num_tokens,
            kernel=selected_attention_bwd_kernel_dq,
            out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
            grid=(num_tokens, batch * num_kv_heads * token_cfg.head_chunks),
            num_warps=token_cfg.num_warps, num_stages=token_cfg.num_stages,
            **_token_constexprs(token_cfg, num_kv_heads, group, head_dim, value_dim, num_slots, block_size, q.dtype,
                                scale),
        )
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


def _forward(q, k, v, sel: SelectedBlocks, readers: Readers, block_size: int, scale: float, tiles: Tiles):
    batch, num_tokens, num_q_heads, _ = q.shape
    group = num_q_heads // k.shape[2]
    loop_order = tiles.loop_order or forward_loop_order(group, sel.indices.shape[3], batch * num_tokens * k.shape[2],
                                                        v.shape[3], q.dtype.itemsize)
    if loop_order == "block":
        return _forward_by_block(q, k, v, sel, readers, block_size, scale, tiles.forward)
    return _forward_by_token(q, k, v, sel, block_size, scale, tiles.token)


# ---- the differentiable piece --------------------------------------------------------------------


def _selected_attention_forward(q, k, v, sel: SelectedBlocks, readers: Readers, block_size: int, scale: float,
                                tiles: Tiles):
    out, lse = _forward(q, k, v, sel, readers, block_size, scale, tiles)
    return out, lse, (q, k, v, sel, readers)


def _selected_attention_backward(block_size, scale, tiles, saved, d_out, lse, delta):
    q, k, v, sel, readers = saved
    k, v, lse, delta = finite_backward_operands(k, v, lse, delta)  # SPEC 8, common/containment.py
    dq, dk, dv = _backward(q, k, v, d_out, lse, delta, sel, readers, block_size, scale, tiles)
    return dq, dk, dv, None, None


_selected_attention = attention_vjp(_selected_attention_forward, _selected_attention_backward,
                                    nondiff_argnums=(5, 6, 7))


def run(query, key, value, block_indices, block_counts, *, block_size: int, scale: float, segments: Segments | None,
        tiles: Tiles | None = None):
    batch, num_tokens, num_q_heads, _ = query.shape
    num_kv_heads, value_dim = key.shape[2], value.shape[3]
    num_slots = block_indices.shape[-1]
    if num_tokens == 0 or num_slots == 0:
        return jnp.zeros((batch, num_tokens, num_q_heads, value_dim), query.dtype)
    sel = sparsity.selected_blocks(block_indices, block_counts, num_kv_heads=num_kv_heads, block_size=block_size,
                                   segments=segments)
    # Under jit, a token-major forward that is not differentiated drops this (dead code).
    readers = Readers(*sparsity.reader_pairs_by_key_block(sel, block_size))
    return _selected_attention(query, key, value, sel, readers, int(block_size), float(scale), tiles or Tiles())


# ---- ahead-of-time compiles for CI ---------------------------------------------------------------


def compile_specs() -> list[CompileSpec]:
    # (dtype, Dk, Dv, block size, G, S): the constexprs come from the launches' own configs.
    cases = [
        ("bfloat16", 128, 128, 64, 16, 16),
        ("bfloat16", 128, 128, 64, 1, 16),
        ("bfloat16", 64, 64, 16, 1, 16),
        ("float16", 192, 128, 128, 3, 8),
        ("float32", 256, 256, 64, 32, 16),
        ("bfloat16", 256, 256, 128, 1, 16),
    ]
    specs = []
    for dtype, head_dim, value_dim, block_size, group, num_slots in cases:
        num_kv_heads = 2
        ptr, f32, i32, i8 = pointer(dtype), "*fp32", "*i32", "*i8"
        tag = f"{dtype}-d{head_dim}x{value_dim}-bs{block_size}-g{group}"
        itemsize = jnp.dtype(dtype).itemsize
        scale = head_dim**-0.5
        token_cfg = token_config(group, block_size, head_dim, value_dim, itemsize)
        token_meta = _token_constexprs(token_cfg, num_kv_heads, group, head_dim, value_dim, num_slots, block_size,
                                       dtype, scale)
        fwd_sig = dict(q_ptr=ptr, k_ptr=ptr, v_ptr=ptr, indices_ptr=i32, counts_ptr=i32, pos_ptr=i32,
                       seq_start_ptr=i32, num_tokens="i32", o_ptr=ptr, lse_ptr=f32)
        tiles = dict(pairs_ptr=i32, offsets_ptr=i32, tile_block_ptr=i32, tile_chunk_ptr=i32, block_start_ptr=i32,
                     block_len_ptr=i32, num_tokens="i32", num_blocks="i32", num_tiles="i32")
        part = ptr if itemsize == 2 else f32
        fwd_cfg = block_config(block_size, head_dim, value_dim, itemsize)
        by_block_sig = dict(q_ptr=ptr, k_ptr=ptr, v_ptr=ptr, v_bad_ptr=i32, **tiles, o_part_ptr=part,
                            lse_part_ptr=f32)
        combine_sig = dict(o_part_ptr=part, lse_part_ptr=f32, keep_ptr=i8, num_tokens="i32", o_ptr=ptr, lse_ptr=f32)
        combine_meta = dict(H=num_kv_heads, G=group, S=num_slots, ROWS=_combine_rows(value_dim), DV=value_dim,
                            DVP=_padded(value_dim))
        bwd_cfg = block_config(block_size, head_dim, value_dim, itemsize, backward=True,
                               split=backward_loop_order(group) == "split")
        dq_sig = dict(q_ptr=ptr, k_ptr=ptr, v_ptr=ptr, do_ptr=ptr, lse_ptr=f32, delta_ptr=f32, indices_ptr=i32,
                      counts_ptr=i32, pos_ptr=i32, seq_start_ptr=i32, num_tokens="i32", dq_ptr=ptr)
        bwd_sig = dict(q_ptr=ptr, k_ptr=ptr, v_ptr=ptr, do_ptr=ptr, lse_ptr=f32, delta_ptr=f32, **tiles,
                       dq_ptr=f32, dk_ptr=f32, dv_ptr=f32)
        specs += [
            CompileSpec(f"selected_attention_fwd[{tag}]", selected_attention_fwd_kernel, fwd_sig, token_meta,
                        token_cfg.num_warps, token_cfg.num_stages),
            CompileSpec(f"selected_attention_fwd_by_block[{tag}]", selected_attention_fwd_kernel_by_block,
                        by_block_sig,
                        _block_constexprs(fwd_cfg, num_kv_heads, group, num_slots, head_dim, value_dim, dtype, scale),
                        fwd_cfg.num_warps, fwd_cfg.num_stages),
            CompileSpec(f"selected_attention_combine[{tag}]", selected_attention_combine_kernel, combine_sig,
                        combine_meta, 4, 2),
            CompileSpec(f"selected_attention_bwd[{tag}]", selected_attention_bwd_kernel, bwd_sig,
                        dict(_block_constexprs(bwd_cfg, num_kv_heads, group, num_slots, head_dim, value_dim, dtype,
                                               scale), COMPUTE_DQ=backward_loop_order(group) == "fused"),
                        bwd_cfg.num_warps, bwd_cfg.num_stages),
            CompileSpec(f"selected_attention_bwd_dq[{tag}]", selected_attention_bwd_kernel_dq, dq_sig, token_meta,
                        token_cfg.num_warps, token_cfg.num_stages),
        ]
    return specs
