"""Attention over the selected blocks (SPEC section 4) as Pallas kernels, forward and backward.

Forward and dq: one program per (token, kv head, chunk of query heads). Each token selects its own
key blocks, so tokens cannot share a K/V tile; the group does: the program's rows are the token's
query heads (padded to at least 16 rows for `tt.dot`, so 1/16 of the rows are real at G = 1), and
each K/V tile is loaded once for all of them. Which slots count (within the quota, not in the
future, not a repeat of an earlier slot) is decided in registers from the token's `S` indices,
and the loop runs over the counted blocks only.

dk/dv: the selection is inverted first, in XLA with static sizes: per (batch row, kv head) the
counted (token, slot) pairs are sorted by key block, so every key block has the list of tokens
that read it. A program owns one key sub-tile and walks its list, packing consecutive (token,
query head) pairs densely into the rows of a tile, so several tokens share one tensor-core tile
for any G. Long lists (block 0 is read by every token of its sequence) are split across `SPLIT`
programs that write separate float32 partial sums, added in XLA (masked atomics are not
interpreted, and partial buffers keep the result deterministic).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from ejkernel_nsa import sparsity
from ejkernel_nsa.backends.common import host
from ejkernel_nsa.backends.common.containment import finite_backward_operands, finite_values
from ejkernel_nsa.backends.common.vjp import attention_vjp
from ejkernel_nsa.backends.pallas_triton import common
from ejkernel_nsa.problem import NSAProblem, Piece, Segments
from ejkernel_nsa.sparsity import SelectedBlocks

PIECE = Piece.SELECTED_ATTENTION

# dk/dv: fewer chunks than this per part are not worth another part.
MIN_CHUNKS_PER_PART = 2
MAX_SPLIT = 4


def supports(problem: NSAProblem) -> str | None:
    # The de-duplication compares every pair of slots in registers ([SP, SP]).
    return common.common_decline(problem) or host.too_many_slots(problem)


# ---- kernels ------------------------------------------------------------------------------------


def _counted_blocks(indices_ref, counts_ref, slot_row, pos, *, S, SP, BS):
    """The token's slots: (block index, counts?, rank among the counted, how many count)."""
    slots = jnp.arange(SP, dtype=jnp.int32)
    index = common.load_vector(indices_ref, slot_row * S + slots, slots < S, -1)
    quota = counts_ref[slot_row]
    valid = (slots < quota) & (index >= 0) & (index <= pos // BS)
    repeat = (index[:, None] == index[None, :]) & (slots[:, None] < slots[None, :]) & valid[:, None]
    keep = valid & (jnp.max(repeat.astype(jnp.int32), axis=0) == 0)
    counted = keep.astype(jnp.int32)
    return index, keep, jnp.cumsum(counted) - 1, jnp.sum(counted)


def _token_program(indices_ref, counts_ref, pos_ref, seq_start_ref, *, T, H, G, ROWS, S, SP, BS):
    """Forward and dq: the program's (token, kv head, head chunk), its query rows, the token's
    position, its sequence's first flat key row, and its counted slots (`_counted_blocks`)."""
    t = pl.program_id(0)
    bh, chunk = common.divmod_static(pl.program_id(1), common.cdiv(G, ROWS))
    b, h = common.divmod_static(bh, H)
    heads = chunk * ROWS + jnp.arange(ROWS, dtype=jnp.int32)
    q_row = (b * T + t) * (H * G) + h * G + heads
    pos = pos_ref[t]
    slots = _counted_blocks(indices_ref, counts_ref, (b * T + t) * H + h, pos, S=S, SP=SP, BS=BS)
    return b, h, heads < G, q_row, pos, b * T + seq_start_ref[t], slots


def _scored_key_tile(q, k_ref, v_ref, step, slots, pos, first_key, *, H, h, DK, DV, BS, BK, SUBS, SCALE, PRECISION):
    """Loop step `step` (SUBS steps per counted block): the keys and values of its sub-tile, the
    base-2 scores and which keys the token sees (inside the block, not after the token)."""
    index, keep, rank, _ = slots
    slot_step, sub = common.divmod_static(step, SUBS)
    block = jnp.sum(jnp.where(keep & (rank == slot_step), index, 0))
    in_block = sub * BK + jnp.arange(BK, dtype=jnp.int32)
    local = block * BS + in_block
    rows, visible = (first_key + local) * H + h, (in_block < BS) & (local <= pos)
    k = common.load_rows(k_ref, rows, visible, common.padded_dim(DK), DK)
    v = common.load_rows(v_ref, rows, visible, common.padded_dim(DV), DV)
    s2 = common.scores2(q, k, SCALE, PRECISION)
    return k, v, s2, visible[None, :]


def _saw_nonfinite(v_bad_ref, slots, pos, first_key, *, T, H, b, h, BS):
    """SPEC 8, after the loop: whether one of the token's counted blocks held a non-finite value
    in the keys it sees (`[start, min(start + BS, token + 1))`, `common.nonfinite_in`)."""
    index, keep, _, _ = slots
    seq_start = first_key - b * T  # the token's sequence start in its batch row
    start = seq_start + index * BS
    end = jnp.minimum(start + BS, seq_start + pos + 1)
    bad = common.nonfinite_in(v_bad_ref, b, h, start, end, keep, N=T, H=H)
    return jnp.max(jnp.where(bad, 1.0, 0.0)) > 0.0


def selected_attention_fwd_kernel(q_ref, k_ref, v_ref, v_bad_ref, indices_ref, counts_ref, pos_ref, seq_start_ref,
                                  o_ref, lse_ref, *, T, H, G, ROWS, DK, DV, S, SP, BS, BK, SUBS, SCALE, PRECISION):
    b, h, head_ok, q_row, pos, first_key, slots = _token_program(indices_ref, counts_ref, pos_ref, seq_start_ref, T=T,
                                                              H=H, G=G, ROWS=ROWS, S=S, SP=SP, BS=BS)
    q = common.load_rows(q_ref, q_row, head_ok, common.padded_dim(DK), DK)

    def step(i, state):
        _, v, s2, visible = _scored_key_tile(q, k_ref, v_ref, i, slots, pos, first_key, H=H, h=h, DK=DK, DV=DV,
                                             BS=BS, BK=BK, SUBS=SUBS, SCALE=SCALE, PRECISION=PRECISION)
        return common.softmax_step(state, s2, visible, v, PRECISION)

    state = jax.lax.fori_loop(0, slots[3] * SUBS, step, common.softmax_init(ROWS, common.padded_dim(DV)))
    out, lse = common.softmax_finish(state)
    out = jnp.where(_saw_nonfinite(v_bad_ref, slots, pos, first_key, T=T, H=H, b=b, h=h, BS=BS), jnp.nan, out)
    common.store_rows(o_ref, q_row, head_ok, out, DV)
    common.store_vector(lse_ref, q_row, head_ok, lse)


def selected_attention_bwd_kernel_dq(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, indices_ref, counts_ref,
                                     pos_ref, seq_start_ref, dq_ref, *,
                                     T, H, G, ROWS, DK, DV, S, SP, BS, BK, SUBS, SCALE, PRECISION):
    _, h, head_ok, q_row, pos, first_key, slots = _token_program(indices_ref, counts_ref, pos_ref, seq_start_ref, T=T,
                                                              H=H, G=G, ROWS=ROWS, S=S, SP=SP, BS=BS)
    q, do, lse2, delta = common.row_grad_inputs(q_ref, do_ref, lse_ref, delta_ref, q_row, head_ok, DK, DV)

    # A token with no counted block runs no step: its dq stays 0.
    def step(i, dq):
        k, v, s2, visible = _scored_key_tile(q, k_ref, v_ref, i, slots, pos, first_key, H=H, h=h, DK=DK, DV=DV,
                                             BS=BS, BK=BK, SUBS=SUBS, SCALE=SCALE, PRECISION=PRECISION)
        _, ds = common.softmax_grads(s2, lse2, visible, do, v, delta, PRECISION)
        return dq + common.dot(ds.astype(k.dtype), k, PRECISION)

    dq = jax.lax.fori_loop(0, slots[3] * SUBS, step, jnp.zeros((ROWS, common.padded_dim(DK)), jnp.float32))
    common.store_rows(dq_ref, q_row, head_ok, dq * SCALE, DK)


def selected_attention_bwd_kernel_dkv(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, tokens_ref, offsets_ref,
                                      block_start_ref, block_len_ref, dk_ref, dv_ref, *,
                                      B, T, NB, H, G, S, ROWS, DK, DV, BK, SUBS, SPLIT, SCALE, PRECISION):
    block, sub = common.divmod_static(pl.program_id(0), SUBS)
    bh, part = pl.program_id(1), pl.program_id(2)
    b, h = common.divmod_static(bh, H)

    # This block's readers: tokens[first:last) of the (batch row, kv head) list, ascending.
    first = offsets_ref[bh * (NB + 1) + block]
    pairs = (offsets_ref[bh * (NB + 1) + block + 1] - first) * G
    chunks = (pairs + ROWS - 1) // ROWS
    per_part = jnp.maximum(common.divmod_static(chunks + SPLIT - 1, SPLIT)[0], MIN_CHUNKS_PER_PART)
    chunk_lo = part * per_part
    chunk_hi = jnp.minimum(chunk_lo + per_part, chunks)

    in_tile = jnp.arange(BK, dtype=jnp.int32)
    key_token = block_start_ref[block] + sub * BK + in_tile
    key_ok = in_tile < block_len_ref[block] - sub * BK
    key_rows = (b * T + key_token) * H + h
    k = common.load_rows(k_ref, key_rows, key_ok, common.padded_dim(DK), DK)
    v = common.load_rows(v_ref, key_rows, key_ok, common.padded_dim(DV), DV)

    def step(chunk, grads):
        # Rows are consecutive (token, query head) pairs of the list: G heads of a token, then the next.
        pair = chunk * ROWS + jnp.arange(ROWS, dtype=jnp.int32)
        row_ok = pair < pairs
        reader, head = common.divmod_static(pair, G)
        token = common.load_vector(tokens_ref, bh * (T * S) + first + reader, row_ok)
        q_row = (b * T + token) * (H * G) + h * G + head
        q, do, lse2, delta = common.row_grad_inputs(q_ref, do_ref, lse_ref, delta_ref, q_row, row_ok, DK, DV)
        # The block and its readers share one sequence, so causality compares flat token rows.
        visible = row_ok[:, None] & key_ok[None, :] & (key_token[None, :] <= token[:, None])
        return common.key_grads(grads, q, do, lse2, delta, k, v, visible, SCALE, PRECISION)

    zeros = (jnp.zeros((BK, common.padded_dim(DK)), jnp.float32), jnp.zeros((BK, common.padded_dim(DV)), jnp.float32))
    dk, dv = jax.lax.fori_loop(chunk_lo, jnp.maximum(chunk_lo, chunk_hi), step, zeros)
    # Every key row lies in one block: each part writes all its rows, zeros included.
    out_rows = part * (B * T * H) + key_rows
    common.store_rows(dk_ref, out_rows, key_ok, dk * SCALE, DK)
    common.store_rows(dv_ref, out_rows, key_ok, dv, DV)


# ---- launch configuration -----------------------------------------------------------------------


def _token_constexprs(tiles: host.TokenConfig, num_slots: int) -> dict:
    """Forward and dq: the token-major tiles (`host.token_config`: query heads per program, key
    sub-tile) as the kernels' constexprs."""
    return dict(ROWS=tiles.rows, BK=tiles.block_tile, SUBS=tiles.subs, SP=max(2, common.next_pow2(num_slots)))


@dataclasses.dataclass(frozen=True)
class BlockConfig:
    """dk/dv: one program per key sub-tile of `block_tile` keys (a block is `subs` of them), kv head
    and part of the block's reader list (`split` parts); `rows` (token, head) pairs per chunk."""

    rows: int
    block_tile: int
    subs: int
    split: int
    # Measured for the Triton backend's twin on an H100: 4 warps beat 8 here.
    num_warps: int = 4
    num_stages: int = 2

    def constexprs(self) -> dict:
        return dict(ROWS=self.rows, BK=self.block_tile, SUBS=self.subs, SPLIT=self.split)


def block_config(num_tokens: int, block_size: int, head_dim: int, value_dim: int, num_slots: int,
                 itemsize: int) -> BlockConfig:
    dkp, dvp = common.padded_dim(head_dim), common.padded_dim(value_dim)
    block_padded = max(16, common.next_pow2(block_size))
    # Two float32 accumulators [BK, D] live in registers for the whole program.
    block_tile = max(16, min(block_padded, common.next_pow2(16384 * 2 // itemsize // (dkp + dvp) + 1) // 2))
    rows = max(16, (64 if dkp + dvp <= 256 else 32) * 2 // itemsize)
    # Block 0 is read by every token of its sequence, a typical block by about S * BS tokens.
    split = min(MAX_SPLIT, common.next_pow2(max(1, num_tokens // max(1, num_slots * block_size))))
    return BlockConfig(rows=rows, block_tile=block_tile, subs=block_padded // block_tile, split=split)


# ---- one wrapper per kernel ---------------------------------------------------------------------


def _token_launch(kernel, name, out_shape, q, k, v, sel: SelectedBlocks, *arrays, block_size, scale):
    batch, num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads, value_dim, num_slots = k.shape[2], v.shape[3], sel.indices.shape[3]
    group = num_q_heads // num_kv_heads
    tiles = host.token_config(group, block_size, head_dim, value_dim, q.dtype.itemsize)
    flat = [a.reshape(-1, a.shape[-1]) if a.ndim == 4 else a.reshape(-1) for a in arrays]
    return common.pallas_call(
        kernel, grid=(num_tokens, batch * num_kv_heads * common.cdiv(group, tiles.rows)), out_shape=out_shape,
        num_warps=tiles.num_warps, num_stages=2, name=name,
        T=num_tokens, H=num_kv_heads, G=group, DK=head_dim, DV=value_dim, S=num_slots, BS=block_size,
        SCALE=float(scale), PRECISION=common.dot_precision(q.dtype, q.dtype), **_token_constexprs(tiles, num_slots),
    )(q.reshape(-1, head_dim), k.reshape(-1, head_dim), v.reshape(-1, value_dim), *flat,
      sel.indices.reshape(-1), sel.counts.reshape(-1), sel.pos, sel.seq_start)


def _forward(q, k, v, sel: SelectedBlocks, block_size: int, scale: float):
    rows = q.size // q.shape[3]
    v_finite, v_bad = finite_values(v)  # SPEC 8: backends/common/containment.py
    out, lse = _token_launch(
        selected_attention_fwd_kernel, "selected_attention_fwd",
        [jax.ShapeDtypeStruct((rows, v.shape[3]), q.dtype), jax.ShapeDtypeStruct((rows,), jnp.float32)],
        q, k, v_finite, sel, v_bad, block_size=block_size, scale=scale,
    )
    return out.reshape(q.shape[:3] + (v.shape[3],)), lse.reshape(q.shape[:3])


def _backward_dq(q, k, v, do, lse, delta, sel: SelectedBlocks, block_size: int, scale: float):
    dq = _token_launch(
        selected_attention_bwd_kernel_dq, "selected_attention_bwd_dq",
        jax.ShapeDtypeStruct((q.size // q.shape[3], q.shape[3]), q.dtype),
        q, k, v, sel, do, lse, delta, block_size=block_size, scale=scale,
    )
    return dq.reshape(q.shape)


def _backward_dkv(q, k, v, do, lse, delta, sel: SelectedBlocks, block_size: int, scale: float):
    batch, num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads, value_dim, num_slots = k.shape[2], v.shape[3], sel.indices.shape[3]
    num_blocks = sel.block_start.shape[0]
    config = block_config(num_tokens, block_size, head_dim, value_dim, num_slots, q.dtype.itemsize)
    tokens, offsets = sparsity.readers_by_key_block(sel, block_size)
    rows = batch * num_tokens * num_kv_heads
    split = config.split
    dk, dv = common.pallas_call(
        selected_attention_bwd_kernel_dkv, grid=(num_blocks * config.subs, batch * num_kv_heads, split),
        out_shape=[jax.ShapeDtypeStruct((split * rows, head_dim), jnp.float32),
                   jax.ShapeDtypeStruct((split * rows, value_dim), jnp.float32)],
        num_warps=config.num_warps, num_stages=config.num_stages, name="selected_attention_bwd_dkv",
        B=batch, T=num_tokens, NB=num_blocks, H=num_kv_heads, G=num_q_heads // num_kv_heads, S=num_slots,
        DK=head_dim, DV=value_dim, SCALE=float(scale), PRECISION=common.dot_precision(q.dtype, q.dtype),
        **config.constexprs(),
    )(q.reshape(-1, head_dim), k.reshape(-1, head_dim), v.reshape(-1, value_dim), do.reshape(-1, value_dim),
      lse.reshape(-1), delta.reshape(-1), tokens.reshape(-1), offsets.reshape(-1), sel.block_start, sel.block_len)
    dk = dk.reshape((split,) + k.shape).sum(axis=0)
    dv = dv.reshape((split,) + v.shape).sum(axis=0)
    return dk.astype(k.dtype), dv.astype(v.dtype)


# ---- the differentiable piece --------------------------------------------------------------------


def _selected_attention_forward(q, k, v, sel: SelectedBlocks, block_size: int, scale: float):
    out, lse = _forward(q, k, v, sel, block_size, scale)
    return out, lse, (q, k, v, sel)


def _selected_attention_backward(block_size, scale, saved, d_out, lse, delta):
    q, k, v, sel = saved
    k, v, lse, delta = finite_backward_operands(k, v, lse, delta)  # SPEC 8
    dq = _backward_dq(q, k, v, d_out, lse, delta, sel, block_size, scale)
    dk, dv = _backward_dkv(q, k, v, d_out, lse, delta, sel, block_size, scale)
    return dq, dk, dv, None


_selected_attention = attention_vjp(_selected_attention_forward, _selected_attention_backward, nondiff_argnums=(4, 5))


def run(query, key, value, block_indices, block_counts, *, block_size: int, scale: float, segments: Segments | None):
    batch, num_tokens, num_q_heads, _ = query.shape
    num_kv_heads, value_dim = key.shape[2], value.shape[3]
    if num_tokens == 0 or block_indices.shape[-1] == 0:
        return jnp.zeros((batch, num_tokens, num_q_heads, value_dim), query.dtype)
    sel = sparsity.selected_blocks(block_indices, block_counts, num_kv_heads=num_kv_heads, block_size=block_size,
                                   segments=segments)
    return _selected_attention(query, key, value, sel, int(block_size), float(scale))
