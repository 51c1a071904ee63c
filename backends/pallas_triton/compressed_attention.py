"""Compressed attention (SPEC section 2) as Pallas kernels: forward, and a two-kernel backward.

A query tile packs `BT` consecutive tokens times `HP` query heads of one kv head (the group padded
to a power of two; wider groups in chunks of `HP`), at least 16 rows, so each compressed-key tile
it loads serves the whole group and small groups still fill a tensor-core dot. The tile walks the
union of its rows' visible blocks `[first_block, first_block + (pos + 1) // BS)`; a per-row mask
does the rest and keeps packed sequences apart.

Backward: `dq` re-walks the forward's range per query tile; `dk_cmp, dv_cmp` belong to one
program per block tile, which walks the tokens that can see those blocks. When the block tiles
are too few programs to fill a GPU, the tokens are split across programs that write separate
float32 partial sums, added in XLA (deterministic, no atomics). The cotangent of `lse` enters as
`delta = rowsum(do * o) - dlse`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from ejkernel_nsa import sparsity
from ejkernel_nsa.backends.common import host
from ejkernel_nsa.backends.common.containment import finite_backward_operands, finite_values
from ejkernel_nsa.backends.common.vjp import attention_vjp
from ejkernel_nsa.backends.pallas_triton import common
from ejkernel_nsa.problem import NSAProblem, Piece, Segments, token_layout

PIECE = Piece.COMPRESSED_ATTENTION

# Tiles per kernel, by padded head-dim class and whether the dots run three tf32 passes (float32
# problems, which split every operand in two): the Triton backend's pre-sweep tiles, chosen there
# to compile for Hopper without spills; not yet tuned for Pallas.
Tile = host.CompressedTile

TILES: dict[tuple[str, int, bool], Tile] = {
    ("fwd", 64, False): Tile(64, 32, 8), ("fwd", 128, False): Tile(64, 32, 4), ("fwd", 256, False): Tile(64, 16, 8),
    ("dq", 64, False): Tile(64, 32, 8), ("dq", 128, False): Tile(64, 32, 4), ("dq", 256, False): Tile(32, 16, 4),
    ("dkv", 64, False): Tile(32, 32, 4), ("dkv", 128, False): Tile(32, 32, 8), ("dkv", 256, False): Tile(16, 16, 8),
    ("fwd", 64, True): Tile(64, 16, 8), ("fwd", 128, True): Tile(16, 16, 4), ("fwd", 256, True): Tile(16, 16, 8),
    ("dq", 64, True): Tile(64, 16, 8), ("dq", 128, True): Tile(16, 16, 8), ("dq", 256, True): Tile(16, 16, 8),
    ("dkv", 64, True): Tile(16, 32, 4), ("dkv", 128, True): Tile(16, 16, 8), ("dkv", 256, True): Tile(16, 16, 8),
}


def default_tile(stage: str, head_dim: int, value_dim: int, dtype) -> Tile:
    """The tile (`TILES`) of kernel `stage` (fwd, dq, dkv) for these head dims and dtype."""
    return TILES[stage, host.head_dim_class(head_dim, value_dim), jnp.dtype(dtype) == jnp.float32]


def supports(problem: NSAProblem) -> str | None:
    return common.common_decline(problem)


def _rows_view(pos_ref, first_ref, token, row_ok, BS: int):
    """Each row's visible packed blocks `[lo, hi)` (empty for masked rows and early tokens)."""
    pos = common.load_vector(pos_ref, token, row_ok)
    lo = common.load_vector(first_ref, token, row_ok)
    hi = jnp.where(row_ok, lo + (pos + 1) // BS, lo)
    return lo, hi


def _block_tile(k_ref, v_ref, b, h, cols, col_ok, *, NB, H, DK, DV):
    rows = (b * NB + cols) * H + h
    return (common.load_rows(k_ref, rows, col_ok, common.padded_dim(DK), DK),
            common.load_rows(v_ref, rows, col_ok, common.padded_dim(DV), DV))


def _query_program(pos_ref, first_ref, *, T, NB, H, G, HP, BT, BS):
    """Forward and dq: the program's batch row and kv head, its rows, each row's visible blocks
    `[lo, hi)`, and their union `[c_lo, c_hi)` (rows without a block left out)."""
    b, h, head0 = common.group_tile(pl.program_id(1), G=G, HP=HP, H=H)
    token, row_ok, q_row = common.query_tile(b, h, pl.program_id(0) * BT, head0, T=T, H=H, G=G, HP=HP, BT=BT)
    lo, hi = _rows_view(pos_ref, first_ref, token, row_ok, BS)
    seen = hi > lo
    return b, h, row_ok, q_row, lo, hi, jnp.min(jnp.where(seen, lo, NB)), jnp.max(jnp.where(seen, hi, 0))


def _scored_block_tile(q, k_ref, v_ref, b, h, c0, c_hi, lo, hi, *, NB, H, BC, DK, DV, SCALE, PRECISION):
    """Blocks `[c0, c0 + BC)` (before `c_hi`): their keys and values, the rows' base-2 scores
    and which blocks each row sees."""
    cols = c0 + jnp.arange(BC, dtype=jnp.int32)
    k, v = _block_tile(k_ref, v_ref, b, h, cols, cols < c_hi, NB=NB, H=H, DK=DK, DV=DV)
    s2 = common.scores2(q, k, SCALE, PRECISION)
    return k, v, s2, (cols[None, :] >= lo[:, None]) & (cols[None, :] < hi[:, None])


def compressed_attention_fwd_kernel(q_ref, k_ref, v_ref, v_bad_ref, pos_ref, first_ref, o_ref, lse_ref, *,
                                    T, NB, H, G, HP, BT, BC, BS, DK, DV, SCALE, PRECISION):
    b, h, row_ok, q_row, lo, hi, c_lo, c_hi = _query_program(pos_ref, first_ref, T=T, NB=NB, H=H, G=G, HP=HP,
                                                             BT=BT, BS=BS)
    q = common.load_rows(q_ref, q_row, row_ok, common.padded_dim(DK), DK).astype(jnp.float32)

    def step(i, state):
        _, v, s2, visible = _scored_block_tile(q, k_ref, v_ref, b, h, c_lo + i * BC, c_hi, lo, hi, NB=NB, H=H,
                                               BC=BC, DK=DK, DV=DV, SCALE=SCALE, PRECISION=PRECISION)
        return common.softmax_step(state, s2, visible, v, PRECISION)

    steps = jnp.maximum(c_hi - c_lo + BC - 1, 0) // BC
    state = jax.lax.fori_loop(0, steps, step, common.softmax_init(BT * HP, common.padded_dim(DV)))
    out, lse = common.softmax_finish(state)
    out = common.poisoned(out, common.nonfinite_in(v_bad_ref, b, h, lo, hi, row_ok, N=NB, H=H))  # SPEC 8
    common.store_rows(o_ref, q_row, row_ok, out, DV)
    common.store_vector(lse_ref, q_row, row_ok, lse)


def compressed_attention_bwd_kernel_dq(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, pos_ref, first_ref,
                                       dq_ref, *, T, NB, H, G, HP, BT, BC, BS, DK, DV, SCALE, PRECISION):
    b, h, row_ok, q_row, lo, hi, c_lo, c_hi = _query_program(pos_ref, first_ref, T=T, NB=NB, H=H, G=G, HP=HP,
                                                             BT=BT, BS=BS)
    q, do, lse2, delta = common.row_grad_inputs(q_ref, do_ref, lse_ref, delta_ref, q_row, row_ok, DK, DV, jnp.float32)

    def step(i, dq):
        k, v, s2, visible = _scored_block_tile(q, k_ref, v_ref, b, h, c_lo + i * BC, c_hi, lo, hi, NB=NB, H=H,
                                               BC=BC, DK=DK, DV=DV, SCALE=SCALE, PRECISION=PRECISION)
        _, ds = common.softmax_grads(s2, lse2, visible, do, v, delta, PRECISION)
        return dq + common.dot(ds, k, PRECISION)

    steps = jnp.maximum(c_hi - c_lo + BC - 1, 0) // BC
    dq = jax.lax.fori_loop(0, steps, step, jnp.zeros((BT * HP, common.padded_dim(DK)), jnp.float32))
    common.store_rows(dq_ref, q_row, row_ok, dq * SCALE, DK)


def compressed_attention_bwd_kernel_dkv(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, pos_ref, first_ref,
                                        viewer_lo_ref, viewer_hi_ref, dk_ref, dv_ref, *,
                                        B, T, NB, H, G, HP, BT, BC, BS, DK, DV, SCALE, PRECISION, SPLIT_TOKENS):
    bh, split = pl.program_id(1), pl.program_id(2)
    b, h = common.divmod_static(bh, H)
    cols = pl.program_id(0) * BC + jnp.arange(BC, dtype=jnp.int32)
    col_ok = cols < NB
    # Tokens that can see the blocks: from a block's last token to the end of its sequence.
    # Blocks are sorted, so their union is one range; this program takes its split of it.
    t_lo = jnp.maximum(jnp.min(common.load_vector(viewer_lo_ref, cols, col_ok, T)), split * SPLIT_TOKENS)
    t_hi = jnp.minimum(jnp.max(common.load_vector(viewer_hi_ref, cols, col_ok, 0)), (split + 1) * SPLIT_TOKENS)
    k, v = _block_tile(k_ref, v_ref, b, h, cols, col_ok, NB=NB, H=H, DK=DK, DV=DV)
    head_chunks = common.cdiv(G, HP)

    def step(i, grads):
        token_tile, head_chunk = common.divmod_static(i, head_chunks)
        token, row_ok, q_row = common.query_tile(b, h, t_lo + token_tile * BT, head_chunk * HP,
                                                 T=T, H=H, G=G, HP=HP, BT=BT, end=t_hi)
        lo, hi = _rows_view(pos_ref, first_ref, token, row_ok, BS)
        q, do, lse2, delta = common.row_grad_inputs(q_ref, do_ref, lse_ref, delta_ref, q_row, row_ok, DK, DV, jnp.float32)
        visible = (cols[None, :] >= lo[:, None]) & (cols[None, :] < hi[:, None])
        return common.key_grads(grads, q, do, lse2, delta, k, v, visible, SCALE, PRECISION)

    steps = jnp.maximum(t_hi - t_lo + BT - 1, 0) // BT * head_chunks
    zeros = (jnp.zeros((BC, common.padded_dim(DK)), jnp.float32), jnp.zeros((BC, common.padded_dim(DV)), jnp.float32))
    dk, dv = jax.lax.fori_loop(0, steps, step, zeros)
    # Each split writes its own partial sums (added in XLA).
    out_rows = split * (B * NB * H) + (b * NB + cols) * H + h
    common.store_rows(dk_ref, out_rows, col_ok, dk * SCALE, DK)
    common.store_rows(dv_ref, out_rows, col_ok, dv, DV)


# ------------------------------------------------------------------------------------------------
# Launch
# ------------------------------------------------------------------------------------------------


def _config(stage: str, group: int, head_dim: int, value_dim: int, block_size: int, scale: float, dtype,
            tile: Tile | None = None) -> tuple[dict, Tile]:
    """The static arguments of one kernel (`stage` in fwd, dq, dkv) under `tile` (default:
    `default_tile`), and that tile (its launch options)."""
    tile = tile or default_tile(stage, head_dim, value_dim, dtype)
    heads = min(common.next_pow2(group), tile.rows)
    return dict(G=group, HP=heads, BT=tile.rows // heads, BC=tile.block_tile, BS=block_size, DK=head_dim,
                DV=value_dim, SCALE=float(scale), PRECISION=common.dot_precision(dtype, jnp.float32)), tile


def _launch(kernel, stage, grid, out_shape, query, k_cmp, v_cmp, *arrays, block_size, scale, tile=None, **extra):
    batch, num_tokens, num_q_heads, head_dim = query.shape
    num_blocks, num_kv_heads, value_dim = k_cmp.shape[1], k_cmp.shape[2], v_cmp.shape[3]
    config, tile = _config(stage, num_q_heads // num_kv_heads, head_dim, value_dim, block_size, scale, query.dtype,
                           tile)
    flat = [query.reshape(-1, head_dim), k_cmp.reshape(-1, head_dim), v_cmp.reshape(-1, value_dim)]
    flat += [a.reshape(-1, a.shape[-1]) if a.ndim == 4 else a.reshape(-1) for a in arrays]
    return common.pallas_call(
        kernel, grid=grid(config), out_shape=out_shape, num_warps=tile.num_warps, num_stages=tile.num_stages,
        name=f"compressed_attention_{stage}", T=num_tokens, NB=num_blocks, H=num_kv_heads, **config, **extra,
    )(*flat)


def _query_grid(query, num_kv_heads):
    batch, num_tokens = query.shape[:2]
    group = query.shape[2] // num_kv_heads

    def grid(config):
        return (common.cdiv(num_tokens, config["BT"]), batch * num_kv_heads * common.cdiv(group, config["HP"]))

    return grid


def _fwd(query, k_cmp, v_cmp, pos, first_block, block_size: int, scale: float, tile: Tile | None = None):
    batch, num_tokens, num_q_heads, _ = query.shape
    rows = batch * num_tokens * num_q_heads
    v_finite, v_bad = finite_values(v_cmp)  # SPEC 8: backends/common/containment.py
    out, lse = _launch(
        compressed_attention_fwd_kernel, "fwd", _query_grid(query, k_cmp.shape[2]),
        [jax.ShapeDtypeStruct((rows, v_cmp.shape[3]), query.dtype), jax.ShapeDtypeStruct((rows,), jnp.float32)],
        query, k_cmp, v_finite, v_bad, pos, first_block, block_size=block_size, scale=scale, tile=tile,
    )
    return out.reshape(query.shape[:3] + (v_cmp.shape[3],)), lse.reshape(query.shape[:3])


def _bwd_dq(query, k_cmp, v_cmp, d_out, lse, delta, pos, first_block, block_size, scale, tile: Tile | None = None):
    dq = _launch(
        compressed_attention_bwd_kernel_dq, "dq", _query_grid(query, k_cmp.shape[2]),
        jax.ShapeDtypeStruct((query.size // query.shape[3], query.shape[3]), query.dtype),
        query, k_cmp, v_cmp, d_out, lse, delta, pos, first_block, block_size=block_size, scale=scale, tile=tile,
    )
    return dq.reshape(query.shape)


def _bwd_dkv(query, k_cmp, v_cmp, d_out, lse, delta, pos, first_block, viewer_lo, viewer_hi, block_size, scale,
             tile: Tile | None = None):
    batch, num_tokens = query.shape[:2]
    num_blocks, num_kv_heads = k_cmp.shape[1], k_cmp.shape[2]
    config, tile = _config("dkv", query.shape[2] // num_kv_heads, query.shape[3], v_cmp.shape[3], block_size, scale,
                           query.dtype, tile)
    block_tiles = common.cdiv(num_blocks, config["BC"])
    split_tokens = host.dkv_split_tokens(num_tokens, block_tiles * batch * num_kv_heads)
    splits = common.cdiv(num_tokens, split_tokens)
    partial = splits * batch * num_blocks * num_kv_heads
    d_k, d_v = _launch(
        compressed_attention_bwd_kernel_dkv, "dkv",
        lambda config: (common.cdiv(num_blocks, config["BC"]), batch * num_kv_heads, splits),
        [jax.ShapeDtypeStruct((partial, k_cmp.shape[3]), jnp.float32),
         jax.ShapeDtypeStruct((partial, v_cmp.shape[3]), jnp.float32)],
        query, k_cmp, v_cmp, d_out, lse, delta, pos, first_block, viewer_lo, viewer_hi,
        block_size=block_size, scale=scale, tile=tile, B=batch, SPLIT_TOKENS=split_tokens,
    )
    return (d_k.reshape((splits,) + k_cmp.shape).sum(axis=0), d_v.reshape((splits,) + v_cmp.shape).sum(axis=0))


def _attend_forward(query, k_cmp, v_cmp, pos, first_block, viewer_lo, viewer_hi, block_size: int, scale: float):
    out, lse = _fwd(query, k_cmp, v_cmp, pos, first_block, block_size, scale)
    return out, lse, (query, k_cmp, v_cmp, pos, first_block, viewer_lo, viewer_hi)


def _attend_backward(block_size, scale, saved, d_out, lse, delta):
    query, k_cmp, v_cmp, pos, first_block, viewer_lo, viewer_hi = saved
    k_cmp, v_cmp, lse, delta = finite_backward_operands(k_cmp, v_cmp, lse, delta)  # SPEC 8
    dq = _bwd_dq(query, k_cmp, v_cmp, d_out, lse, delta, pos, first_block, block_size, scale)
    dk, dv = _bwd_dkv(query, k_cmp, v_cmp, d_out, lse, delta, pos, first_block, viewer_lo, viewer_hi,
                      block_size, scale)
    return dq, dk, dv, None, None, None, None


# The lse is an output too (the selection reads it); its cotangent is folded into delta.
_attend = attention_vjp(_attend_forward, _attend_backward, nondiff_argnums=(7, 8), returns_lse=True)


def run(query, k_cmp, v_cmp, *, block_size: int, scale: float, segments: Segments | None):
    batch, num_tokens, num_q_heads, _ = query.shape
    if num_tokens == 0 or k_cmp.shape[1] == 0:
        return (jnp.zeros(query.shape[:3] + (v_cmp.shape[3],), query.dtype),
                jnp.full(query.shape[:3], -jnp.inf, jnp.float32))
    layout = token_layout(num_tokens, block_size, segments)
    viewer_lo, viewer_hi = sparsity.block_viewers(num_tokens, block_size, segments)
    # The kernels read float32 blocks (mean_pool's output); the cast carries the gradient back.
    k_cmp, v_cmp = k_cmp.astype(jnp.float32), v_cmp.astype(jnp.float32)
    return _attend(query, k_cmp, v_cmp, layout.pos, layout.first_block, viewer_lo, viewer_hi, block_size,
                   float(scale))
