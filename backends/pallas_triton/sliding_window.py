"""Sliding-window attention (SPEC section 5) as Pallas kernels: forward, and a two-kernel backward.

A query tile is `BT` consecutive tokens times `HP` query heads of one kv head, so a key tile loaded
once serves the group and small groups still fill a tensor-core dot. Consecutive tokens see
overlapping windows: a tile reads the contiguous keys `[t0 - W + 1, t0 + BT)` (from its sequence's
start), and a per-row mask (window start, causal end, own sequence) does the rest.

Backward: `dq` walks the same key span per query tile; `dk, dv` belong to one program per key
tile, which walks the query tiles that can see it (`[k0, k0 + BK + W - 1)`): nothing is summed
across programs, so no atomics and no partial buffers.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from ejkernel_nsa.backends.common.containment import finite_backward_operands, finite_values
from ejkernel_nsa.backends.common.vjp import attention_vjp
from ejkernel_nsa.backends.pallas_triton import common
from ejkernel_nsa.problem import NSAProblem, Piece, Segments, token_layout

PIECE = Piece.SLIDING_WINDOW

# Query rows per tile and keys per step: float32 problems run three tf32 passes per dot (every
# operand split in two) and wide heads hold wider tiles, so both shrink (as in the Triton backend).
_ROWS = {"narrow": 64, "wide_float32": 16}
_KEYS = {True: 32, False: 64}


def supports(problem: NSAProblem) -> str | None:
    return common.common_decline(problem)


def _window_rows(seq_start_ref, token, row_ok, W: int):
    """Each row's first visible key: its window start, not before its sequence's start."""
    return jnp.maximum(common.load_vector(seq_start_ref, token, row_ok), token - W + 1)


def _key_tile(k_ref, v_ref, b, h, keys, key_ok, *, T, H, DK, DV):
    rows = (b * T + keys) * H + h
    return (common.load_rows(k_ref, rows, key_ok, common.padded_dim(DK), DK),
            common.load_rows(v_ref, rows, key_ok, common.padded_dim(DV), DV))


def _query_program(seq_start_ref, *, T, H, G, HP, BT, W):
    """Forward and dq: the program's batch row and kv head, its rows, each row's first visible
    key, and the keys `[lo, hi)` the tile may see (row bounds grow with the token, so the tile's
    first token bounds the span below and its last token above)."""
    b, h, head0 = common.group_tile(pl.program_id(1), G=G, HP=HP, H=H)
    t0 = pl.program_id(0) * BT
    token, row_ok, q_row = common.query_tile(b, h, t0, head0, T=T, H=H, G=G, HP=HP, BT=BT)
    row_lo = _window_rows(seq_start_ref, token, row_ok, W)
    return b, h, token, row_ok, q_row, row_lo, jnp.maximum(seq_start_ref[t0], t0 - W + 1), jnp.minimum(t0 + BT, T)


def _visible(keys, key_ok, token, row_ok, row_lo):
    return (row_ok[:, None] & key_ok[None, :] & (keys[None, :] >= row_lo[:, None])
            & (keys[None, :] <= token[:, None]))


def _scored_key_tile(q, k_ref, v_ref, b, h, j0, hi, token, row_ok, row_lo, *, T, H, BK, DK, DV, SCALE, PRECISION):
    """Keys `[j0, j0 + BK)` (before `hi`): keys, values, base-2 scores and what each row sees."""
    keys = j0 + jnp.arange(BK, dtype=jnp.int32)
    key_ok = keys < hi
    k, v = _key_tile(k_ref, v_ref, b, h, keys, key_ok, T=T, H=H, DK=DK, DV=DV)
    s2 = common.scores2(q, k, SCALE, PRECISION)
    return k, v, s2, _visible(keys, key_ok, token, row_ok, row_lo)


def sliding_window_fwd_kernel(q_ref, k_ref, v_ref, v_bad_ref, seq_start_ref, o_ref, lse_ref, *,
                              T, H, G, HP, BT, BK, W, DK, DV, SCALE, PRECISION):
    b, h, token, row_ok, q_row, row_lo, lo, hi = _query_program(seq_start_ref, T=T, H=H, G=G, HP=HP, BT=BT, W=W)
    q = common.load_rows(q_ref, q_row, row_ok, common.padded_dim(DK), DK)

    def step(i, state):
        _, v, s2, visible = _scored_key_tile(q, k_ref, v_ref, b, h, lo + i * BK, hi, token, row_ok, row_lo, T=T,
                                             H=H, BK=BK, DK=DK, DV=DV, SCALE=SCALE, PRECISION=PRECISION)
        return common.softmax_step(state, s2, visible, v, PRECISION)

    steps = jnp.maximum(hi - lo + BK - 1, 0) // BK
    state = jax.lax.fori_loop(0, steps, step, common.softmax_init(BT * HP, common.padded_dim(DV)))
    out, lse = common.softmax_finish(state)
    out = common.poisoned(out, common.nonfinite_in(v_bad_ref, b, h, row_lo, token + 1, row_ok, N=T, H=H))  # SPEC 8
    common.store_rows(o_ref, q_row, row_ok, out, DV)
    common.store_vector(lse_ref, q_row, row_ok, lse)


def sliding_window_bwd_kernel_dq(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, seq_start_ref, dq_ref, *,
                                 T, H, G, HP, BT, BK, W, DK, DV, SCALE, PRECISION):
    b, h, token, row_ok, q_row, row_lo, lo, hi = _query_program(seq_start_ref, T=T, H=H, G=G, HP=HP, BT=BT, W=W)
    q, do, lse2, delta = common.row_grad_inputs(q_ref, do_ref, lse_ref, delta_ref, q_row, row_ok, DK, DV)

    def step(i, dq):
        k, v, s2, visible = _scored_key_tile(q, k_ref, v_ref, b, h, lo + i * BK, hi, token, row_ok, row_lo, T=T,
                                             H=H, BK=BK, DK=DK, DV=DV, SCALE=SCALE, PRECISION=PRECISION)
        _, ds = common.softmax_grads(s2, lse2, visible, do, v, delta, PRECISION)
        return dq + common.dot(ds.astype(k.dtype), k, PRECISION)

    steps = jnp.maximum(hi - lo + BK - 1, 0) // BK
    dq = jax.lax.fori_loop(0, steps, step, jnp.zeros((BT * HP, common.padded_dim(DK)), jnp.float32))
    common.store_rows(dq_ref, q_row, row_ok, dq * SCALE, DK)


def sliding_window_bwd_kernel_dkv(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, seq_start_ref, dk_ref, dv_ref, *,
                                  T, H, G, HP, BT, BK, W, DK, DV, SCALE, PRECISION):
    b, h = common.divmod_static(pl.program_id(1), H)
    k0 = pl.program_id(0) * BK
    keys = k0 + jnp.arange(BK, dtype=jnp.int32)
    key_ok = keys < T
    k, v = _key_tile(k_ref, v_ref, b, h, keys, key_ok, T=T, H=H, DK=DK, DV=DV)
    # The queries that can see these keys: from the first key to W - 1 past the last.
    q_hi = jnp.minimum(k0 + BK + W - 1, T)
    head_chunks = common.cdiv(G, HP)

    def step(i, grads):
        token_tile, head_chunk = common.divmod_static(i, head_chunks)
        token, row_ok, q_row = common.query_tile(b, h, k0 + token_tile * BT, head_chunk * HP,
                                                 T=T, H=H, G=G, HP=HP, BT=BT, end=q_hi)
        row_lo = _window_rows(seq_start_ref, token, row_ok, W)
        q, do, lse2, delta = common.row_grad_inputs(q_ref, do_ref, lse_ref, delta_ref, q_row, row_ok, DK, DV)
        visible = _visible(keys, key_ok, token, row_ok, row_lo)
        return common.key_grads(grads, q, do, lse2, delta, k, v, visible, SCALE, PRECISION)

    steps = jnp.maximum(q_hi - k0 + BT - 1, 0) // BT * head_chunks
    zeros = (jnp.zeros((BK, common.padded_dim(DK)), jnp.float32), jnp.zeros((BK, common.padded_dim(DV)), jnp.float32))
    dk, dv = jax.lax.fori_loop(0, steps, step, zeros)
    rows = (b * T + keys) * H + h
    common.store_rows(dk_ref, rows, key_ok, dk * SCALE, DK)
    common.store_rows(dv_ref, rows, key_ok, dv, DV)


# ------------------------------------------------------------------------------------------------
# Launch
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Tiles:
    """One tile shape for the three kernels: `heads` query heads of a group (`HP`, a power of
    two; wider groups in chunks) x `tokens` consecutive tokens (`BT`) per query tile, and `keys`
    keys per step (`BK`; the dk/dv kernel's keys per program)."""

    heads: int
    tokens: int
    keys: int
    num_warps: int = 4
    num_stages: int = 2


def default_tiles(query, key, value) -> Tiles:
    group = query.shape[2] // key.shape[2]
    full = jnp.dtype(query.dtype) == jnp.float32
    wide = common.padded_dim(max(query.shape[3], value.shape[3])) > 128
    rows = _ROWS["wide_float32" if full and wide else "narrow"]
    heads = min(common.next_pow2(group), rows)
    return Tiles(heads=heads, tokens=rows // heads, keys=32 if wide else _KEYS[full])


def _launch(kernel, name, grid, out_shape, tiles: Tiles, window: int, scale: float, *arrays):
    query, key, value = arrays[:3]
    flat = [a.reshape(-1, a.shape[-1]) if a.ndim == 4 else a.reshape(-1) for a in arrays]
    return common.pallas_call(
        kernel, grid=grid, out_shape=out_shape, num_warps=tiles.num_warps, num_stages=tiles.num_stages, name=name,
        T=query.shape[1], H=key.shape[2], G=query.shape[2] // key.shape[2], HP=tiles.heads, BT=tiles.tokens,
        BK=tiles.keys, W=window, DK=query.shape[3], DV=value.shape[3], SCALE=float(scale),
        PRECISION=common.dot_precision(query.dtype, query.dtype),
    )(*flat)


def _query_grid(query, key, tiles: Tiles):
    group = query.shape[2] // key.shape[2]
    return (common.cdiv(query.shape[1], tiles.tokens), query.shape[0] * key.shape[2] * common.cdiv(group, tiles.heads))


def _fwd(query, key, value, seq_start, window, scale):
    tiles = default_tiles(query, key, value)
    rows = query.size // query.shape[3]
    v_finite, v_bad = finite_values(value)  # SPEC 8: backends/common/containment.py
    out, lse = _launch(sliding_window_fwd_kernel, "sliding_window_fwd", _query_grid(query, key, tiles),
                       [jax.ShapeDtypeStruct((rows, value.shape[3]), query.dtype),
                        jax.ShapeDtypeStruct((rows,), jnp.float32)],
                       tiles, window, scale, query, key, v_finite, v_bad, seq_start)
    return out.reshape(query.shape[:3] + (value.shape[3],)), lse.reshape(query.shape[:3])


def _attend_forward(query, key, value, seq_start, window: int, scale: float):
    out, lse = _fwd(query, key, value, seq_start, window, scale)
    return out, lse, (query, key, value, seq_start)


def _attend_backward(window, scale, saved, d_out, lse, delta):
    query, key, value, seq_start = saved
    tiles = default_tiles(query, key, value)
    key, value, lse, delta = finite_backward_operands(key, value, lse, delta)  # SPEC 8
    grads = (query, key, value, d_out, lse, delta, seq_start)
    dq = _launch(sliding_window_bwd_kernel_dq, "sliding_window_bwd_dq", _query_grid(query, key, tiles),
                 jax.ShapeDtypeStruct((query.size // query.shape[3], query.shape[3]), query.dtype),
                 tiles, window, scale, *grads)
    kv_rows = key.size // key.shape[3]
    dk, dv = _launch(sliding_window_bwd_kernel_dkv, "sliding_window_bwd_dkv",
                     (common.cdiv(key.shape[1], tiles.keys), key.shape[0] * key.shape[2]),
                     [jax.ShapeDtypeStruct((kv_rows, key.shape[3]), key.dtype),
                      jax.ShapeDtypeStruct((kv_rows, value.shape[3]), value.dtype)], tiles, window, scale, *grads)
    return dq.reshape(query.shape), dk.reshape(key.shape), dv.reshape(value.shape), None


_attend = attention_vjp(_attend_forward, _attend_backward, nondiff_argnums=(4, 5))


def run(query, key, value, *, window_size: int, scale: float, segments: Segments | None):
    num_tokens = query.shape[1]
    if num_tokens == 0:
        return jnp.zeros(query.shape[:3] + (value.shape[3],), query.dtype)
    layout = token_layout(num_tokens, 1, segments)
    # A window longer than the sequence is the whole causal prefix.
    return _attend(query, key, value, layout.seq_start, int(min(window_size, num_tokens)), float(scale))
