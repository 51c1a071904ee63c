"""Per-token bookkeeping and query chunking shared by the XLA pieces.

Every XLA piece works on one batch row of `T` tokens (the batch axis is vmapped) and sees, per
token, its position in its own sequence and where that sequence starts; this is what makes packed
varlen batches and ordinary rows one code path. Queries are processed in chunks under
`jax.checkpoint`, so neither the forward nor the backward pass ever holds more than one chunk's
score matrix or gathered keys: peak memory grows linearly in `T`.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from ejkernel_nsa.backends.common.containment import finite_or_zero  # noqa: F401 (the pieces read it here)

# Upper bound on the bytes that one query chunk's intermediates may take, for the whole batch.
CHUNK_BYTES = 256 * 2**20
MIN_CHUNK, MAX_CHUNK = 16, 1024


def chunk_len(num_tokens: int, bytes_per_query: int) -> int:
    """Largest power-of-two chunk within `CHUNK_BYTES`, clamped to [MIN_CHUNK, MAX_CHUNK] and to
    the (rounded-up) sequence length."""
    if num_tokens < MIN_CHUNK:
        # A decoding step's one query (or a handful) is one chunk of its own size: padding it
        # to MIN_CHUNK would multiply the step's work.
        return max(num_tokens, 1)
    limit = max(MIN_CHUNK, min(MAX_CHUNK, CHUNK_BYTES // max(bytes_per_query, 1)))
    chunk = MIN_CHUNK
    while chunk * 2 <= limit and chunk < num_tokens:
        chunk *= 2
    return chunk


def query_positions(pos: jax.Array, batch: int, kv_lengths: jax.Array | None) -> jax.Array:
    """`[B, T]` int32: each query's position in its sequence. Without `kv_lengths`, the token
    layout's `pos` in every row; with them (SPEC section 10), query i of row b sits at
    `L_b - T + i`, the queries being the last `T` tokens of the row's `L_b` keys."""
    if kv_lengths is None:
        return jnp.broadcast_to(pos, (batch,) + pos.shape)
    return (kv_lengths[:, None] - pos.shape[0] + pos[None, :]).astype(jnp.int32)


def map_query_chunks(body: Callable, chunk: int, *per_token):
    """Apply `body(chunk_start, *chunk_slices)` to consecutive query chunks and stitch the results.

    Each array in `per_token` has the token axis first; it is padded to a multiple of `chunk`
    (padded tokens compute garbage that is sliced off). `body` returns arrays with the chunk's
    token axis first. Checkpointing the body keeps only its inputs for the backward pass.
    """
    num_tokens = per_token[0].shape[0]
    num_chunks = -(-num_tokens // chunk)
    padded = num_chunks * chunk
    stacked = [
        jnp.pad(x, [(0, padded - num_tokens)] + [(0, 0)] * (x.ndim - 1)).reshape(
            (num_chunks, chunk) + x.shape[1:]
        )
        for x in per_token
    ]
    starts = jnp.arange(num_chunks, dtype=jnp.int32) * chunk
    rematerialized = jax.checkpoint(body)
    if num_chunks == 1:
        outs = rematerialized(starts[0], *[x[0] for x in stacked])
        outs = jax.tree.map(lambda y: y[None], outs)
    else:
        outs = jax.lax.map(lambda args: rematerialized(*args), (starts, *stacked))
    return jax.tree.map(lambda y: y.reshape((padded,) + y.shape[2:])[:num_tokens], outs)


def masked_softmax(scores: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Softmax over the last axis restricted to `mask`, in float32.

    Returns the probabilities (zero where masked, and all zero for a row with nothing visible)
    and the log-sum-exp (-inf for such a row). The `where`s keep both finite-gradient: no
    exp(-inf - -inf) or log(0) is ever differentiated.
    """
    scores = jnp.where(mask, scores, -jnp.inf)
    row_max = jnp.max(scores, axis=-1, keepdims=True)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    unnormalized = jnp.where(mask, jnp.exp(scores - row_max), 0.0)
    total = jnp.sum(unnormalized, axis=-1, keepdims=True)
    seen = total > 0
    safe_total = jnp.where(seen, total, 1.0)
    probs = unnormalized / safe_total
    lse = jnp.where(seen, row_max + jnp.log(safe_total), -jnp.inf)
    return probs, lse[..., 0]


def matmul(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
    """`einsum` accumulating in float32. Float32 operands run at full precision: XLA on a GPU would
    otherwise round them to tf32, outside the contract's float32 tolerance."""
    full = jnp.result_type(a, b) == jnp.float32
    precision = jax.lax.Precision.HIGHEST if full else None
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32, precision=precision)


def split_heads(query: jax.Array, num_kv_heads: int) -> jax.Array:
    """`[..., HQ, D]` -> `[..., H, G, D]`: query head i belongs to kv head i // G."""
    *lead, num_q_heads, dim = query.shape
    return query.reshape(*lead, num_kv_heads, num_q_heads // num_kv_heads, dim)


def merge_heads(x: jax.Array) -> jax.Array:
    *lead, num_kv_heads, group, dim = x.shape
    return x.reshape(*lead, num_kv_heads * group, dim)


# ---- containment (SPEC section 8) ----------------------------------------------------------------
# A masked probability is exactly 0, but 0 * NaN = NaN: multiplying it by a NaN/Inf key or value
# that the query cannot see would leak that value. So the products run on keys and values whose
# non-finite entries are zeroed (`finite_or_zero`, shared with the kernel backends), and a query
# whose *visible* set holds a non-finite key or value gets NaN back (its result is undefined).
# The NaN enters as a factor on that query's visible probabilities, not as a `where` on its
# output: a `where` has gradient 0 on the branch it drops, which gave such a query (and the keys it
# sees) finite gradients. As a factor, its gradients are NaN, and nothing else's: the masked
# probabilities keep factor 1 and value 0, and the softmax's backward reaches the raw scores
# through `where(mask, ...)`, which passes exact zeros where masked. This is what the kernel
# backends do (backends/common/containment.py: lse NaN and delta 0 for such a row).


def nonfinite_rows(key: jax.Array, value: jax.Array) -> jax.Array:
    """`[N, H, D*]` keys and values -> `[N, H]` float32: 1 where the row holds a NaN or Inf."""
    finite = jnp.all(jnp.isfinite(key), axis=-1) & jnp.all(jnp.isfinite(value), axis=-1)
    return (~finite).astype(jnp.float32)


def _saw_nonfinite(seen_nonfinite: jax.Array, ndim: int) -> jax.Array:
    """`seen_nonfinite` `[C, H]` (counts) as a boolean broadcast over `ndim - 2` trailing axes."""
    return (seen_nonfinite > 0).reshape(seen_nonfinite.shape + (1,) * (ndim - seen_nonfinite.ndim))


def poisoned_probs(probs: jax.Array, mask: jax.Array, seen_nonfinite: jax.Array) -> jax.Array:
    """`probs` `[C, H, G, K]` (any axes before `H`'s trailing ones) times NaN where `mask` (the
    softmax's, broadcastable) is set for a (token, kv head) whose count of visible non-finite rows
    `seen_nonfinite` `[C, H]` is positive, times 1 elsewhere."""
    bad = _saw_nonfinite(seen_nonfinite, probs.ndim) & mask
    return probs * jnp.where(bad, jnp.float32(jnp.nan), jnp.float32(1.0))


def poisoned(x: jax.Array, seen_nonfinite: jax.Array) -> jax.Array:
    """`x` `[C, H, ...]` with NaN for the (token, kv head) pairs that saw a non-finite row. For
    values without a gradient path of their own (the compressed lse, which feeds the selection)."""
    return jnp.where(_saw_nonfinite(seen_nonfinite, x.ndim), jnp.asarray(jnp.nan, x.dtype), x)


def count_visible(spec: str, mask: jax.Array, bad_rows: jax.Array) -> jax.Array:
    """How many non-finite rows each query sees: `einsum(spec, mask, bad_rows)` of 0/1 values,
    exact in float32 (full precision, so no tf32 rounding on a GPU)."""
    return jnp.einsum(spec, mask.astype(jnp.float32), bad_rows, precision=jax.lax.Precision.HIGHEST)
