"""A toy backend, `toy`: what `backends/<name>/__init__.py` holds, as docs/registry.md's "Adding a
backend" walks through it. Two pieces in dense `jax.numpy` (a `[T, T]` mask per batch row and
head, so small sequences only), differentiated by JAX: selected attention (SPEC section 4) and
the sliding window (section 5). It declines packed sequences rather than compute them wrongly.

It registers itself when imported, as a backend does: only `tests/test_adding_a_backend.py`
imports it, the way the registry loads a real one, on copies of the registry's tables. The test
then explains a call, forces the toy, and checks it against the oracle with
`ejkernel_nsa.testing.check_backends`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ejkernel_nsa.problem import NSAProblem, Piece
from ejkernel_nsa.registry import Backend, register, register_backend

NAME = "toy"
# Above the XLA fallback's 0: where `supports` accepts a call, the toy is the automatic choice.
PRIORITY = 5
# The dense masks are [T, T]: beyond this the toy declines instead of exhausting memory.
MAX_TOKENS = 4096

register_backend(Backend(NAME, "dense jax.numpy attention (a toy for the docs and tests)", lambda: None))


def supports(problem: NSAProblem) -> str | None:
    if problem.num_seqs is not None:
        return "packed sequences (cu_seqlens) are not supported"
    if problem.seq_len > MAX_TOKENS:
        return f"at most {MAX_TOKENS} tokens (dense [T, T] masks), got {problem.seq_len}"
    return None


def _attend(query, key, value, visible, scale):
    """Softmax attention of each query row over the keys `visible` [B, T, H, T] marks for its kv
    head, in float32; a row that sees no key gets 0."""
    batch, num_tokens, num_q_heads, head_dim = query.shape
    num_kv_heads = key.shape[2]
    group = num_q_heads // num_kv_heads
    q = query.astype(jnp.float32).reshape(batch, num_tokens, num_kv_heads, group, head_dim)
    scores = jnp.einsum("bthgd,bshd->bthgs", q, key.astype(jnp.float32)) * scale
    mask = visible[:, :, :, None, :]
    scores = jnp.where(mask, scores, -jnp.inf)
    # A row with nothing visible: softmax of all -inf is NaN, so shift it to zeros first.
    any_visible = mask.any(axis=-1, keepdims=True)
    probs = jax.nn.softmax(jnp.where(any_visible, scores, 0.0), axis=-1) * any_visible
    out = jnp.einsum("bthgs,bshd->bthgd", probs, value.astype(jnp.float32))
    return out.reshape(batch, num_tokens, num_q_heads, value.shape[3]).astype(query.dtype)


@register(Piece.SELECTED_ATTENTION, backend=NAME, platforms=("cpu", "gpu", "tpu"), priority=PRIORITY,
          supports=supports)
def selected_attention(query, key, value, block_indices, block_counts, *, block_size, scale, segments):
    """Each token attends to the keys of its first `block_counts` selected blocks (empty slots,
    duplicates and future keys ignored: SPEC section 4)."""
    batch, num_tokens, num_kv_heads, num_slots = block_indices.shape
    counts = jnp.broadcast_to(jnp.asarray(block_counts), (batch, num_tokens, num_kv_heads))
    in_count = jnp.arange(num_slots) < counts[..., None]
    chosen = jnp.where(in_count & (block_indices >= 0), block_indices, -1)  # [B, T, H, S]
    key_block = jnp.arange(num_tokens) // block_size
    selected = (chosen[..., :, None] == key_block).any(axis=-2)  # [B, T, H, T]
    causal = jnp.arange(num_tokens)[None, :] <= jnp.arange(num_tokens)[:, None]
    return _attend(query, key, value, selected & causal[None, :, None, :], scale)


@register(Piece.SLIDING_WINDOW, backend=NAME, platforms=("cpu", "gpu", "tpu"), priority=PRIORITY,
          supports=supports)
def sliding_window(query, key, value, *, window_size, scale, segments):
    """Each token attends to keys `[max(0, t - W + 1), t]` (SPEC section 5)."""
    batch, num_tokens, num_kv_heads = key.shape[:3]
    t, s = jnp.arange(num_tokens)[:, None], jnp.arange(num_tokens)[None, :]
    window = (s <= t) & (s > t - window_size)
    return _attend(query, key, value, jnp.broadcast_to(window[None, :, None, :],
                                                       (batch, num_tokens, num_kv_heads, num_tokens)), scale)
