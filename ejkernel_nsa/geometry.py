"""The compression geometry of SPEC section 9: block length `l`, stride `d`, selection block `l'`.

Compressed block `i` of a sequence covers positions `[i*d, i*d + l)`; selection block `j` covers
`[j*l', (j+1)*l')`. A query at position `t` sees the compressed blocks that are complete
(`i*d + l <= t + 1`), and selection block `j` scores the sum of their probabilities weighted by
`|C_i ∩ S_j| / l`. The defaults `l = d = l'` are sections 1-3 (disjoint mean pooling).

Because `d` divides `l'`, the weight depends only on `u = i - j * (l' / d)`: the transfer is a
short stencil of `l/d + l'/d - 1` taps, the same for every selection block (`transfer_taps`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from ejkernel_nsa.problem import num_compressed_blocks


@dataclasses.dataclass(frozen=True)
class CompressionGeometry:
    block_size: int  # l', the selection block (SPEC section 4's block)
    length: int  # l, the compression block length
    stride: int  # d, the compression stride

    @property
    def is_default(self) -> bool:
        """Sections 1-3: disjoint compression blocks equal to the selection block."""
        return self.length == self.block_size and self.stride == self.length

    def num_blocks(self, seq_len: int, num_seqs: int | None) -> int:
        """Static length of the (packed) compressed-block axis: ceil(T / d), or T // d + N."""
        return num_compressed_blocks(seq_len, self.stride, num_seqs)

    def num_visible(self, pos: jax.Array) -> jax.Array:
        """Compressed blocks a query at position `pos` sees (complete ones only)."""
        return jnp.maximum((pos + 1 - self.length) // self.stride + 1, 0)

    def transfer_taps(self) -> tuple[tuple[int, float], ...]:
        """`(u, weight)` for every compressed block `i = j * (l'/d) + u` overlapping selection block
        `j`, with `weight = |C_i ∩ S_j| / l` (exact in float: a multiple of d over l)."""
        ratio = self.block_size // self.stride
        taps = []
        for u in range(-(self.length // self.stride) + 1, ratio):
            lo, hi = max(u * self.stride, 0), min(u * self.stride + self.length, self.block_size)
            taps.append((u, (hi - lo) / self.length))
        return tuple(taps)

    def piece_kwargs(self) -> dict:
        """The geometry's keyword arguments for the pieces that depend on it. Empty for the
        default geometry, so every implementation written before section 9 is called as before
        (the registry gives a non-default geometry only to implementations that accept it)."""
        if self.is_default:
            return {}
        return {"compress_block_size": self.length, "compress_stride": self.stride}


def geometry_of(block_size: int, compress_block_size: int | None = None,
                compress_stride: int | None = None) -> CompressionGeometry:
    """SPEC 9's defaults: `l = block_size`, `d = l`. Values are not checked here (see
    `validation.check_geometry`)."""
    length = block_size if compress_block_size is None else compress_block_size
    stride = length if compress_stride is None else compress_stride
    return CompressionGeometry(block_size, length, stride)
