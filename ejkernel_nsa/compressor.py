"""A learned compressor (the paper's `phi`, arXiv 2502.11089 section 3.3.1): pure functions of
parameters that turn keys and values into the compressed blocks of SPEC section 9.

Block `i` of a sequence covers positions `[i*d, i*d + l)`. Each of its `l` tokens gets a learned
intra-block position embedding added, the block is flattened to `l * D` features, and a two-layer
MLP maps it to one `D`-vector. The MLP's output is added to the block's mean and its last layer
starts at zero, so an untrained compressor is exactly overlapping mean pooling (SPEC 9) and
training learns the correction. Keys and values have their own parameters; the heads share them.

    params = compressor.init(jax.random.key(0), compress_block_size=32, key_dim=128, value_dim=128,
                             hidden=256)
    key_cmp, value_cmp = compressor.apply(params, key, value, compress_block_size=32, compress_stride=16)
    out = native_sparse_attention(q, key, value, g_cmp, g_slc, block_size=64, compress_block_size=32,
                                  compress_stride=16, key_cmp=key_cmp, value_cmp=value_cmp)

`jax.grad` through that call reaches `params` (SPEC 9: gradients flow into supplied blocks).
Framework-light on purpose: the parameters are a dict of arrays, usable from Flax, Equinox or
plain JAX.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from ejkernel_nsa.problem import block_layout
from ejkernel_nsa.validation import ShapeChecker, check_geometry, segments_of, static_int


def init(rng: jax.Array, compress_block_size: int, key_dim: int, value_dim: int, hidden: int, *,
         dtype=jnp.float32) -> dict:
    """Parameters for blocks of `compress_block_size` tokens: `{"key": ..., "value": ...}`, each
    with `position` `[l, D]`, `w_in` `[l * D, hidden]`, `b_in`, `w_out` `[hidden, D]` (zero) and
    `b_out` (zero)."""
    length = static_int("compress_block_size", compress_block_size, 1)
    hidden = static_int("hidden", hidden, 1)
    key_rng, value_rng = jax.random.split(rng)
    return {
        "key": _init_branch(key_rng, length, static_int("key_dim", key_dim, 1), hidden, dtype),
        "value": _init_branch(value_rng, length, static_int("value_dim", value_dim, 1), hidden, dtype),
    }


def _init_branch(rng, length: int, dim: int, hidden: int, dtype) -> dict:
    position_rng, in_rng = jax.random.split(rng)
    fan_in = length * dim
    return {
        "position": 0.02 * jax.random.normal(position_rng, (length, dim), dtype),
        "w_in": jax.random.normal(in_rng, (fan_in, hidden), dtype) * fan_in**-0.5,
        "b_in": jnp.zeros((hidden,), dtype),
        "w_out": jnp.zeros((hidden, dim), dtype),
        "b_out": jnp.zeros((dim,), dtype),
    }


def apply(params: dict, key: Float[Array, "B T H Dk"], value: Float[Array, "B T H Dv"], *,
          compress_block_size: int, compress_stride: int | None = None,
          cu_seqlens: Int[Array, " N+1"] | None = None,
          ) -> tuple[Float[Array, "B NBc H Dk"], Float[Array, "B NBc H Dv"]]:
    """`key` `[B, T, H, Dk]`, `value` `[B, T, H, Dv]` -> `(key_cmp, value_cmp)`, float32
    `[B, NBc, H, D]` in SPEC 9's layout: `NBc = ceil(T / d)`, or with `cu_seqlens` the packed
    `T // d + N` blocks, sequence n's starting at `sum(ceil(L_m / d), m < n)`. A block reads only
    its own sequence's tokens (those past the sequence's end are zero before the position
    embedding is added); the packed tail is zero."""
    checker = ShapeChecker()
    key = checker.array("key", key, "float", "B T H Dk")
    value = checker.array("value", value, "float", "B T H Dv")
    length = static_int("compress_block_size", compress_block_size, 1)
    # The compressor knows nothing of the selection block; l itself stands in for it, which
    # checks that d divides l.
    geometry = check_geometry(length, length, compress_stride)
    segments = segments_of(checker, cu_seqlens, key.shape[0], key.shape[1])
    check_params("params", params, length, key.shape[3], value.shape[3])
    num_tokens = key.shape[1]
    blocks = block_layout(num_tokens, geometry.stride, segments)
    rows = blocks.start[:, None] + jnp.arange(length, dtype=jnp.int32)[None, :]  # [NBc, l]
    inside = (rows < blocks.seq_end[:, None]) & (blocks.count[:, None] > 0)
    rows = jnp.clip(rows, 0, max(num_tokens - 1, 0))
    return compress_blocks(params["key"], key, rows, inside), compress_blocks(params["value"], value, rows, inside)


def check_params(name: str, params, length: int, key_dim: int, value_dim: int) -> None:
    """`params` is `init`'s dict for blocks of `length` tokens of these dimensions; `name` is the
    argument the caller took it as (the serving cache takes it as `compressor`)."""
    if not isinstance(params, Mapping) or not all(isinstance(params.get(b), Mapping) and "position" in params[b]
                                                  for b in ("key", "value")):
        raise TypeError(f"{name}: expected ejkernel_nsa.compressor.init's dict of parameters "
                        f"({{'key': {{...}}, 'value': {{...}}}}), got {type(params).__name__}")
    for branch, dim in (("key", key_dim), ("value", value_dim)):
        shape = tuple(params[branch]["position"].shape)
        if shape != (length, dim):
            raise ValueError(
                f"{name}[{branch!r}]: made for blocks of {shape[0]} tokens of dimension {shape[1]}, got "
                f"compress_block_size={length} and {branch} dimension {dim}"
            )


def compress_blocks(branch: dict | None, x: jax.Array, rows: jax.Array, inside: jax.Array) -> jax.Array:
    """`[B, T, H, D]` -> `[B, NBc, H, D]` float32: block `c` is made of the tokens `rows[c]`
    (`[NBc, l]`, positions) where `inside[c]` holds, the others zero. `branch` (`params["key"]` or
    `params["value"]`): the block's mean plus the MLP of the position-embedded block; None: the
    mean alone (SPEC 9's mean pooling). A block with no token inside is zero. Shared with
    `ejkernel_nsa.cache`, which compresses the blocks a new token completes this way."""
    tokens = jnp.where(inside[None, :, :, None, None], x.astype(jnp.float32)[:, rows], 0.0)  # [B, NBc, l, H, D]
    count = jnp.maximum(jnp.sum(inside, axis=1), 1).astype(jnp.float32)[None, :, None, None]
    out = jnp.sum(tokens, axis=2) / count
    if branch is not None:
        embedded = tokens + branch["position"].astype(jnp.float32)[None, None, :, None, :]
        flat = jnp.moveaxis(embedded, 2, 3).reshape(tokens.shape[:2] + (tokens.shape[3], -1))  # [B, NBc, H, l*D]
        hidden = jax.nn.gelu(flat @ branch["w_in"].astype(jnp.float32) + branch["b_in"].astype(jnp.float32))
        out = out + hidden @ branch["w_out"].astype(jnp.float32) + branch["b_out"].astype(jnp.float32)
    return jnp.where(jnp.any(inside, axis=1)[None, :, None, None], out, 0.0)
