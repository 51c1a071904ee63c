"""A padded batch as one packed row: what the NSA layer does with an attention mask.

`native_sparse_attention` has no padding mask; it has `cu_seqlens` (SPEC: positions local to a
sequence, no attention across sequences). A `[B, T]` mask is turned into that form the way
flash-linear-attention's layers unpad: the real tokens of all rows are gathered, in order, into
one row of static length `B * T`, with one sequence per batch row and a last sequence that holds
the padding; afterwards the outputs are put back where they came from, with zeros at padding.
Everything has static shapes, so the mask may be traced (`jit`), and a row's real tokens need
not be contiguous: a token's position is the number of real tokens before it in its row.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
from jaxtyping import Array, Bool, Int, Shaped


class Packing(NamedTuple):
    """Where each token of a padded `[B, T]` batch goes in the packed row, and back."""

    gather: Int[Array, " BT"]  # packed slot p holds the flattened padded token gather[p]
    scatter: Int[Array, " BT"]  # the flattened padded token i sits at packed slot scatter[i]
    valid: Bool[Array, "B T"]
    cu_seqlens: Int[Array, " B2"]  # [B + 2]: one sequence per batch row, then the padding tail
    positions: Int[Array, "B T"]  # each real token's position among its row's real tokens; 0 at padding


def packing_from_mask(attention_mask: Shaped[Array, "B T"]) -> Packing:
    """Describe the packing of a batch whose real tokens are where `attention_mask` is true.

    `attention_mask` is `[B, T]`, bool or int (nonzero = a real token), as Hugging Face models
    take it; left and right padding both work.
    """
    if not hasattr(attention_mask, "shape") or not hasattr(attention_mask, "dtype"):
        raise TypeError(f"attention_mask must be a [B, T] array, got {type(attention_mask).__name__}")
    if attention_mask.ndim != 2:
        raise ValueError(f"attention_mask must be [B, T] (rank 2), got shape {tuple(attention_mask.shape)}")
    dtype = jnp.dtype(attention_mask.dtype)
    if not (dtype == jnp.bool_ or jnp.issubdtype(dtype, jnp.integer)):
        raise TypeError(f"attention_mask must be bool or int (nonzero = a real token), got {dtype}")
    valid = jnp.asarray(attention_mask) != 0
    batch, seq_len = valid.shape
    flat = valid.reshape(-1)
    # A stable sort on "is padding" puts every real token first, rows in order and tokens in order
    # within a row; the padding follows. Its inverse permutation puts the outputs back.
    gather = jnp.argsort(~flat, stable=True).astype(jnp.int32)
    scatter = jnp.argsort(gather).astype(jnp.int32)
    lengths = valid.sum(axis=1, dtype=jnp.int32)
    ends = jnp.cumsum(lengths, dtype=jnp.int32)
    cu_seqlens = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends, jnp.full((1,), batch * seq_len, jnp.int32)])
    positions = jnp.where(valid, jnp.cumsum(valid, axis=1, dtype=jnp.int32) - 1, 0)
    return Packing(gather, scatter, valid, cu_seqlens, positions)


def pack(x: Shaped[Array, "B T *rest"], packing: Packing) -> Shaped[Array, "1 BT *rest"]:
    """`[B, T, ...]` -> the packed row `[1, B * T, ...]` (real tokens first)."""
    flat = x.reshape((-1,) + x.shape[2:])
    return jnp.take(flat, packing.gather, axis=0)[None]


def unpack(y: Shaped[Array, "1 BT *rest"], packing: Packing) -> Shaped[Array, "B T *rest"]:
    """The packed row `[1, B * T, ...]` -> `[B, T, ...]`, zeros at padding."""
    batch, seq_len = packing.valid.shape
    out = jnp.take(y[0], packing.scatter, axis=0).reshape((batch, seq_len) + y.shape[2:])
    mask = packing.valid.reshape(packing.valid.shape + (1,) * (out.ndim - 2))
    return jnp.where(mask, out, jnp.zeros((), out.dtype))


__all__ = ["Packing", "pack", "packing_from_mask", "unpack"]
