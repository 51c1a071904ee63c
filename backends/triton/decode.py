"""A decoding step's selected attention (SPEC sections 4 and 10) in Triton: one query per row.

At decode time each (row, kv head) has one token and `S` selected blocks, so the token-major loop
of `selected_attention` would run `B * H` programs, too few to fill a GPU at batch 1. The work is
split over the blocks instead, as split-K ("flash decoding") attention does: one program per
(row, kv head, slot) loads its block's `BS` keys and values once for the `G` query heads of the
group and writes a normalized partial output and its log-sum-exp; the `S` partials are merged by
their log-sum-exps in XLA (a `[B, H, S, G, Dv]` tensor, tiny; `decode_span.merge_splits`, which
the compressed branch and the window of a decoding step share). Loads are masked by the row's
length, so cache slots past it never reach a product.

Forward only: differentiating it raises (the XLA backend differentiates decoding calls).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import triton
import triton.language as tl

from ejkernel_nsa.backends.common import host
from ejkernel_nsa.backends.triton import launch
from ejkernel_nsa.backends.triton.decode_span import decline_unless_decoding_step, merge_splits
from ejkernel_nsa.backends.triton.launch import CompileSpec, next_pow2, pointer
from ejkernel_nsa.problem import NSAProblem, Piece

PIECE = Piece.SELECTED_ATTENTION
# SPEC section 10: queries against longer keys (`kv_lengths=`), the only calls it takes.
LONGER_KEYS = True


def supports(problem: NSAProblem) -> str | None:
    reason = decline_unless_decoding_step(problem, "selected_attention")
    if reason is not None:
        return reason
    block_size = problem.block_size
    if block_size < 16 or block_size & (block_size - 1):
        return f"block_size a power of two >= 16 (one tensor-core tile of keys), got {block_size}"
    return host.too_many_slots(problem)


@triton.jit
def decode_selected_fwd_kernel(
    q_ptr, k_ptr, v_ptr, indices_ptr, counts_ptr, lengths_ptr,
    num_keys,
    o_part_ptr, lse_part_ptr,
    H: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, S: tl.constexpr, SP: tl.constexpr, BS: tl.constexpr,
    DK: tl.constexpr, DKP: tl.constexpr, DV: tl.constexpr, DVP: tl.constexpr, SCALE: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Program (b * H + h, slot): the G heads' attention over one selected block (natural-log lse)."""
    bh = tl.program_id(0)
    slot = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    length = tl.load(lengths_ptr + b)
    pos = length - 1  # the row's one query is its last token
    slot_row = (b * H + h) * S
    index = tl.load(indices_ptr + slot_row + slot)
    count = tl.load(counts_ptr + b * H + h)
    # A block named by an earlier slot counts once (SPEC section 4): the first slot holding it.
    slots = tl.arange(0, SP)
    earlier = tl.load(indices_ptr + slot_row + slots, mask=slots < slot, other=-1)
    duplicate = tl.sum(tl.where((slots < slot) & (earlier == index), 1, 0), axis=0) > 0
    counted = (slot < count) & (index >= 0) & (index <= pos // BS) & (duplicate == 0)

    heads = tl.arange(0, GP)
    dk = tl.arange(0, DKP)
    dv = tl.arange(0, DVP)
    q_rows = (b * H + h) * G + heads
    q = tl.load(q_ptr + q_rows[:, None] * DK + dk[None, :], mask=(heads < G)[:, None] & (dk < DK)[None, :], other=0.0)
    keys = index * BS + tl.arange(0, BS)
    key_ok = counted & (keys <= pos) & (keys >= 0)
    key_rows = (b * num_keys + keys) * H + h
    k = tl.load(k_ptr + key_rows[:, None] * DK + dk[None, :], mask=key_ok[:, None] & (dk < DK)[None, :], other=0.0)
    v = tl.load(v_ptr + key_rows[:, None] * DV + dv[None, :], mask=key_ok[:, None] & (dv < DV)[None, :], other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * SCALE
    s = tl.where(key_ok[None, :], s, float("-inf"))
    m = tl.max(s, axis=1)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    p = tl.where(key_ok[None, :], tl.exp(s - m_safe[:, None]), 0.0)
    l = tl.sum(p, axis=1)
    seen = l > 0.0
    safe_l = tl.where(seen, l, 1.0)
    o = tl.dot(p.to(v.dtype), v, input_precision=PRECISION) / safe_l[:, None]
    part_rows = (slot_row + slot) * G + heads
    tl.store(o_part_ptr + part_rows[:, None] * DV + dv[None, :], o, mask=(heads < G)[:, None] & (dv < DV)[None, :])
    tl.store(lse_part_ptr + part_rows, tl.where(seen, m_safe + tl.log(safe_l), float("-inf")), mask=heads < G)


def _constexprs(num_kv_heads, group, num_slots, block_size, head_dim, value_dim, dtype, scale):
    return dict(H=num_kv_heads, G=group, GP=max(16, next_pow2(group)), S=num_slots, SP=max(2, next_pow2(num_slots)),
                BS=block_size, DK=head_dim, DKP=max(16, next_pow2(head_dim)), DV=value_dim,
                DVP=max(16, next_pow2(value_dim)), SCALE=scale, PRECISION=launch.dot_precision(dtype))


def run(query, key, value, block_indices, block_counts, *, block_size: int, scale: float, segments, kv_lengths):
    batch, _, num_q_heads, head_dim = query.shape
    num_keys, num_kv_heads, value_dim = key.shape[1], key.shape[2], value.shape[3]
    num_slots = block_indices.shape[-1]
    if isinstance(block_counts, int):
        block_counts = jnp.full((batch, 1, num_kv_heads), block_counts, jnp.int32)
    meta = _constexprs(num_kv_heads, num_q_heads // num_kv_heads, num_slots, block_size, head_dim, value_dim,
                       query.dtype, scale)
    return _selected_decode(query, key, value, block_indices.astype(jnp.int32), block_counts.astype(jnp.int32),
                            kv_lengths.astype(jnp.int32), tuple(sorted(meta.items())))


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _selected_decode(query, key, value, block_indices, block_counts, kv_lengths, meta):
    meta = dict(meta)
    batch, _, num_q_heads, _ = query.shape
    H, G, S, DV = meta["H"], meta["G"], meta["S"], meta["DV"]
    o_part, lse_part = launch.triton_call(
        query, key, value, block_indices, block_counts, kv_lengths, key.shape[1],
        kernel=decode_selected_fwd_kernel,
        out_shape=[jax.ShapeDtypeStruct((batch, H, S, G, DV), jnp.float32),
                   jax.ShapeDtypeStruct((batch, H, S, G), jnp.float32)],
        grid=(batch * H, S), num_warps=4, num_stages=1, **meta,
    )
    # The slots' partials merged by their log-sum-exps; a row that counted no block stays 0.
    out, _ = merge_splits(o_part, lse_part)
    return out.reshape(batch, 1, num_q_heads, DV).astype(query.dtype)


def _selected_decode_fwd(query, key, value, block_indices, block_counts, kv_lengths, meta):
    return _selected_decode(query, key, value, block_indices, block_counts, kv_lengths, meta), None


def _selected_decode_bwd(meta, residuals, d_out):
    raise NotImplementedError(
        "the Triton decoding kernel (backends/triton/decode.py) has no backward: differentiate decoding calls "
        "with backend='xla'"
    )


_selected_decode.defvjp(_selected_decode_fwd, _selected_decode_bwd)


def compile_specs() -> list[CompileSpec]:
    # (dtype, Dk, Dv, block size, G, S): issue 14's serving shape first.
    cases = [("bfloat16", 128, 128, 64, 16, 16), ("bfloat16", 64, 64, 32, 1, 8), ("float32", 128, 64, 64, 4, 16)]
    specs = []
    for dtype, head_dim, value_dim, block_size, group, num_slots in cases:
        ptr, f32, i32 = pointer(dtype), "*fp32", "*i32"
        signature = dict(q_ptr=ptr, k_ptr=ptr, v_ptr=ptr, indices_ptr=i32, counts_ptr=i32, lengths_ptr=i32,
                         num_keys="i32", o_part_ptr=f32, lse_part_ptr=f32)
        specs.append(CompileSpec(
            f"decode_selected_fwd-{dtype}-d{head_dim}x{value_dim}-bs{block_size}-g{group}", decode_selected_fwd_kernel,
            signature, _constexprs(4, group, num_slots, block_size, head_dim, value_dim, dtype, head_dim**-0.5),
            num_warps=4, num_stages=1,
        ))
    return specs
