"""The static description of one NSA call, shared by the interface, the registry and the backends.

A backend decides whether it can run a call from this description alone (shapes, dtypes, options),
before anything is traced, so that a forced backend can decline with a reason instead of computing
something else.
"""

from __future__ import annotations

import dataclasses
import enum

import jax
import jax.numpy as jnp


class Piece(enum.StrEnum):
    """The stages of NSA that a backend implements, each registered on its own."""

    COMPRESSION = "compression"
    COMPRESSED_ATTENTION = "compressed_attention"
    SELECTION = "selection"
    SELECTED_ATTENTION = "selected_attention"
    SLIDING_WINDOW = "sliding_window"


@dataclasses.dataclass(frozen=True)
class NSAProblem:
    """Everything about a call that is known at trace time.

    `num_seqs` is None without `cu_seqlens`; `selection` says where the selected blocks come from:
    "computed" (top-k from the compressed branch) or "given" (the caller's `block_indices`).
    """

    batch: int
    seq_len: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    value_dim: int
    dtype: str
    block_size: int
    num_slots: int
    window_size: int = 0
    num_seqs: int | None = None
    per_token_counts: bool = False
    selection: str = "computed"
    has_g_cmp: bool = True
    has_g_slc: bool = False
    has_g_swa: bool = False
    platform: str = "cpu"
    # SPEC section 9 (see `ejkernel_nsa.geometry`): the compression block length `l` and stride
    # `d` (None: the defaults, l = block_size and d = l), and whether the caller supplied the
    # compressed keys and values (then no compression piece runs).
    compress_block_size: int | None = None
    compress_stride: int | None = None
    supplied_compression: bool = False

    @property
    def default_geometry(self) -> bool:
        """Sections 1-3's geometry: disjoint compression blocks of `block_size`."""
        length = self.compress_block_size or self.block_size
        return length == self.block_size and (self.compress_stride or length) == length

    # SPEC section 10 (queries against a longer key sequence). `query_len` is TQ when it differs
    # from `seq_len`, which is then the key length TK; `kv_lengths` says the call carries per-row
    # key lengths. Both keep their defaults for a TQ == TK call, so its description is unchanged.
    query_len: int | None = None
    kv_lengths: bool = False

    @property
    def against_longer_keys(self) -> bool:
        """Whether the call is SPEC section 10's: queries shorter than the keys, or row lengths."""
        return self.query_len is not None or self.kv_lengths

    @property
    def group_size(self) -> int:
        return self.num_q_heads // self.num_kv_heads

    @property
    def varlen(self) -> bool:
        return self.num_seqs is not None

    @property
    def needed_pieces(self) -> tuple[Piece, ...]:
        pieces = []
        if self.has_g_cmp:
            pieces += [Piece.COMPRESSED_ATTENTION] if self.supplied_compression else [
                Piece.COMPRESSION, Piece.COMPRESSED_ATTENTION]
        if self.selection == "computed":
            pieces.append(Piece.SELECTION)
        pieces.append(Piece.SELECTED_ATTENTION)
        if self.has_g_swa:
            pieces.append(Piece.SLIDING_WINDOW)
        return tuple(pieces)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Segments:
    """Where the sequences of a packed (varlen) batch start, as traced arrays.

    `cu_seqlens` is `[N + 1]` int32 with `cu_seqlens[0] == 0` and `cu_seqlens[N] == T`.
    `token_indices`, when the caller has it, is `[T, 2]`: (sequence id, position in the sequence)
    per token, as flash-linear-attention's `prepare_token_indices` makes it; otherwise it is
    derived from `cu_seqlens`.
    """

    cu_seqlens: jax.Array
    token_indices: jax.Array | None = None

    @property
    def num_seqs(self) -> int:
        return self.cu_seqlens.shape[0] - 1

    def sequence_ids(self, num_tokens: int) -> jax.Array:
        if self.token_indices is not None:
            return self.token_indices[:, 0].astype(jnp.int32)
        tokens = jnp.arange(num_tokens, dtype=jnp.int32)
        ids = jnp.searchsorted(self.cu_seqlens[1:], tokens, side="right")
        return jnp.minimum(ids, self.num_seqs - 1).astype(jnp.int32)

    def lengths(self) -> jax.Array:
        return (self.cu_seqlens[1:] - self.cu_seqlens[:-1]).astype(jnp.int32)

    def block_offsets(self, block_size: int) -> jax.Array:
        """`[N + 1]`: index of each sequence's first compressed block in the packed block axis."""
        blocks = (self.lengths() + block_size - 1) // block_size
        return jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(blocks).astype(jnp.int32)])


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TokenLayout:
    """Per token of one row, `[T]` int32 each: its position in its own sequence, the index of
    that sequence's first token, and the index of the sequence's first compressed block on the
    packed block axis. With these, ordinary rows and packed varlen rows are one code path."""

    pos: jax.Array
    seq_start: jax.Array
    first_block: jax.Array


def token_layout(num_tokens: int, block_size: int, segments: Segments | None) -> TokenLayout:
    tokens = jnp.arange(num_tokens, dtype=jnp.int32)
    if segments is None:
        zeros = jnp.zeros_like(tokens)
        return TokenLayout(pos=tokens, seq_start=zeros, first_block=zeros)
    seq = segments.sequence_ids(num_tokens)
    seq_start = segments.cu_seqlens.astype(jnp.int32)[seq]
    first_block = segments.block_offsets(block_size)[seq]
    if segments.token_indices is not None:
        pos = segments.token_indices[:, 1].astype(jnp.int32)
    else:
        pos = tokens - seq_start
    return TokenLayout(pos=pos, seq_start=seq_start, first_block=first_block)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BlockLayout:
    """Per block of the packed compressed-block axis, `[NB]` int32 each: its first token, its
    number of tokens (`block_size`, fewer for a sequence's partial last block, 0 for the unused
    tail), and the end of its sequence (one past the last token that can see it)."""

    start: jax.Array
    count: jax.Array
    seq_end: jax.Array


def block_layout(num_tokens: int, block_size: int, segments: Segments | None) -> BlockLayout:
    num_blocks = num_compressed_blocks(num_tokens, block_size, None if segments is None else segments.num_seqs)
    blocks = jnp.arange(num_blocks, dtype=jnp.int32)
    if segments is None:
        start = blocks * block_size
        seq_end = jnp.full_like(blocks, num_tokens)
    else:
        offsets = segments.block_offsets(block_size)
        cu_seqlens = segments.cu_seqlens.astype(jnp.int32)
        # Searching the block axis in the offsets skips empty sequences, which own no block; the
        # unused tail lands past the last sequence's end and so gets no tokens.
        seq = jnp.minimum(jnp.searchsorted(offsets[1:], blocks, side="right"), segments.num_seqs - 1)
        start = cu_seqlens[seq] + (blocks - offsets[seq]) * block_size
        seq_end = cu_seqlens[seq + 1]
    count = jnp.clip(seq_end - start, 0, block_size)
    return BlockLayout(start.astype(jnp.int32), count.astype(jnp.int32), seq_end.astype(jnp.int32))


def num_compressed_blocks(seq_len: int, block_size: int, num_seqs: int | None) -> int:
    """Static length of the compressed-block axis.

    Without varlen it is ceil(T / BS). Packed sequences each end in their own partial block, so
    the packed axis holds at most T // BS + N blocks; its unused tail is zero.
    """
    if num_seqs is None:
        return -(-seq_len // block_size)
    return seq_len // block_size + num_seqs


def platform_of(*arrays) -> str:
    """The platform the inputs live on: that of a committed concrete array, else JAX's default."""
    for array in arrays:
        if isinstance(array, jax.Array) and not isinstance(array, jax.core.Tracer):
            try:
                return _normalize_platform(next(iter(array.devices())).platform)
            except (AttributeError, StopIteration, RuntimeError):
                continue
    return _normalize_platform(jax.default_backend())


def _normalize_platform(name: str) -> str:
    return "gpu" if name in ("gpu", "cuda", "rocm") else name
