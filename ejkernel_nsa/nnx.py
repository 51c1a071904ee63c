"""`NativeSparseAttention`: the NSA attention layer of a transformer block, as a Flax NNX module.

The layer of arXiv 2502.11089 (section 3) around `ejkernel_nsa.native_sparse_attention`: query,
key and value projections with grouped-query heads (`num_heads = G * num_kv_heads`, any `G`),
one sigmoid gate per branch and query head projected from the input (the paper's gate MLP, as
flash-linear-attention's `g_proj`), optional rotary embeddings, a padding mask handled by packing
the real tokens into one row with `cu_seqlens` (`ejkernel_nsa.padding`), and the output
projection. Flax is an optional dependency: `pip install 'ejkernel-nsa[nnx]'`.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from flax import nnx
  >>> from ejkernel_nsa.nnx import NativeSparseAttention
  >>> layer = NativeSparseAttention(256, num_heads=8, num_kv_heads=2, block_size=32, block_counts=4,
  ...                               window_size=64, rngs=nnx.Rngs(0))
  >>> layer(jax.random.normal(jax.random.key(1), (2, 512, 256))).shape
  (2, 512, 256)
"""

from __future__ import annotations

from typing import Any, overload

try:
    from flax import nnx
except ImportError as error:  # the message a user without the extra sees
    raise ImportError(
        "ejkernel_nsa.nnx needs Flax (NNX), which is an optional dependency of ejkernel-nsa; install it "
        "with: pip install 'ejkernel-nsa[nnx]'  (or: pip install flax)"
    ) from error

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Shaped

from ejkernel_nsa import cache as kv_cache
from ejkernel_nsa import compressor as learned_compressor
from ejkernel_nsa.api import native_sparse_attention
from ejkernel_nsa.padding import pack, packing_from_mask, unpack
from ejkernel_nsa.rotary import apply_rotary
from ejkernel_nsa.validation import check_geometry

BRANCHES_WITH_WINDOW = ("g_cmp", "g_slc", "g_swa")
BRANCHES_WITHOUT_WINDOW = ("g_cmp", "g_slc")


def _positive_int(name: str, value: Any, minimum: int = 1) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


# `compressor=True`: the MLP's hidden width in multiples of head_dim (the paper gives none; a
# transformer MLP's 4x keeps the compressor small beside the projections).
COMPRESSOR_HIDDEN_PER_HEAD_DIM = 4


class CompressorParams(nnx.Module):
    """The learned compressor's parameters (`ejkernel_nsa.compressor.init`'s dict) as `nnx.Param`s,
    one attribute per array (`key_w_in`, `value_position`, ...), so NNX's state, grads and
    optimizers see them like any other parameter."""

    def __init__(self, params: dict):
        self.names = tuple((branch, name) for branch in ("key", "value") for name in sorted(params[branch]))
        for branch, name in self.names:
            setattr(self, f"{branch}_{name}", nnx.Param(params[branch][name]))

    def as_dict(self) -> dict:
        """The dict that `ejkernel_nsa.compressor.apply` takes, of the current values."""
        params: dict = {"key": {}, "value": {}}
        for branch, name in self.names:
            params[branch][name] = getattr(self, f"{branch}_{name}")[...]
        return params


def _compressor_hidden(compressor: Any, head_dim: int) -> int | None:
    """`compressor=` as the MLP's hidden width, or None for mean pooling."""
    if compressor is None or compressor is False:
        return None
    if compressor is True:
        return COMPRESSOR_HIDDEN_PER_HEAD_DIM * head_dim
    if not isinstance(compressor, int):
        raise TypeError(f"compressor must be None/False (mean pooling), True or the MLP's hidden width (an int), "
                        f"got {type(compressor).__name__} {compressor!r}")
    return _positive_int("compressor", compressor)


class NativeSparseAttention(nnx.Module):
    """NSA self-attention: `[B, T, hidden_size]` -> `[B, T, hidden_size]`, causal.

    Args:
      hidden_size: the model width (input and output features).
      num_heads: query heads `HQ`.
      num_kv_heads: key/value heads `H` (default `num_heads`); `num_heads` must be a multiple.
      head_dim: features per head (default `hidden_size // num_heads`).
      block_size: NSA's block length `BS` (compression and selection).
      block_counts: blocks each (token, kv head) selects, `S`.
      window_size: the sliding-window branch's `W`; 0 drops the branch and its gate.
      softmax_scale: defaults to `head_dim ** -0.5`.
      use_rope: rotate queries and keys by position (rotary embeddings, half-split form).
      rope_theta: the rotary base.
      rotary_dim: how many features of each head rotate (default all `head_dim`).
      use_bias: biases on the query, key, value and output projections (gates have none).
      dtype: the computation dtype of the projections and of the attention (default: the input's,
        promoted with the parameters' as `nnx.Linear` does); `jnp.bfloat16` for mixed precision.
      param_dtype: the parameters' dtype.
      backend: passed to `native_sparse_attention` (`None`: the automatic choice).
      compress_block_size, compress_stride: the compression geometry of SPEC section 9, the
        paper's `l` and `d` (defaults `block_size` and `l`: disjoint blocks); `d` must divide `l`
        and `block_size`. The paper uses `l=32, d=16` with `block_size=64`.
      compressor: `None`/`False`: each compressed block is the mean of its keys/values (SPEC 9).
        `True` or an int (the MLP's hidden width; `True` is `4 * head_dim`): the paper's learned
        compressor `phi` (`ejkernel_nsa.compressor`), its parameters in `self.compressor`
        (`CompressorParams`, `nnx.Param`s from `rngs`), applied to the layer's projected (and
        rotated) keys and values on every call; it starts as mean pooling and is trained with the
        rest of the layer.
      rngs: `nnx.Rngs` for the parameter initializers.

    Call: `layer(x, attention_mask=None)`, `x` `[B, T, hidden_size]`; `attention_mask` `[B, T]`
    (bool or int, nonzero = a real token, any padding side) keeps padding out of every branch:
    each row attends only within its real tokens, positions count real tokens, and the output is
    zero at padding.

    Decoding: `cache = layer.init_cache(batch, capacity)`, then `y, cache = layer(x, cache=cache)`
    for each chunk (a prompt) or step (`x` `[B, 1, hidden]`): `x`'s tokens follow each row's cached
    tokens (rotary at positions `cache.lengths + i`), their projected keys and values are appended
    (`ejkernel_nsa.cache`, in the layer's geometry; with a learned compressor, the blocks they
    complete are its `phi` of them), and `y` equals the full-sequence layer's last rows.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        *,
        block_size: int = 64,
        block_counts: int = 16,
        window_size: int = 512,
        softmax_scale: float | None = None,
        use_rope: bool = True,
        rope_theta: float = 10000.0,
        rotary_dim: int | None = None,
        use_bias: bool = False,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        backend: str | None = None,
        compress_block_size: int | None = None,
        compress_stride: int | None = None,
        compressor: Any = None,
        rngs: nnx.Rngs,
    ):
        hidden_size = _positive_int("hidden_size", hidden_size)
        num_heads = _positive_int("num_heads", num_heads)
        num_kv_heads = num_heads if num_kv_heads is None else _positive_int("num_kv_heads", num_kv_heads)
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads={num_heads} must be a multiple of num_kv_heads={num_kv_heads} "
                             "(query head i reads kv head i // G)")
        if head_dim is None:
            if hidden_size % num_heads:
                raise ValueError(f"hidden_size={hidden_size} is not a multiple of num_heads={num_heads}; "
                                 "pass head_dim explicitly")
            head_dim = hidden_size // num_heads
        head_dim = _positive_int("head_dim", head_dim)
        if use_rope:
            rotary = head_dim if rotary_dim is None else _positive_int("rotary_dim", rotary_dim, 2)
            if rotary % 2 or rotary > head_dim:
                raise ValueError(f"rotary_dim must be even and <= head_dim={head_dim}, got {rotary}")
        block_size = _positive_int("block_size", block_size)
        geometry = check_geometry(block_size, compress_block_size, compress_stride)
        compressor_hidden = _compressor_hidden(compressor, head_dim)
        self.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim = (
            hidden_size, num_heads, num_kv_heads, head_dim)
        self.block_size = block_size
        # As given (None = the library's default), so a default layer calls the kernel exactly as before.
        self.compress_block_size, self.compress_stride = compress_block_size, compress_stride
        self.compress_length, self.compress_step = geometry.length, geometry.stride
        self.block_counts = _positive_int("block_counts", block_counts)
        self.window_size = _positive_int("window_size", window_size, 0)
        self.softmax_scale = softmax_scale
        self.use_rope, self.rope_theta = bool(use_rope), float(rope_theta)
        self.rotary_dim = rotary_dim if rotary_dim is not None else head_dim
        self.dtype, self.param_dtype, self.backend = dtype, param_dtype, backend
        self.gate_names = BRANCHES_WITH_WINDOW if self.window_size else BRANCHES_WITHOUT_WINDOW

        def linear(features_in: int, features_out: int, bias: bool) -> nnx.Linear:
            return nnx.Linear(features_in, features_out, use_bias=bias, dtype=dtype, param_dtype=param_dtype,
                              rngs=rngs)

        self.q_proj = linear(hidden_size, num_heads * head_dim, use_bias)
        self.k_proj = linear(hidden_size, num_kv_heads * head_dim, use_bias)
        self.v_proj = linear(hidden_size, num_kv_heads * head_dim, use_bias)
        # One gate per branch and query head, from the token's input (paper eq. 5, flash-linear-
        # attention's g_proj): [..., HQ * branches], branch-minor.
        self.g_proj = linear(hidden_size, num_heads * len(self.gate_names), False)
        self.o_proj = linear(num_heads * head_dim, hidden_size, use_bias)
        # Assigned once: NNX fixes an attribute's kind (data or static) at its first assignment.
        self.compressor = None if compressor_hidden is None else CompressorParams(learned_compressor.init(
            rngs.params(), geometry.length, head_dim, head_dim, compressor_hidden, dtype=param_dtype))

    def init_cache(self, batch: int, capacity: int, dtype: Any = None) -> kv_cache.NSACache:
        """An empty `ejkernel_nsa.cache` cache of this layer's projected keys and values for `batch`
        rows of up to `capacity` tokens (a multiple of `block_size`), in the layer's compression
        geometry and, with a learned compressor, keeping its blocks (the layer passes its current
        parameters on every cached call); `dtype` defaults to the layer's `dtype`, else
        `param_dtype`."""
        if dtype is None:
            dtype = self.dtype if self.dtype is not None else self.param_dtype
        return kv_cache.init(batch, capacity, self.num_kv_heads, self.head_dim, block_size=self.block_size,
                             compress_block_size=self.compress_length, compress_stride=self.compress_step,
                             compressor=self._compressor_params(), dtype=dtype)

    def _compressor_params(self) -> dict | None:
        return None if self.compressor is None else self.compressor.as_dict()

    # Two overloads so that a type checker knows which of the two results a call returns: the
    # output alone without a cache, `(output, new cache)` with one (and no mask then).
    @overload
    def __call__(
        self, x: Float[Array, "B T hidden"], attention_mask: Shaped[Array, "B T"] | None = None, *,
        cache: None = None,
    ) -> Float[Array, "B T hidden"]: ...

    @overload
    def __call__(
        self, x: Float[Array, "B T hidden"], attention_mask: None = None, *, cache: kv_cache.NSACache,
    ) -> tuple[Float[Array, "B T hidden"], kv_cache.NSACache]: ...

    def __call__(
        self,
        x: Float[Array, "B T hidden"],
        attention_mask: Shaped[Array, "B T"] | None = None,
        *,
        cache: kv_cache.NSACache | None = None,
    ) -> Float[Array, "B T hidden"] | tuple[Float[Array, "B T hidden"], kv_cache.NSACache]:
        if cache is not None:
            if not isinstance(cache, kv_cache.NSACache):
                raise TypeError(f"cache must be an ejkernel_nsa.cache.NSACache (layer.init_cache), got "
                                f"{type(cache).__name__}")
            if attention_mask is not None:
                raise ValueError("attention_mask: not taken with cache= (rows of different lengths live in the "
                                 "cache's lengths; pad prompts with ejkernel_nsa.cache.append's num_new)")
        if not hasattr(x, "ndim") or x.ndim != 3 or x.shape[-1] != self.hidden_size:
            raise ValueError(f"x must be [B, T, hidden_size={self.hidden_size}], got "
                             f"{getattr(x, 'shape', type(x).__name__)}")
        batch, seq_len, _ = x.shape
        q = self.q_proj(x).reshape(batch, seq_len, self.num_heads, self.head_dim)
        k = self.k_proj(x).reshape(batch, seq_len, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(batch, seq_len, self.num_kv_heads, self.head_dim)
        gates = jax.nn.sigmoid(self.g_proj(x).reshape(batch, seq_len, self.num_heads, len(self.gate_names)))

        packing = None
        if attention_mask is not None:
            if tuple(attention_mask.shape) != (batch, seq_len):
                raise ValueError(f"attention_mask must be [B, T] = {(batch, seq_len)} like x, got "
                                 f"{tuple(attention_mask.shape)}")
            packing = packing_from_mask(attention_mask)
            positions = packing.positions
        elif cache is not None:  # the new tokens follow each row's cached ones
            positions = cache.lengths[:, None] + jnp.arange(seq_len, dtype=jnp.int32)
        else:
            positions = jnp.broadcast_to(jnp.arange(seq_len, dtype=jnp.int32), (batch, seq_len))
        if self.use_rope:
            q = apply_rotary(q, positions, rotary_dim=self.rotary_dim, theta=self.rope_theta)
            k = apply_rotary(k, positions, rotary_dim=self.rotary_dim, theta=self.rope_theta)

        branch_gates = {name: gates[..., i] for i, name in enumerate(self.gate_names)}
        if cache is not None:
            return self._decode(q, k, v, branch_gates, cache)
        cu_seqlens = None
        if packing is not None:
            q, k, v = pack(q, packing), pack(k, packing), pack(v, packing)
            branch_gates = {name: pack(g, packing) for name, g in branch_gates.items()}
            cu_seqlens = packing.cu_seqlens
        key_cmp = value_cmp = None
        if self.compressor is not None:
            # On the packed row with its cu_seqlens: a block never reads another sequence's tokens.
            key_cmp, value_cmp = learned_compressor.apply(
                self.compressor.as_dict(), k, v, compress_block_size=self.compress_length,
                compress_stride=self.compress_step, cu_seqlens=cu_seqlens)
        out = native_sparse_attention(
            q, k, v, g_cmp=branch_gates["g_cmp"], g_slc=branch_gates["g_slc"], g_swa=branch_gates.get("g_swa"),
            block_counts=self.block_counts, block_size=self.block_size,
            softmax_scale=self.softmax_scale, cu_seqlens=cu_seqlens, window_size=self.window_size,
            compress_block_size=self.compress_block_size, compress_stride=self.compress_stride,
            key_cmp=key_cmp, value_cmp=value_cmp, backend=self.backend,
        )
        if packing is None:
            return self.o_proj(out.reshape(batch, seq_len, self.num_heads * self.head_dim))
        out = self.o_proj(unpack(out, packing).reshape(batch, seq_len, self.num_heads * self.head_dim))
        # Zero at padding even with an output bias, so padding never leaks into a residual stream.
        return jnp.where(packing.valid[..., None], out, jnp.zeros((), out.dtype))

    def _decode(self, q, k, v, branch_gates, cache):
        """Append the chunk's keys and values, then attend its queries against the cache."""
        batch, seq_len = q.shape[:2]
        cache = cache.append(k.astype(cache.key.dtype), v.astype(cache.key.dtype), compressor=self._compressor_params())
        out = cache.attend(
            q.astype(cache.key.dtype), g_cmp=branch_gates["g_cmp"], g_slc=branch_gates["g_slc"],
            g_swa=branch_gates.get("g_swa"), block_counts=self.block_counts, softmax_scale=self.softmax_scale,
            window_size=self.window_size, backend=self.backend,
        )
        return self.o_proj(out.reshape(batch, seq_len, self.num_heads * self.head_dim)), cache


__all__ = ["CompressorParams", "NativeSparseAttention"]
