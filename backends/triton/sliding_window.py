"""Sliding-window attention (SPEC section 5) as Triton kernels: forward, and a two-kernel backward.

A tile of query rows is `BT` consecutive tokens times the query heads of one kv head that share
its keys, so a key tile loaded once serves the whole group and small groups still fill the
16-row minimum of a tensor-core dot. Consecutive tokens see overlapping windows: one tile reads
the contiguous span `[t0 - W + 1, t0 + BT)` of keys, and the per-row mask (window start, causal
end, own sequence) does the rest. Varlen batches need only each token's `seq_start`.

Backward: `dq` walks the same key span per query tile; `dk, dv` are owned by one program per key
tile, which walks the query tiles that can see it (`[k0, k0 + BK + W - 1)`), so nothing is
accumulated across programs and no atomics are needed.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import triton
import triton.language as tl

from ejkernel_nsa.backends.common import host
from ejkernel_nsa.backends.common.vjp import attention_vjp
from ejkernel_nsa.backends.common.containment import finite_backward_operands, finite_values
from ejkernel_nsa.backends.triton.containment import nonfinite_in
from ejkernel_nsa.backends.triton import launch
from ejkernel_nsa.problem import NSAProblem, Piece, Segments, token_layout

PIECE = Piece.SLIDING_WINDOW

# Softmax runs in base 2 (exp2 is the native instruction); lse is stored in natural log.
LOG2E: tl.constexpr = tl.constexpr(host.LOG2E)
LN2: tl.constexpr = tl.constexpr(host.LN2)


def supports(problem: NSAProblem) -> str | None:
    return launch.common_decline(problem)


# ------------------------------------------------------------------------------------------------
# Kernels
#
# Addresses: a program (or one step of its loop) moves a scalar int64 base pointer to its tile,
# and the elements of the tile are reached by int32 offsets that stay small (a tile spans at most
# a few hundred tokens). That keeps B * T * H * D past 2^31 safe without 64-bit offsets per element
# in registers.
# ------------------------------------------------------------------------------------------------


@triton.jit
def _query_rows(t0, g0, T, BT: tl.constexpr, HP: tl.constexpr, G: tl.constexpr):
    """Rows of a query tile: `BT` tokens from `t0` times heads `[g0, g0 + HP)` of one group (the
    group padded to the power of two `HP`). Returns each row's token index, its token offset
    within the tile, its head offset within the tile, and whether it is a real (token, head)."""
    rows = tl.arange(0, BT * HP)
    dt = rows // HP
    dg = rows % HP
    tok = t0 + dt
    return tok, dt, dg, (tok < T) & (g0 + dg < G)


@triton.jit
def _query_program(T, H, G: tl.constexpr, HP: tl.constexpr, BT: tl.constexpr):
    """Which query tile this program of the forward or dq grid owns: batch row `b` (int64, for
    the addresses), kv head `h`, the tile's first head `g0` within the group and first token `t0`.
    Consecutive programs take consecutive tiles of one head, so their key spans overlap in L2."""
    HEAD_CHUNKS: tl.constexpr = (G + HP - 1) // HP
    num_tiles = tl.cdiv(T, BT)
    pid = tl.program_id(0)
    tile = pid % num_tiles
    bhc = pid // num_tiles
    g0 = (bhc % HEAD_CHUNKS) * HP
    bh = bhc // HEAD_CHUNKS
    b = (bh // H).to(tl.int64)
    h = bh % H
    HQ = H * G
    t0 = tile * BT
    return b, h, HQ, g0, t0


@triton.jit
def _load_rows(ptr, head_row, row_off, cols, valid, D: tl.constexpr):
    """A query-side tile [rows, len(cols)] (q, do): the tile's rows from the int64 `head_row`
    base, zero for padding rows and columns."""
    return tl.load(ptr + head_row * D + row_off[:, None] * D + cols[None, :],
                   mask=valid[:, None] & (cols[None, :] < D), other=0.0)


@triton.jit
def _store_rows(ptr, head_row, row_off, cols, valid, value, D: tl.constexpr):
    """The query-side tile `value` back to memory (o, dq), in the pointer's dtype."""
    tl.store(ptr + head_row * D + row_off[:, None] * D + cols[None, :], value.to(ptr.dtype.element_ty),
             mask=valid[:, None] & (cols[None, :] < D))


@triton.jit
def _backward_rows(do_ptr, lse_ptr, delta_ptr, head_row, row_off, dv, valid, DV: tl.constexpr):
    """What both backward kernels need of a query tile besides q: dO, lse in base 2 and delta."""
    do = _load_rows(do_ptr, head_row, row_off, dv, valid, DV)
    lse = tl.load(lse_ptr + head_row + row_off, mask=valid, other=0.0)
    # lse is -inf only for a row that sees no key, whose p is masked to 0 anyway.
    lse2 = tl.where(lse == float("-inf"), 0.0, lse * LOG2E)
    delta = tl.load(delta_ptr + head_row + row_off, mask=valid, other=0.0)
    return do, lse2, delta


@triton.jit
def _window_start(seq_start_ptr, tok, tok_ok, W):
    """Each row's first visible key: the later of its sequence's start and `tok - W + 1`."""
    seq_start = tl.load(seq_start_ptr + tok, mask=tok_ok, other=0)
    return tl.maximum(seq_start, tok - W + 1)


@triton.jit
def _key_span(seq_start_ptr, t0, T, W, BT: tl.constexpr):
    """The keys a query tile can see, `[lo, hi)`: row bounds grow with the token, so the tile's
    first token bounds the span from below and its last from above."""
    lo = tl.maximum(tl.load(seq_start_ptr + t0), t0 - W + 1)
    hi = tl.minimum(t0 + BT, T)
    return lo, hi


@triton.jit
def _in_window(j, row_lo, tok, valid):
    """Scores [rows, keys] that count: a real row, a key in its window, and not past its token."""
    return valid[:, None] & (j[None, :] >= row_lo[:, None]) & (j[None, :] <= tok[:, None])


@triton.jit
def sliding_window_fwd_kernel(
    q_ptr, k_ptr, v_ptr, v_bad_ptr, seq_start_ptr,
    T, H, W,
    o_ptr, lse_ptr,
    G: tl.constexpr, HP: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
    DK: tl.constexpr, DV: tl.constexpr, DKP: tl.constexpr, DVP: tl.constexpr,
    SCALE: tl.constexpr, PRECISION: tl.constexpr,
):
    b, h, HQ, g0, t0 = _query_program(T, H, G, HP, BT)
    tok, dt, dg, valid = _query_rows(t0, g0, T, BT, HP, G)
    dk = tl.arange(0, DKP)
    dv = tl.arange(0, DVP)
    head_row = (b * T + t0) * HQ + h * G + g0  # int64: (token t0, head g0) on the [B*T*HQ] axis
    row_off = dt * HQ + dg
    q = _load_rows(q_ptr, head_row, row_off, dk, valid, DK)
    row_lo = _window_start(seq_start_ptr, tok, tok < T, W)
    lo, hi = _key_span(seq_start_ptr, t0, T, W, BT)
    qk_scale = SCALE * LOG2E

    m_i = tl.full([BT * HP], float("-inf"), tl.float32)
    l_i = tl.zeros([BT * HP], tl.float32)
    acc = tl.zeros([BT * HP, DVP], tl.float32)
    kv_head = b * T * H + h  # int64: (token 0, kv head h) on the [B*T*H] axis
    jj = tl.arange(0, BK)
    for j0 in range(lo, hi, BK):
        j = j0 + jj
        key_ok = j < hi
        kv_row = kv_head + j0 * H  # j0 * H < T * H: int32 is plenty
        k_t = tl.load(k_ptr + kv_row * DK + (jj * H * DK)[None, :] + dk[:, None],
                      mask=key_ok[None, :] & (dk[:, None] < DK), other=0.0)
        v = tl.load(v_ptr + kv_row * DV + (jj * H * DV)[:, None] + dv[None, :],
                    mask=key_ok[:, None] & (dv[None, :] < DV), other=0.0)
        s = tl.dot(q, k_t, input_precision=PRECISION) * qk_scale
        visible = _in_window(j, row_lo, tok, valid)
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row that has seen nothing yet keeps m = -inf; shift it by 0 so exp2 never sees -inf - -inf.
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_shift[:, None])
        alpha = tl.exp2(m_i - m_shift)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    seen = l_i > 0
    l_safe = tl.where(seen, l_i, 1.0)
    # SPEC 8 (common/containment.py): values came zeroed where non-finite; rows that saw one are NaN.
    bad = nonfinite_in(v_bad_ptr, b, h, row_lo, tok + 1, valid, T, H)
    o = tl.where(bad[:, None], float("nan"), acc / l_safe[:, None])
    lse = tl.where(seen, (m_i + tl.log2(l_safe)) * LN2, float("-inf"))
    _store_rows(o_ptr, head_row, row_off, dv, valid, o, DV)
    tl.store(lse_ptr + head_row + row_off, lse, mask=valid)


@triton.jit
def sliding_window_bwd_kernel_dq(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, seq_start_ptr,
    T, H, W,
    dq_ptr,
    G: tl.constexpr, HP: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
    DK: tl.constexpr, DV: tl.constexpr, DKP: tl.constexpr, DVP: tl.constexpr,
    SCALE: tl.constexpr, PRECISION: tl.constexpr,
):
    b, h, HQ, g0, t0 = _query_program(T, H, G, HP, BT)
    tok, dt, dg, valid = _query_rows(t0, g0, T, BT, HP, G)
    dk = tl.arange(0, DKP)
    dv = tl.arange(0, DVP)
    head_row = (b * T + t0) * HQ + h * G + g0
    row_off = dt * HQ + dg
    q = _load_rows(q_ptr, head_row, row_off, dk, valid, DK)
    do, lse2, delta = _backward_rows(do_ptr, lse_ptr, delta_ptr, head_row, row_off, dv, valid, DV)
    row_lo = _window_start(seq_start_ptr, tok, tok < T, W)
    lo, hi = _key_span(seq_start_ptr, t0, T, W, BT)
    qk_scale = SCALE * LOG2E

    dq = tl.zeros([BT * HP, DKP], tl.float32)
    kv_head = b * T * H + h
    jj = tl.arange(0, BK)
    for j0 in range(lo, hi, BK):
        j = j0 + jj
        key_ok = j < hi
        kv_row = kv_head + j0 * H  # j0 * H < T * H: int32 is plenty
        k = tl.load(k_ptr + kv_row * DK + (jj * H * DK)[:, None] + dk[None, :],
                    mask=key_ok[:, None] & (dk[None, :] < DK), other=0.0)
        v_t = tl.load(v_ptr + kv_row * DV + (jj * H * DV)[None, :] + dv[:, None],
                      mask=key_ok[None, :] & (dv[:, None] < DV), other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        visible = _in_window(j, row_lo, tok, valid)
        p = tl.where(visible, tl.exp2(s - lse2[:, None]), 0.0)
        dp = tl.dot(do, v_t, input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)

    dq = dq * SCALE
    _store_rows(dq_ptr, head_row, row_off, dk, valid, dq, DK)


@triton.jit
def sliding_window_bwd_kernel_dkv(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, seq_start_ptr,
    T, H, W,
    dk_ptr, dv_ptr,
    G: tl.constexpr, HP: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
    DK: tl.constexpr, DV: tl.constexpr, DKP: tl.constexpr, DVP: tl.constexpr,
    SCALE: tl.constexpr, PRECISION: tl.constexpr,
):
    HEAD_CHUNKS: tl.constexpr = (G + HP - 1) // HP
    num_key_tiles = tl.cdiv(T, BK)
    pid = tl.program_id(0)
    key_tile = pid % num_key_tiles
    bh = pid // num_key_tiles
    b = (bh // H).to(tl.int64)
    h = bh % H
    HQ = H * G

    k0 = key_tile * BK
    jj = tl.arange(0, BK)
    j = k0 + jj
    key_ok = j < T
    dk_idx = tl.arange(0, DKP)
    dv_idx = tl.arange(0, DVP)
    kv_row = (b * T + k0) * H + h
    k_off = (jj * H * DK)[:, None] + dk_idx[None, :]
    v_off = (jj * H * DV)[:, None] + dv_idx[None, :]
    k_mask = key_ok[:, None] & (dk_idx[None, :] < DK)
    v_mask = key_ok[:, None] & (dv_idx[None, :] < DV)
    k = tl.load(k_ptr + kv_row * DK + k_off, mask=k_mask, other=0.0)
    v = tl.load(v_ptr + kv_row * DV + v_off, mask=v_mask, other=0.0)
    qk_scale = SCALE * LOG2E

    dk = tl.zeros([BK, DKP], tl.float32)
    dv = tl.zeros([BK, DVP], tl.float32)
    # Only tokens in [k0, k0 + BK + W - 1) have one of these keys in their window.
    t_hi = tl.minimum(T, k0 + BK + W - 1)
    num_query_tiles = tl.cdiv(t_hi - k0, BT)
    for step in range(0, HEAD_CHUNKS * num_query_tiles):
        g0 = (step // num_query_tiles) * HP
        t0 = k0 + (step % num_query_tiles) * BT
        tok, dt, dg, valid = _query_rows(t0, g0, t_hi, BT, HP, G)
        head_row = (b * T + t0) * HQ + h * G + g0
        row_off = dt * HQ + dg
        q = _load_rows(q_ptr, head_row, row_off, dk_idx, valid, DK)
        do, lse2, delta = _backward_rows(do_ptr, lse_ptr, delta_ptr, head_row, row_off, dv_idx, valid, DV)
        row_lo = _window_start(seq_start_ptr, tok, valid, W)

        # Transposed scores [BK, rows]: dk and dv are then plain (keys x rows) @ (rows x D) dots.
        s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale
        visible = valid[None, :] & (j[:, None] >= row_lo[None, :]) & (j[:, None] <= tok[None, :])
        p_t = tl.where(visible, tl.exp2(s_t - lse2[None, :]), 0.0)
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PRECISION)

    dk = dk * SCALE
    tl.store(dk_ptr + kv_row * DK + k_off, dk.to(dk_ptr.dtype.element_ty), mask=k_mask)
    tl.store(dv_ptr + kv_row * DV + v_off, dv.to(dv_ptr.dtype.element_ty), mask=v_mask)


# ------------------------------------------------------------------------------------------------
# Tile choices: one function per kernel, used by its launch and by `compile_specs`
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Config:
    heads: int  # HP: query heads of one group per tile (a power of two)
    tokens: int  # BT: consecutive tokens per tile
    keys: int  # BK: keys per inner step (query kernels) or per program (dkv)
    num_warps: int
    num_stages: int

    def constexprs(self, group: int, head_dim: int, value_dim: int, dtype, scale: float) -> dict:
        # The scale is a compile-time constant: it is fixed per model, and a float kernel argument
        # would travel as float64 through jax_triton.
        return dict(
            SCALE=float(scale),
            G=group, HP=self.heads, BT=self.tokens, BK=self.keys, DK=head_dim, DV=value_dim,
            DKP=_padded(head_dim), DVP=_padded(value_dim), PRECISION=launch.dot_precision(dtype),
        )


def _padded(dim: int) -> int:
    # tl.dot needs every extent >= 16.
    return max(16, launch.next_pow2(dim))


@dataclasses.dataclass(frozen=True)
class _Tiling:
    """One kernel's tile extents: query rows per tile, keys per step (fwd, dq) or per program
    (dkv), and its launch options."""

    rows: int
    keys: int
    num_warps: int
    num_stages: int


def _tilings(head_dim: int, value_dim: int, dtype) -> dict[str, _Tiling]:
    """Per kernel, tiles that keep the float32 accumulators and score tiles in registers and the
    staged operands within Hopper's shared memory. Chosen by timing each kernel alone on an H100
    (B*T = 16-32K tokens, W = 512, D in {64, 128, 256}, G in {1, 16, 32}; docs/triton.md)."""
    widest = max(_padded(head_dim), _padded(value_dim))
    if jnp.dtype(dtype).itemsize == 4:
        # tf32x3 splits every operand in two (high and low parts): about half the tiles of 16-bit.
        if widest > 128:
            return dict(fwd=_Tiling(16, 32, 8, 2), dq=_Tiling(16, 32, 8, 2), dkv=_Tiling(32, 16, 8, 2))
        return dict(fwd=_Tiling(128, 32, 8, 2), dq=_Tiling(64, 32, 4, 2), dkv=_Tiling(64, 32, 8, 2))
    if widest > 128:
        return dict(fwd=_Tiling(64, 32, 4, 2), dq=_Tiling(128, 32, 8, 2), dkv=_Tiling(32, 64, 8, 2))
    fwd = _Tiling(128, 32, 8, 4) if widest > 64 else _Tiling(64, 64, 4, 3)
    return dict(fwd=fwd, dq=_Tiling(128, 32, 8, 3), dkv=_Tiling(32, 64, 4, 3))


def _query_config(group: int, window: int, tiling: _Tiling) -> _Config:
    heads = min(launch.next_pow2(group), tiling.rows)  # a wider group is split into chunks of `rows` heads
    tokens = tiling.rows // heads
    # A tile's key span is tokens + window - 1 long: a short window needs no wide key step.
    keys = min(tiling.keys, max(16, launch.next_pow2(tokens + window - 1)))
    return _Config(heads, tokens, keys, tiling.num_warps, tiling.num_stages)


def _fwd_config(group: int, window: int, head_dim: int, value_dim: int, dtype) -> _Config:
    return _query_config(group, window, _tilings(head_dim, value_dim, dtype)["fwd"])


def _dq_config(group: int, window: int, head_dim: int, value_dim: int, dtype) -> _Config:
    return _query_config(group, window, _tilings(head_dim, value_dim, dtype)["dq"])


def _dkv_config(group: int, window: int, head_dim: int, value_dim: int, dtype) -> _Config:
    del window  # the key tile does not depend on it: the query loop covers the window
    tiling = _tilings(head_dim, value_dim, dtype)["dkv"]
    heads = min(launch.next_pow2(group), tiling.rows)
    return _Config(heads, tiling.rows // heads, tiling.keys, tiling.num_warps, tiling.num_stages)


# ------------------------------------------------------------------------------------------------
# Launches
# ------------------------------------------------------------------------------------------------


def _dims(query, key, value):
    batch, num_tokens, num_q_heads, head_dim = query.shape
    num_kv_heads = key.shape[2]
    return batch, num_tokens, num_kv_heads, num_q_heads // num_kv_heads, head_dim, value.shape[-1]


def _query_grid(config: _Config, batch, num_tokens, num_kv_heads, group):
    head_chunks = launch.cdiv(group, config.heads)
    return (launch.cdiv(num_tokens, config.tokens) * batch * num_kv_heads * head_chunks,)


def _vmappable(launch_fn):
    """jax_triton has no batching rule: under `vmap`, fold the mapped axis into the batch axis
    (every array but the last, `seq_start`, leads with it) and launch once. A mapped `seq_start`
    (different layouts per element) falls back to one launch per element."""

    @functools.wraps(launch_fn)
    def launch_batchable(*args):
        *arrays, window, scale = args

        @jax.custom_batching.custom_vmap
        def call(*arrays):
            return launch_fn(*arrays, window, scale)

        @call.def_vmap
        def fold(axis_size, in_batched, *arrays):
            mapped = [a if b else jnp.broadcast_to(a, (axis_size,) + a.shape) for a, b in zip(arrays, in_batched)]
            if in_batched[-1]:
                outs = jax.lax.map(lambda xs: call(*xs), tuple(mapped))
            else:
                outs = call(*[a.reshape((-1,) + a.shape[2:]) for a in mapped[:-1]], arrays[-1])
                outs = jax.tree.map(lambda o: o.reshape((axis_size, -1) + o.shape[1:]), outs)
            return outs, jax.tree.map(lambda _: True, outs)

        return call(*arrays)

    return launch_batchable


@_vmappable
def sliding_window_fwd(query, key, value, seq_start, window: int, scale: float):
    """o `[B, T, HQ, Dv]` in the query's dtype and lse `[B, T, HQ]` float32 (natural log)."""
    batch, num_tokens, num_kv_heads, group, head_dim, value_dim = _dims(query, key, value)
    config = _fwd_config(group, window, head_dim, value_dim, query.dtype)
    out_shape = [
        jax.ShapeDtypeStruct(query.shape[:3] + (value_dim,), query.dtype),
        jax.ShapeDtypeStruct(query.shape[:3], jnp.float32),
    ]
    v_finite, v_bad = finite_values(value)
    return launch.triton_call(
        query, key, v_finite, v_bad, seq_start, num_tokens, num_kv_heads, window,
        kernel=sliding_window_fwd_kernel, out_shape=out_shape,
        grid=_query_grid(config, batch, num_tokens, num_kv_heads, group),
        num_warps=config.num_warps, num_stages=config.num_stages,
        **config.constexprs(group, head_dim, value_dim, query.dtype, scale),
    )


@_vmappable
def sliding_window_bwd_dq(query, key, value, d_out, lse, delta, seq_start, window: int, scale: float):
    batch, num_tokens, num_kv_heads, group, head_dim, value_dim = _dims(query, key, value)
    config = _dq_config(group, window, head_dim, value_dim, query.dtype)
    return launch.triton_call(
        query, key, value, d_out, lse, delta, seq_start, num_tokens, num_kv_heads, window,
        kernel=sliding_window_bwd_kernel_dq, out_shape=jax.ShapeDtypeStruct(query.shape, query.dtype),
        grid=_query_grid(config, batch, num_tokens, num_kv_heads, group),
        num_warps=config.num_warps, num_stages=config.num_stages,
        **config.constexprs(group, head_dim, value_dim, query.dtype, scale),
    )


@_vmappable
def sliding_window_bwd_dkv(query, key, value, d_out, lse, delta, seq_start, window: int, scale: float):
    batch, num_tokens, num_kv_heads, group, head_dim, value_dim = _dims(query, key, value)
    config = _dkv_config(group, window, head_dim, value_dim, query.dtype)
    out_shape = [jax.ShapeDtypeStruct(key.shape, key.dtype), jax.ShapeDtypeStruct(value.shape, value.dtype)]
    return launch.triton_call(
        query, key, value, d_out, lse, delta, seq_start, num_tokens, num_kv_heads, window,
        kernel=sliding_window_bwd_kernel_dkv, out_shape=out_shape,
        grid=(launch.cdiv(num_tokens, config.keys) * batch * num_kv_heads,),
        num_warps=config.num_warps, num_stages=config.num_stages,
        **config.constexprs(group, head_dim, value_dim, query.dtype, scale),
    )


# ------------------------------------------------------------------------------------------------
# The differentiable piece
# ------------------------------------------------------------------------------------------------


def _attend_forward(query, key, value, seq_start, window, scale):
    out, lse = sliding_window_fwd(query, key, value, seq_start, window, scale)
    return out, lse, (query, key, value, seq_start)


def _attend_backward(window, scale, saved, d_out, lse, delta):
    query, key, value, seq_start = saved
    key, value, lse, delta = finite_backward_operands(key, value, lse, delta)  # SPEC 8, common/containment.py
    d_query = sliding_window_bwd_dq(query, key, value, d_out, lse, delta, seq_start, window, scale)
    d_key, d_value = sliding_window_bwd_dkv(query, key, value, d_out, lse, delta, seq_start, window, scale)
    return d_query, d_key, d_value, None


_attend = attention_vjp(_attend_forward, _attend_backward, nondiff_argnums=(4, 5))


def run(query, key, value, *, window_size: int, scale: float, segments: Segments | None):
    """Causal attention over the last `window_size` keys of each token's own sequence:
    `[B, T, HQ, Dv]` in the query's dtype (SPEC section 5)."""
    num_tokens = query.shape[1]
    window = min(int(window_size), num_tokens)
    seq_start = token_layout(num_tokens, 1, segments).seq_start
    return _attend(query, key, value, seq_start, window, float(scale))


# ------------------------------------------------------------------------------------------------
# Ahead-of-time compile specs for CI
# ------------------------------------------------------------------------------------------------

_SCALARS = {"T": "i32", "H": "i32", "W": "i32"}


def _signature(names_and_dtypes) -> dict[str, str]:
    signature = {}
    for name, dtype in names_and_dtypes:
        signature[name] = _SCALARS[name] if name in _SCALARS else launch.pointer(dtype)
    return signature


def compile_specs() -> list[launch.CompileSpec]:
    # (dtype, Dk, Dv, G, W): every kernel at each, covering the tile regimes (narrow/wide heads,
    # packed tokens / one token per tile / head chunks, short and long windows, 16/32-bit).
    cases = [
        ("bfloat16", 64, 64, 1, 512),
        ("bfloat16", 128, 128, 16, 512),
        ("float16", 192, 128, 3, 64),
        ("float32", 128, 128, 32, 16),
        ("float32", 256, 256, 1, 512),
        ("bfloat16", 256, 256, 128, 7),
    ]
    specs = []
    for dtype, head_dim, value_dim, group, window in cases:
        tag = f"{dtype}_d{head_dim}x{value_dim}_g{group}_w{window}"
        io = [("q_ptr", dtype), ("k_ptr", dtype), ("v_ptr", dtype)]
        fwd = _fwd_config(group, window, head_dim, value_dim, dtype)
        specs.append(launch.CompileSpec(
            f"sliding_window_fwd_kernel[{tag}]", sliding_window_fwd_kernel,
            _signature(io + [("v_bad_ptr", "int32"), ("seq_start_ptr", "int32"), ("T", None), ("H", None),
                             ("W", None), ("o_ptr", dtype), ("lse_ptr", "float32")]),
            fwd.constexprs(group, head_dim, value_dim, dtype, head_dim**-0.5), fwd.num_warps, fwd.num_stages,
        ))
        bwd_inputs = io + [("do_ptr", dtype), ("lse_ptr", "float32"), ("delta_ptr", "float32"),
                           ("seq_start_ptr", "int32"), ("T", None), ("H", None), ("W", None)]
        dq = _dq_config(group, window, head_dim, value_dim, dtype)
        specs.append(launch.CompileSpec(
            f"sliding_window_bwd_kernel_dq[{tag}]", sliding_window_bwd_kernel_dq,
            _signature(bwd_inputs + [("dq_ptr", dtype)]),
            dq.constexprs(group, head_dim, value_dim, dtype, head_dim**-0.5), dq.num_warps, dq.num_stages,
        ))
        dkv = _dkv_config(group, window, head_dim, value_dim, dtype)
        specs.append(launch.CompileSpec(
            f"sliding_window_bwd_kernel_dkv[{tag}]", sliding_window_bwd_kernel_dkv,
            _signature(bwd_inputs + [("dk_ptr", dtype), ("dv_ptr", dtype)]),
            dkv.constexprs(group, head_dim, value_dim, dtype, head_dim**-0.5), dkv.num_warps, dkv.num_stages,
        ))
    return specs
