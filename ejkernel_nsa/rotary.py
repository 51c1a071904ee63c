"""Rotary position embeddings (RoFormer, arXiv 2104.09864) in plain JAX, for the NSA layer.

The half-split ("NeoX") form that flash-linear-attention's NSA layer uses by default: the first
half of each head's features is rotated against the second half. Positions are explicit, so a
packed row (`cu_seqlens`) or a left-padded batch gives every token its position inside its own
sequence.
"""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Float, Int


def rotary_angles(positions: Int[Array, "*batch T"], rotary_dim: int, theta: float = 10000.0
                  ) -> tuple[Float[Array, "*batch T half"], Float[Array, "*batch T half"]]:
    """`(cos, sin)` of the rotation angles, float32, `half = rotary_dim // 2` frequencies.

    Frequency `i` turns by `theta ** (-2 i / rotary_dim)` radians per position.
    """
    if not isinstance(rotary_dim, int) or isinstance(rotary_dim, bool) or rotary_dim < 2 or rotary_dim % 2:
        raise ValueError(f"rotary_dim must be an even int >= 2, got {rotary_dim!r}")
    if not theta > 0:
        raise ValueError(f"theta must be positive, got {theta!r}")
    inv_freq = theta ** (-jnp.arange(0, rotary_dim, 2, dtype=jnp.float32) / rotary_dim)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    return jnp.cos(angles), jnp.sin(angles)


def apply_rotary(x: Float[Array, "*batch T heads D"], positions: Int[Array, "*batch T"], *,
                 rotary_dim: int | None = None, theta: float = 10000.0) -> Float[Array, "*batch T heads D"]:
    """Rotate the first `rotary_dim` features (default all `D`) of every head of `x` by position.

    `x` is `[..., T, heads, D]` and `positions` `[..., T]` (broadcast over heads). The rotation is
    computed in float32 and returned in `x`'s dtype; features past `rotary_dim` pass unchanged.
    """
    head_dim = x.shape[-1]
    rotary_dim = head_dim if rotary_dim is None else rotary_dim
    if isinstance(rotary_dim, int) and rotary_dim > head_dim:
        raise ValueError(f"rotary_dim={rotary_dim} is larger than the head dimension D={head_dim}")
    if positions.shape != x.shape[:-2]:
        raise ValueError(f"positions must have shape {x.shape[:-2]} (x's leading axes), got {positions.shape}")
    cos, sin = rotary_angles(positions, rotary_dim, theta)
    cos, sin = cos[..., None, :], sin[..., None, :]  # broadcast over heads
    rotated, passed = x[..., :rotary_dim].astype(jnp.float32), x[..., rotary_dim:]
    first, second = jnp.split(rotated, 2, axis=-1)
    rotated = jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
    return jnp.concatenate([rotated.astype(x.dtype), passed], axis=-1) if passed.shape[-1] else rotated.astype(x.dtype)


__all__ = ["apply_rotary", "rotary_angles"]
