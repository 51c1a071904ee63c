"""Top-k block selection (SPEC section 3) as one Pallas kernel.

Each program owns a tile of `BT` tokens of one kv head, the group's query heads packed under each
token (`GP` rows per token, the group padded to a power of two), and walks the compressed blocks
that any of its tokens may choose, `BC` at a time. Per step it recomputes the compressed-attention
probabilities from the scores and the branch's log-sum-exp, sums them over the group, sets the
forced blocks to `G`, and folds the step into a running top-k per token held in registers: no
`[T, num_blocks]` score matrix exists in memory.

The Triton lowering has no sort, and 64-bit keys need x64, so the running top-k is merged by
selection: `TOPK` rounds, each taking the largest (score, block) pair of the running list and the
step's candidates, compared as score first and then block index, so equal scores go to the later
block (the contract's tie rule). A step none of whose candidates can enter a token's list (none
scores at least the current k-th best) skips the merge.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from ejkernel_nsa.backends.common import host
from ejkernel_nsa.backends.common.host import NO_BLOCK
from ejkernel_nsa.backends.pallas_triton import common
from ejkernel_nsa.problem import NSAProblem, Piece, Segments, token_layout

PIECE = Piece.SELECTION

# Query rows per program (tokens x padded group), halved for head dims above 128.
_ROWS = 64
# Compressed blocks scored per step (at least TOPK).
_BLOCKS = 32
# The merge costs TOPK rounds over TOPK + BC pairs per step: beyond this it stops paying.
_MAX_SLOTS = 128


def _take_best(lists, slot, j, out):
    """Round `j` of the merge: move the largest (score, block) pair of `lists` into slot `j`."""
    score = lists[0][0].max(axis=1)
    for s, _ in lists[1:]:
        score = jnp.maximum(score, s.max(axis=1))
    block = jnp.full(score.shape, NO_BLOCK, jnp.int32)
    for s, b in lists:
        block = jnp.maximum(block, jnp.max(jnp.where(s == score[:, None], b, NO_BLOCK), axis=1))
    out_score, out_block = out
    here = slot[None, :] == j
    out = (jnp.where(here, score[:, None], out_score), jnp.where(here, block[:, None], out_block))
    # Blocks are distinct across the lists, so this removes exactly the pair just taken (its
    # block too: an exhausted list must not offer it again at score -inf).
    taken = [(s == score[:, None]) & (b == block[:, None]) for s, b in lists]
    lists = [(jnp.where(t, -jnp.inf, s), jnp.where(t, NO_BLOCK, b)) for (s, b), t in zip(lists, taken)]
    return lists, out


def _merge(top, step, TOPK: int):
    """The best TOPK of the running list `top` and the step's candidates, best first."""
    slot = jnp.arange(TOPK, dtype=jnp.int32)

    def round_(j, carry):
        running, candidates, out = carry
        (running, candidates), out = _take_best([running, candidates], slot, j, out)
        return running, candidates, out

    empty = (jnp.full_like(top[0], -jnp.inf), jnp.full_like(top[1], NO_BLOCK))
    return jax.lax.fori_loop(0, TOPK, round_, (top, step, empty))[2]


def block_selection_fwd_kernel(q_ref, k_ref, lse_ref, counts_ref, pos_ref, first_ref, out_ref, *,
                               T, NB, H, G, GP, BT, BC, BS, DK, NUM_OUT, TOPK, SCALE, PRECISION):
    b, h = common.divmod_static(pl.program_id(1), H)
    t0 = pl.program_id(0) * BT
    row_token, row_ok, q_row = common.query_tile(b, h, t0, 0, T=T, H=H, G=G, HP=GP, BT=BT)
    q = common.load_rows(q_ref, q_row, row_ok, common.padded_dim(DK), DK).astype(jnp.float32)
    lse = common.load_vector(lse_ref, q_row, row_ok, 0.0)
    # -inf: the token sees no complete block, so all its probabilities are masked anyway.
    lse = jnp.where(lse == -jnp.inf, 0.0, lse)
    row_first = common.load_vector(first_ref, row_token, row_ok)
    row_end = row_first + (common.load_vector(pos_ref, row_token, row_ok) + 1) // BS

    tokens = t0 + jnp.arange(BT, dtype=jnp.int32)
    token_ok = tokens < T
    first = common.load_vector(first_ref, tokens, token_ok)
    current = common.load_vector(pos_ref, tokens, token_ok) // BS
    # The blocks any token of the tile may choose: sequences are packed in order, so both ends
    # of a token's candidate range grow along the tokens.
    tail = jnp.minimum(t0 + BT, T) - 1
    lo = first_ref[t0]
    hi = first_ref[tail] + pos_ref[tail] // BS + 1
    offsets = jnp.arange(BC, dtype=jnp.int32)

    def step(i, top):
        blocks = lo + i * BC + offsets
        k = common.load_rows(k_ref, (b * NB + blocks) * H + h, blocks < NB, common.padded_dim(DK), DK)
        s = common.dot(q, k, PRECISION, trans_b=True)
        visible = row_ok[:, None] & (blocks[None, :] >= row_first[:, None]) & (blocks[None, :] < row_end[:, None])
        p = jnp.where(visible, jnp.exp(s * SCALE - lse[:, None]), 0.0)
        score = jnp.sum(p.reshape(BT, GP, BC), axis=1)
        local = blocks[None, :] - first[:, None]
        candidate = token_ok[:, None] & (local >= 0) & (local <= current[:, None])
        forced = (local == 0) | (local == current[:, None] - 1) | (local == current[:, None])
        score = jnp.where(candidate, jnp.where(forced, float(G), score), -jnp.inf)
        candidates = (score, jnp.where(candidate, local, NO_BLOCK))
        # Blocks grow along the walk, so a candidate equal to the k-th best score also enters.
        kth = jnp.min(top[0], axis=1)
        # (A max over ints: the Triton lowering has no boolean reductions.)
        enters = jnp.max((candidate & (score >= kth[:, None])).astype(jnp.int32)) > 0
        return jax.lax.cond(enters, lambda: _merge(top, candidates, TOPK), lambda: top)

    empty = (jnp.full((BT, TOPK), -jnp.inf, jnp.float32), jnp.full((BT, TOPK), NO_BLOCK, jnp.int32))
    _, top_block = jax.lax.fori_loop(0, jnp.maximum(hi - lo + BC - 1, 0) // BC, step, empty)

    counts = common.load_vector(counts_ref, (b * T + tokens) * H + h, token_ok)
    slot = jnp.arange(TOPK, dtype=jnp.int32)
    chosen = (top_block >= 0) & (slot[None, :] < counts[:, None])
    common.store_rows(out_ref, (b * T + tokens) * H + h, token_ok, jnp.where(chosen, top_block, NO_BLOCK), NUM_OUT)


@dataclasses.dataclass(frozen=True)
class Tiles:
    """`block_selection_fwd_kernel`'s tiles: `tokens` x `group_padded` query rows per program,
    `blocks` compressed blocks scored per step, a running top-`topk`."""

    group_padded: int
    tokens: int
    blocks: int
    topk: int
    num_warps: int = 4
    num_stages: int = 2

    def constexprs(self) -> dict:
        return dict(GP=self.group_padded, BT=self.tokens, BC=self.blocks, TOPK=self.topk)


def default_tiles(group: int, head_dim: int, num_out: int) -> Tiles:
    topk = common.next_pow2(num_out)
    rows = _ROWS if common.padded_dim(head_dim) <= 128 else _ROWS // 2
    group_padded = common.next_pow2(group)
    tokens = max(1, rows // group_padded)
    # `tt.dot` needs at least 16 rows: pad the group with masked heads if need be.
    group_padded = max(group_padded, 16 // tokens)
    return Tiles(group_padded=group_padded, tokens=tokens, blocks=max(topk, _BLOCKS), topk=topk)


def supports(problem: NSAProblem) -> str | None:
    return (common.common_decline(problem)
            or host.too_many_candidates(problem, _MAX_SLOTS, "the running top-k is merged in registers"))


def run(query, k_cmp, lse, *, block_counts, num_slots: int, block_size: int, scale: float, segments: Segments | None):
    batch, num_tokens, num_q_heads, head_dim = query.shape
    num_blocks, num_kv_heads = k_cmp.shape[1:3]
    num_out = host.selection_outputs(num_slots, num_blocks)
    if num_tokens == 0 or num_out == 0:
        return jnp.full((batch, num_tokens, num_kv_heads, num_slots), NO_BLOCK, jnp.int32)
    layout = token_layout(num_tokens, block_size, segments)
    counts = host.block_counts_array(block_counts, batch, num_tokens, num_kv_heads)
    tiles = default_tiles(num_q_heads // num_kv_heads, head_dim, num_out)
    chosen = common.pallas_call(
        block_selection_fwd_kernel, grid=(common.cdiv(num_tokens, tiles.tokens), batch * num_kv_heads),
        out_shape=jax.ShapeDtypeStruct((batch * num_tokens * num_kv_heads, num_out), jnp.int32),
        num_warps=tiles.num_warps, num_stages=tiles.num_stages, name="block_selection_fwd",
        T=num_tokens, NB=num_blocks, H=num_kv_heads, G=num_q_heads // num_kv_heads, BS=block_size, DK=head_dim,
        NUM_OUT=num_out, SCALE=float(scale), PRECISION=common.dot_precision(query.dtype, jnp.float32),
        **tiles.constexprs(),
    )(query.reshape(-1, head_dim), k_cmp.astype(jnp.float32).reshape(-1, head_dim),
      lse.astype(jnp.float32).reshape(-1), counts.reshape(-1), layout.pos, layout.first_block)
    return host.pad_slots(chosen.reshape(batch, num_tokens, num_kv_heads, num_out), num_slots)
