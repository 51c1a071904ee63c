"""Top-k block selection (SPEC section 3) as one Triton kernel.

Each program owns a tile of tokens and one kv head, with the query heads of its group packed
under the tokens, and walks the compressed blocks that any of its tokens may choose. Per block
tile it recomputes the compressed-attention probabilities from the scores and the branch's
log-sum-exp, sums them over the group, and folds the tile into a running top-k per token kept
in registers; no `[T, num_blocks]` score matrix is ever written.

The running top-k sorts one integer key per candidate: the score's float32 bits (scores are >= 0,
so their bits order like the floats) above the local block index. When the index fits 11 bits
(up to 2048 candidate blocks) the key is 32 bits (the score's low 11 mantissa bits give way to
the index: ties are then scores within 2^-12 (2.4e-4) relative, inside SPEC 8's selection margin),
else 64; the sort is the kernel's ALU-bound part (ncu, H200, G=1, T=64k: 8.8 -> 5.1 ms). Sorting keys descending ranks by score and,
among equal scores, by the larger block index, which is the contract's tie rule; -1 marks a
slot with no candidate.

The softmax scale is a constexpr (one compile per scale, as per head dim). The scores are dots
in the problem's dtype: for bf16/fp16 problems `run` rounds the float32 compressed keys to the
query's dtype once, and the kernel multiplies the 16-bit queries and keys with float32
accumulation, at twice the tf32 rate and with half the key loads. Compressed attention rounds
its blocks the same way, so the scores and the lse they are normalized by come from the same
keys. Everything after the dot (exp against the lse, the group sum, the top-k) is float32.
Float32 problems keep float32 operands and three tf32 passes (`launch.dot_precision`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import triton
import triton.language as tl

from ejkernel_nsa.backends.common import host
from ejkernel_nsa.backends.common.host import NO_BLOCK
from ejkernel_nsa.backends.triton import launch
from ejkernel_nsa.geometry import geometry_of
from ejkernel_nsa.problem import NSAProblem, Piece, Segments, num_compressed_blocks, token_layout

PIECE = Piece.SELECTION

_NO_BLOCK = tl.constexpr(NO_BLOCK)  # the same, as kernels may read it
# Query rows (tokens x padded group) per program: one warpgroup's wgmma tile. Measured on an
# H100 (T=32k, S=16): 64 rows, 32 blocks a step and 4 warps beat 128 rows, 16 or 64 blocks, and
# 8 warps by 10-70%.
_ROWS = 64
_NUM_WARPS = 4
# Compressed blocks scored per step (halved for head dims above 128); also the width that each
# step's top-k is taken from, so at least k.
_BLOCKS = 32
# Bound on a step's keys, [tokens, blocks] int64, which live in registers with the running top-k.
_KEYS = 4096
# SPEC 9's transfer scores (l'/d + l/d - 1) compressed blocks per selection block, so a step loads
# that many times the keys: bound by those loads, it wants more query rows per program and fewer
# blocks per step. H200, G=16, the paper's l=32, d=16, l'=64, T=64k (benchmarks/NOTES.md): 128 rows,
# 16 blocks, 8 warps 20.3 ms; the default 64 / 32 / 4 took 25.8, 256 / 16 / 8 29.7, 128 / 32 / 8
# 24.3. Measured at G=16 only.
_TRANSFER_TILES = dict(rows=128, blocks=16, num_warps=8)
# Beyond this many slots the top-k network no longer fits in registers (spills at 256 already).
_MAX_SLOTS = 256


@triton.jit
def _block_scores(q, q_ptr, k_ptr, row_q, row_ok, b, h, blocks, block_ok, NB,
                  H: tl.constexpr, DK: tl.constexpr, BD: tl.constexpr, DC: tl.constexpr, ROWS: tl.constexpr,
                  BC: tl.constexpr, PRECISION: tl.constexpr):
    """`[ROWS, BC]` unscaled scores of the rows against packed compressed blocks `blocks`."""
    dims = tl.arange(0, DC)
    k_rows = ((b * NB + blocks.to(tl.int64)) * H + h) * DK
    if DC == BD:
        k = tl.load(k_ptr + k_rows[None, :] + dims[:, None], mask=block_ok[None, :] & (dims < DK)[:, None], other=0.0)
        s = tl.dot(q, k, input_precision=PRECISION)
    else:
        # Wide heads: the dot runs over head-dim chunks, each chunk of the queries reloaded
        # (from cache) so that no [ROWS, BD] operand is held in registers.
        s = tl.zeros([ROWS, BC], tl.float32)
        for d0 in tl.static_range(0, BD, DC):
            d = d0 + dims
            q = tl.load(q_ptr + row_q[:, None] * DK + d[None, :], mask=row_ok[:, None] & (d < DK)[None, :], other=0.0)
            k = tl.load(k_ptr + k_rows[None, :] + d[:, None], mask=block_ok[None, :] & (d < DK)[:, None], other=0.0)
            s = tl.dot(q, k, s, input_precision=PRECISION)
    return s


@triton.jit
def block_selection_fwd_kernel(
    q_ptr,  # [B, T, HQ, DK]
    k_ptr,  # [B, NB, H, DK] in the query's dtype, packed compressed keys
    lse_ptr,  # [B, T, HQ] float32, the compressed branch's log-sum-exp
    counts_ptr,  # [B, T, H] int32, blocks to choose
    pos_ptr,  # [T] int32, position in the token's sequence
    first_block_ptr,  # [T] int32, the sequence's first block on the packed axis
    sel_first_ptr,  # [T] int32 (TAPS > 0): the sequence's first selection block on the packed selection axis
    tap_base_ptr,  # [NBS] int32 (TAPS > 0): each selection block's compressed block j * l'/d, packed
    tap_weight_ptr,  # [TAPS] float32 (TAPS > 0): |C_i ∩ S_j| / l for i = j * l'/d + TAP0 + t
    T,
    NB,
    NBS,
    out_ptr,  # [B, T, H, NUM_OUT] int32, local block indices
    H: tl.constexpr,
    G: tl.constexpr,
    DK: tl.constexpr,
    SCALE: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    NUM_OUT: tl.constexpr,
    GP: tl.constexpr,
    BT: tl.constexpr,
    BC: tl.constexpr,
    BD: tl.constexpr,
    DC: tl.constexpr,
    TOPK: tl.constexpr,
    PRECISION: tl.constexpr,
    INDEX_BITS: tl.constexpr,
    TAPS: tl.constexpr,  # 0: SPEC 3 (compressed block = selection block); else SPEC 9's transfer
    TAP0: tl.constexpr,
    CL: tl.constexpr,
    STRIDE: tl.constexpr,
):
    tile = tl.program_id(0)
    batch_head = tl.program_id(1)
    b = (batch_head // H).to(tl.int64)
    h = batch_head % H
    HQ: tl.constexpr = H * G
    ROWS: tl.constexpr = BT * GP

    # Rows are (token, query head of the group) pairs, token-major, so that the group sum is a
    # reduction over the middle axis of a [BT, GP, BC] view.
    rows = tl.arange(0, ROWS)
    row_token = tile * BT + rows // GP
    row_head = rows % GP
    row_ok = (row_token < T) & (row_head < G)
    row_q = (b * T + row_token.to(tl.int64)) * HQ + h * G + row_head
    dims = tl.arange(0, DC)
    if DC == BD:
        q = tl.load(q_ptr + row_q[:, None] * DK + dims[None, :], mask=row_ok[:, None] & (dims < DK)[None, :], other=0.0)
    lse = tl.load(lse_ptr + row_q, mask=row_ok, other=0.0)
    # -inf: the token sees no complete block, so every probability below is masked anyway.
    lse = tl.where(lse > float("-inf"), lse, 0.0)
    row_first = tl.load(first_block_ptr + row_token, mask=row_ok, other=0)
    row_pos = tl.load(pos_ptr + row_token, mask=row_ok, other=0)
    if TAPS == 0:
        row_visible_end = row_first + (row_pos + 1) // BLOCK_SIZE
        first_ptr = first_block_ptr
    else:
        # SPEC 9: compressed blocks of CL tokens at STRIDE, complete once i * STRIDE + CL <= pos + 1
        # (cut off explicitly: integer division truncates toward zero). Candidates are selection
        # blocks, on their own packed axis.
        row_visible_end = row_first + tl.where(row_pos + 1 >= CL, (row_pos + 1 - CL) // STRIDE + 1, 0)
        first_ptr = sel_first_ptr

    tokens = tile * BT + tl.arange(0, BT)
    token_ok = tokens < T
    first = tl.load(first_ptr + tokens, mask=token_ok, other=0)
    current = tl.load(pos_ptr + tokens, mask=token_ok, other=0) // BLOCK_SIZE

    # The global blocks that any token of the tile may choose. Sequences are packed in order (as
    # `token_layout` makes them), so both ends of a token's range never decrease along the
    # tokens: the tile's first token starts it and its last token ends it. (Scalars, not
    # reductions: Triton's interpreter could not take a reduced value as a loop bound.)
    head = tile * BT
    tail = tl.minimum(head + BT, T) - 1
    lo = tl.load(first_ptr + head)
    hi = tl.load(first_ptr + tail) + tl.load(pos_ptr + tail) // BLOCK_SIZE + 1

    # Keys: int64 (the score's 31 value bits above a 32-bit block index), or, when the packed axis
    # fits INDEX_BITS <= 11 bits, int32 (the score's top 31 - INDEX_BITS bits above the index):
    # half the registers and shuffles in the sort. 20 score bits keep 12 mantissa bits, a
    # relative 2.4e-4, inside the contract's near-tie band (1e-3 * G on scores of at most G).
    KEY: tl.constexpr = tl.int32 if INDEX_BITS <= 11 else tl.int64
    SHIFT: tl.constexpr = INDEX_BITS if INDEX_BITS <= 11 else 32
    DROP: tl.constexpr = INDEX_BITS if INDEX_BITS <= 11 else 0
    top = tl.full([BT, TOPK], _NO_BLOCK, KEY)
    offsets = tl.arange(0, BC)
    if DC != BD:
        q = tl.zeros([ROWS, DC], q_ptr.dtype.element_ty)  # unused: wide heads load chunks
    for start in range(lo, hi, BC):
        blocks = start + offsets
        if TAPS == 0:
            s = _block_scores(q, q_ptr, k_ptr, row_q, row_ok, b, h, blocks, blocks < NB, NB, H, DK, BD, DC, ROWS, BC,
                              PRECISION)
            visible = row_ok[:, None] & (blocks[None, :] >= row_first[:, None]) & (blocks[None, :] < row_visible_end[:, None])
            p = tl.where(visible, tl.exp(s * SCALE - lse[:, None]), 0.0)
            score = tl.sum(tl.reshape(p, [BT, GP, BC]), axis=1)
        else:
            # The score transfer, fused: selection block j sums the group's probabilities of the
            # compressed blocks j * l'/d + TAP0 + t that overlap it, each by its overlap weight.
            base = tl.load(tap_base_ptr + blocks, mask=blocks < NBS, other=0)
            score = tl.zeros([BT, BC], tl.float32)
            for t in tl.static_range(TAPS):
                cmp = base + (TAP0 + t)
                cmp_ok = (blocks < NBS) & (cmp >= 0) & (cmp < NB)
                s = _block_scores(q, q_ptr, k_ptr, row_q, row_ok, b, h, cmp, cmp_ok, NB, H, DK, BD, DC, ROWS, BC,
                                  PRECISION)
                visible = row_ok[:, None] & cmp_ok[None, :] & (cmp[None, :] >= row_first[:, None]) & (
                    cmp[None, :] < row_visible_end[:, None])
                p = tl.where(visible, tl.exp(s * SCALE - lse[:, None]), 0.0)
                score += tl.load(tap_weight_ptr + t) * tl.sum(tl.reshape(p, [BT, GP, BC]), axis=1)

        local = blocks[None, :] - first[:, None]
        candidate = token_ok[:, None] & (local >= 0) & (local <= current[:, None])
        forced = (local == 0) | (local == current[:, None] - 1) | (local == current[:, None])
        score = tl.where(forced, G * 1.0, score)
        # A sum of non-negative terms is +0.0 or positive; the `where` also keeps -0.0 out.
        bits = (tl.where(score > 0.0, score.to(tl.int32, bitcast=True), 0) >> DROP).to(KEY)
        keys = tl.where(candidate, (bits << SHIFT) | local.to(KEY), _NO_BLOCK)

        # A step that beats no token's current k-th best leaves the top-k as it is: skip the sort
        # (exact; it pays off once the attention concentrates on a few blocks).
        kth = tl.min(top, axis=1)
        if tl.max(tl.where(keys > kth[:, None], 1, 0)) > 0:
            if TOPK == 1:
                top = tl.maximum(top, tl.max(keys, axis=1, keep_dims=True))
            else:
                best = tl.topk(keys, TOPK)
                # Both lists are sorted descending: the elementwise max of one and the other
                # reversed holds the top TOPK of their union, as a bitonic sequence that one
                # merge sorts.
                top = tl.bitonic_merge(tl.maximum(top, tl.flip(best, 1)), descending=True)

    slots = tl.arange(0, TOPK)
    counts = tl.load(counts_ptr + (b * T + tokens) * H + h, mask=token_ok, other=0)
    chosen = (top >= 0) & (slots[None, :] < counts[:, None])
    # The low SHIFT bits of a key are its block index.
    index = tl.where(chosen, (top & ((1 << SHIFT) - 1)).to(tl.int32), _NO_BLOCK)
    out = ((b * T + tokens.to(tl.int64)) * H + h) * NUM_OUT
    tl.store(out_ptr + out[:, None] + slots[None, :], index, mask=token_ok[:, None] & (slots < NUM_OUT)[None, :])


@dataclasses.dataclass(frozen=True)
class Tiles:
    """`block_selection_fwd_kernel`'s tiles: `tokens` x `group_padded` rows, `blocks` compressed
    blocks per step, head dims padded to `dim_padded` and taken `dim_chunk` at a time, a running
    top-`topk`. Benchmarks pass explicit ones; tiles never change which blocks are chosen."""

    group_padded: int
    tokens: int
    blocks: int
    dim_padded: int
    dim_chunk: int
    topk: int
    num_warps: int = _NUM_WARPS
    num_stages: int = 2
    # 32-bit sort keys where the packed block axis allows (see the kernel); False forces 64 bits.
    narrow_keys: bool = True

    def constexprs(self) -> dict[str, int]:
        return dict(GP=self.group_padded, BT=self.tokens, BC=self.blocks, BD=self.dim_padded, DC=self.dim_chunk,
                    TOPK=self.topk)


def default_tiles(group: int, head_dim: int, num_out: int, dtype, *, rows: int = _ROWS, blocks: int = _BLOCKS,
                  num_warps: int = _NUM_WARPS) -> Tiles:
    """The tiles for a shape: `rows` query rows (tokens x padded group) and `blocks` compressed
    blocks a step (halved for head dims above 128)."""
    padded_dim = launch.next_pow2(max(head_dim, 16))
    # Float32 dots run as three tf32 passes over split operands: half the chunk for the same
    # registers.
    chunk = min(padded_dim, 128 if jnp.dtype(dtype).itemsize < 4 else 64)
    topk = launch.next_pow2(num_out)
    step = max(topk, blocks if padded_dim <= 128 else blocks // 2)
    group_padded = launch.next_pow2(group)
    tokens = max(1, rows // group_padded)
    # The per-step keys, [tokens, blocks] int64, stay within _KEYS elements...
    tokens = max(1, min(tokens, _KEYS // step))
    # ...and `tl.dot` gets at least 16 rows, the group padded with masked heads if need be.
    group_padded = max(group_padded, 16 // tokens)
    return Tiles(group_padded=group_padded, tokens=tokens, blocks=step, dim_padded=padded_dim, dim_chunk=chunk,
                 topk=topk, num_warps=num_warps)


def _block_selection_fwd(query, k_cmp, lse, counts, pos, first_block, *, num_out: int, block_size: int, scale: float,
                         tiles: Tiles | None = None, transfer: "Transfer | None" = None):
    batch, num_tokens, num_q_heads, head_dim = query.shape
    num_blocks, num_kv_heads = k_cmp.shape[1:3]
    group = num_q_heads // num_kv_heads
    if tiles is None:
        tiles = default_tiles(group, head_dim, num_out, query.dtype, **({} if transfer is None else _TRANSFER_TILES))
    if transfer is None:
        # SPEC 3: the transfer's inputs are unused (TAPS=0); any arrays of the right kind fill them.
        sel_first, tap_base, tap_weight, num_selection_blocks = first_block, first_block, lse, num_blocks
        geometry = dict(TAPS=0, TAP0=0, CL=block_size, STRIDE=block_size)
    else:
        sel_first, tap_base, tap_weight = transfer.sel_first, transfer.tap_base, transfer.tap_weight
        num_selection_blocks = transfer.tap_base.shape[0]
        geometry = dict(TAPS=transfer.tap_weight.shape[0], TAP0=transfer.first_tap, CL=transfer.length,
                        STRIDE=transfer.stride)
    return launch.triton_call(
        query, k_cmp, lse, counts, pos, first_block, sel_first, tap_base, tap_weight, num_tokens, num_blocks,
        num_selection_blocks,
        kernel=block_selection_fwd_kernel,
        out_shape=jax.ShapeDtypeStruct((batch, num_tokens, num_kv_heads, num_out), jnp.int32),
        grid=(launch.cdiv(num_tokens, tiles.tokens), batch * num_kv_heads),
        H=num_kv_heads, G=group, DK=head_dim, SCALE=float(scale), BLOCK_SIZE=block_size, NUM_OUT=num_out,
        PRECISION=launch.dot_precision(query.dtype), **tiles.constexprs(),
        INDEX_BITS=index_bits(num_selection_blocks, tiles.narrow_keys), **geometry,
        num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )


@dataclasses.dataclass(frozen=True)
class Transfer:
    """SPEC 9's inputs of the kernel: per token its sequence's first selection block (packed
    selection axis), per selection block its compressed block `j * l'/d` on the packed compressed
    axis, and the stencil's weights for the taps `first_tap, first_tap + 1, ...`."""

    sel_first: jax.Array
    tap_base: jax.Array
    tap_weight: jax.Array
    first_tap: int
    length: int
    stride: int


def _transfer(num_tokens: int, block_size: int, length: int, stride: int, segments: Segments | None) -> Transfer:
    taps = geometry_of(block_size, length, stride).transfer_taps()
    ratio = block_size // stride
    num_selection_blocks = num_compressed_blocks(num_tokens, block_size, None if segments is None else segments.num_seqs)
    selection = jnp.arange(num_selection_blocks, dtype=jnp.int32)
    if segments is None:
        tap_base = selection * ratio
    else:
        sel_offsets, cmp_offsets = segments.block_offsets(block_size), segments.block_offsets(stride)
        # The unused tail lands past the last sequence; its blocks are never candidates.
        seq = jnp.minimum(jnp.searchsorted(sel_offsets[1:], selection, side="right"), segments.num_seqs - 1)
        tap_base = cmp_offsets[seq] + (selection - sel_offsets[seq]) * ratio
    return Transfer(
        sel_first=token_layout(num_tokens, block_size, segments).first_block,
        tap_base=tap_base.astype(jnp.int32),
        tap_weight=jnp.asarray([weight for _, weight in taps], jnp.float32),
        first_tap=taps[0][0], length=length, stride=stride,
    )


def index_bits(num_blocks: int, narrow_keys: bool = True) -> int:
    """The kernel's INDEX_BITS: the bits of a local block index when 32-bit keys can hold it
    (at most 11, i.e. 2048 blocks), else 32 (64-bit keys)."""
    bits = max(1, (num_blocks - 1).bit_length())
    return bits if narrow_keys and bits <= 11 else 32


def supports(problem: NSAProblem) -> str | None:
    return (launch.common_decline(problem)
            or host.too_many_candidates(problem, _MAX_SLOTS, "the running top-k lives in registers"))


# SPEC section 9: compressed blocks of length l at stride d, selection blocks of block_size, the
# score transfer fused into the kernel (no [T, NB] score matrix).
COMPRESSION_GEOMETRY = True


def run(query, k_cmp, lse, *, block_counts, num_slots: int, block_size: int, scale: float, segments: Segments | None,
        tiles: Tiles | None = None, compress_block_size: int | None = None, compress_stride: int | None = None):
    batch, num_tokens = query.shape[:2]
    num_blocks, num_kv_heads = k_cmp.shape[1:3]
    length = compress_block_size or block_size
    stride = compress_stride or length
    transfer = None
    if (length, stride) != (block_size, block_size):
        transfer = _transfer(num_tokens, block_size, length, stride, segments)
        # The candidates are selection blocks: at most as many as their packed axis holds.
        num_blocks = transfer.tap_base.shape[0]
    layout = token_layout(num_tokens, stride, segments)
    counts = host.block_counts_array(block_counts, batch, num_tokens, num_kv_heads)
    num_out = host.selection_outputs(num_slots, num_blocks)
    # One dtype for both dot operands: 16-bit keys for 16-bit queries (as compressed attention
    # rounds them for the lse), float32 for float32 problems. No gradient flows through here.
    chosen = _block_selection_fwd(
        query, k_cmp.astype(query.dtype), lse.astype(jnp.float32), counts, layout.pos, layout.first_block,
        num_out=num_out, block_size=block_size, scale=scale, tiles=tiles, transfer=transfer,
    )
    return host.pad_slots(chosen, num_slots)


def compile_specs() -> list[launch.CompileSpec]:
    specs = []
    cases = [
        # dtype, G, Dk, block size, slots
        ("float32", 1, 64, 64, 16),
        ("bfloat16", 1, 128, 64, 16),
        ("bfloat16", 3, 128, 16, 16),
        ("float16", 16, 192, 64, 16),
        ("bfloat16", 16, 128, 128, 5),
        ("float32", 32, 256, 64, 16),
        ("bfloat16", 4, 256, 64, 1),
        ("bfloat16", 2, 128, 64, 64),
        ("float16", 1, 64, 16, 256),
        ("bfloat16", 64, 128, 64, 1),
    ]
    # The last case: the paper's l=32, d=16, l'=64 (SPEC 9), a five-tap transfer.
    cases.append(("bfloat16", 16, 128, 64, 16, (5, -1, 32, 16)))
    for dtype, group, head_dim, block_size, slots, *geometry in cases:
        taps, first_tap, length, stride = geometry[0] if geometry else (0, 0, block_size, block_size)
        tiles = default_tiles(group, head_dim, slots, dtype, **(_TRANSFER_TILES if geometry else {}))
        signature = {
            "q_ptr": launch.pointer(dtype), "k_ptr": launch.pointer(dtype), "lse_ptr": "*fp32", "counts_ptr": "*i32",
            "pos_ptr": "*i32", "first_block_ptr": "*i32", "sel_first_ptr": "*i32", "tap_base_ptr": "*i32",
            "tap_weight_ptr": "*fp32", "T": "i32", "NB": "i32", "NBS": "i32",
            "out_ptr": "*i32",
        }
        constexprs = dict(H=4, G=group, DK=head_dim, SCALE=head_dim**-0.5, BLOCK_SIZE=block_size, NUM_OUT=slots,
                          PRECISION=launch.dot_precision(dtype), **tiles.constexprs(),
                          INDEX_BITS=10 if slots < 64 else 32, TAPS=taps, TAP0=first_tap, CL=length,
                          STRIDE=stride)
        specs.append(launch.CompileSpec(
            f"fwd_{dtype}_g{group}_d{head_dim}_bs{block_size}_s{slots}" + (f"_l{length}_d{stride}" if taps else ""),
            block_selection_fwd_kernel,
            signature, constexprs, num_warps=tiles.num_warps, num_stages=tiles.num_stages,
        ))
    return specs
