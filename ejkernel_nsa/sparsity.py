"""Which keys each token reads, turned around: the bookkeeping that the kernel backends' backward
passes share, in plain `jnp` with static shapes (jit-safe, traced `cu_seqlens` included).

- `SelectedBlocks`: a selection with its quotas and the token and block layouts, the integer
  (non-differentiable) input of a selected-attention `custom_vjp`;
- `counted_slots`: which slots of a selection count (SPEC section 4);
- `reader_pairs_by_key_block` / `readers_by_key_block`: the selection inverted, the (token,
  slot) pairs (or the tokens) that read each key block;
- `reader_tiles`: that inverted list cut into load-balanced work tiles of one key block each;
- `block_viewers`: the tokens that can see each compressed block (SPEC section 2).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from ejkernel_nsa.problem import Segments, block_layout, token_layout


class SelectedBlocks(NamedTuple):
    indices: jax.Array  # [B, T, H, S] int32, local block indices
    counts: jax.Array  # [B, T, H] int32, the quota n
    pos: jax.Array  # [T]: each token's position in its sequence
    seq_start: jax.Array  # [T]: its sequence's first token
    first_block: jax.Array  # [T]: its sequence's first block on the packed axis
    block_start: jax.Array  # [NB]: first key row of each packed key block
    block_len: jax.Array  # [NB]: its number of keys (0 for the unused tail)


def counted_slots(sel: SelectedBlocks, block_size: int) -> jax.Array:
    """`[B, T, H, S]`: a slot counts when it is within the quota, names a block in `[0, IC]`,
    and no earlier slot names the same block."""
    slot = jnp.arange(sel.indices.shape[-1])
    current = (sel.pos // block_size)[None, :, None, None]
    valid = (slot < sel.counts[..., None]) & (sel.indices >= 0) & (sel.indices <= current)
    same = sel.indices[..., :, None] == sel.indices[..., None, :]
    repeat = jnp.any(same & (slot[None, :] < slot[:, None]) & valid[..., None, :], axis=-1)
    return valid & ~repeat


def reader_pairs_by_key_block(sel: SelectedBlocks, block_size: int) -> tuple[jax.Array, jax.Array]:
    """Per (batch row, kv head): the counted (token, slot) pairs that read each key block.

    Returns `pairs` `[B*H, T*S]` (`token * S + slot`, sorted by packed key block, ascending within
    a block, uncounted pairs last) and `offsets` `[B*H, NB+1]`: block n's readers are
    `pairs[offsets[n]:offsets[n+1]]`."""
    batch, num_tokens, num_kv_heads, num_slots = sel.indices.shape
    num_blocks = sel.block_start.shape[0]
    rows, per_row = batch * num_kv_heads, num_tokens * num_slots
    keep = counted_slots(sel, block_size)
    block = jnp.where(keep, sel.first_block[None, :, None, None] + sel.indices, num_blocks)
    block = block.transpose(0, 2, 1, 3).reshape(rows, per_row)
    if rows * per_row < 2**31 and rows * (num_blocks + 1) < 2**32:
        # One flat sort of (row, block) keys: unsigned keys with an index payload are what XLA
        # hands to CUB's radix sort on GPUs (a signed or batched sort takes its much slower
        # comparison sort: 6.3 ms against well under 1 at T=64k, S=16, 32 kv heads, on an H200).
        row = jnp.arange(rows, dtype=jnp.uint32)[:, None]
        key = (row * jnp.uint32(num_blocks + 1) + block.astype(jnp.uint32)).reshape(-1)
        flat = jnp.arange(rows * per_row, dtype=jnp.int32)
        key, flat = jax.lax.sort((key, flat), dimension=0, is_stable=True, num_keys=1)
        first = (jnp.arange(rows, dtype=jnp.int32) * per_row)[:, None]
        pair = flat.reshape(rows, per_row) - first
        edges = (row * jnp.uint32(num_blocks + 1) + jnp.arange(num_blocks + 1, dtype=jnp.uint32)).reshape(-1)
        offsets = jnp.searchsorted(key, edges, side="left").astype(jnp.int32).reshape(rows, num_blocks + 1) - first
        return pair.astype(jnp.int32), offsets.astype(jnp.int32)
    pair = jax.lax.broadcasted_iota(jnp.int32, block.shape, 1)
    block, pair = jax.lax.sort((block, pair), dimension=1, is_stable=True, num_keys=1)
    edges = jnp.arange(num_blocks + 1, dtype=jnp.int32)
    offsets = jax.vmap(lambda row: jnp.searchsorted(row, edges, side="left"))(block)
    return pair.astype(jnp.int32), offsets.astype(jnp.int32)


def readers_by_key_block(sel: SelectedBlocks, block_size: int) -> tuple[jax.Array, jax.Array]:
    """`reader_pairs_by_key_block` with each pair replaced by its token: `tokens` `[B*H, T*S]`
    and `offsets` `[B*H, NB+1]`."""
    pairs, offsets = reader_pairs_by_key_block(sel, block_size)
    return pairs // sel.indices.shape[-1], offsets


class ReaderTiles(NamedTuple):
    """Work tiles over an inverted selection, `[B*H, NT]` int32 each: the packed key block a
    tile works on (-1: an unused tile of the static grid) and its first chunk of `rows`
    (reader, query head) rows in that block's list. A tile covers up to `chunks` chunks."""

    block: jax.Array
    chunk: jax.Array


def num_reader_tiles(num_tokens: int, num_slots: int, num_blocks: int, group: int, rows: int, chunks: int) -> int:
    """A static bound on the tiles `reader_tiles` makes: every block may end in a partial chunk
    and a partial tile."""
    total_chunks = -(-num_tokens * num_slots * group // rows) + num_blocks
    return -(-total_chunks // chunks) + num_blocks


def reader_tiles(offsets: jax.Array, *, num_tokens: int, num_slots: int, group: int, rows: int,
                 chunks: int) -> ReaderTiles:
    """Cut each key block's reader list into tiles of at most `chunks` chunks of `rows` rows.

    A key block read by many tokens (block 0 is read by every token of its sequence) becomes many
    tiles and a rarely read one a single tile, so the programs of a launch get similar work
    whatever the selection; a block nobody reads gets none."""
    num_blocks = offsets.shape[1] - 1
    num_tiles = num_reader_tiles(num_tokens, num_slots, num_blocks, group, rows, chunks)
    readers = offsets[:, 1:] - offsets[:, :-1]
    block_chunks = (readers * group + rows - 1) // rows
    block_tiles = (block_chunks + chunks - 1) // chunks
    ends = jnp.cumsum(block_tiles, axis=1)
    tiles = jnp.arange(num_tiles, dtype=jnp.int32)
    block = jax.vmap(lambda row: jnp.searchsorted(row, tiles, side="right"))(ends).astype(jnp.int32)
    used = tiles[None, :] < ends[:, -1:]
    block = jnp.minimum(block, num_blocks - 1)
    starts = jnp.take_along_axis(ends - block_tiles, block, axis=1)
    chunk = (tiles[None, :] - starts) * chunks
    return ReaderTiles(jnp.where(used, block, -1).astype(jnp.int32), jnp.where(used, chunk, 0).astype(jnp.int32))


def block_viewers(num_tokens: int, block_size: int, segments: Segments | None,
                  length: int | None = None) -> tuple[jax.Array, jax.Array]:
    """`[NB]` int32 each: the tokens `[lo, hi)` that can see each packed compressed block, from
    the block's last token to the end of its sequence (`lo >= hi` when none can). With SPEC 9's
    geometry `block_size` is the stride `d` and `length` the blocks' length `l` (default `d`)."""
    blocks = block_layout(num_tokens, block_size, segments)
    used = blocks.count > 0
    # A block becomes visible at its last token, if it is complete.
    lo = jnp.where(used, blocks.start + (length or block_size) - 1, num_tokens)
    return lo.astype(jnp.int32), jnp.where(used, blocks.seq_end, 0).astype(jnp.int32)


def selected_blocks(block_indices, block_counts, *, num_kv_heads: int, block_size: int,
                    segments: Segments | None) -> SelectedBlocks:
    """A selected-attention call's integer inputs: `block_counts` an int or `[B, T, H]`."""
    batch, num_tokens = block_indices.shape[:2]
    layout = token_layout(num_tokens, block_size, segments)
    blocks = block_layout(num_tokens, block_size, segments)
    if isinstance(block_counts, int):
        counts = jnp.full((batch, num_tokens, num_kv_heads), block_counts, jnp.int32)
    else:
        counts = jnp.asarray(block_counts, jnp.int32)
    return SelectedBlocks(
        indices=jnp.asarray(block_indices, jnp.int32), counts=counts, pos=layout.pos, seq_start=layout.seq_start,
        first_block=layout.first_block, block_start=blocks.start, block_len=blocks.count,
    )
