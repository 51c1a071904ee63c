"""Context parallelism: NSA over a sequence split across the devices of one mesh axis.

Each of the `n` devices of `seq_axis` holds `T / n` tokens of every input; queries and gates
never move. Per step (`jax.shard_map`, differentiated by JAX):

- compression runs on the local keys (each shard's tokens are whole blocks), then the compressed
  keys/values (`T / block_size` blocks, float32) are all-gathered: every query needs all the
  blocks before it;
- the keys and values are all-gathered once (every kv head, as mdy666's flash_nsa does) and
  serve both selected attention (a query may select any earlier block) and the sliding window
  (its `W`-token halo is read from the gathered keys, so it costs no exchange of its own);
- the compressed attention, the selection and the selected attention of the local queries run on
  the XLA pieces with each token's global position given as data (`Segments.token_indices`):
  the kernels assume queries and keys of one length;
- compression and the window go through the registry like any call (kernels included);
- backward, the transposes of the all-gathers reduce-scatter the key/value gradients.

Causality makes the shards' compressed-attention work grow with their position; `load_balance=
"zigzag"` gives shard `r` the chunks `r` and `2n - 1 - r` of `2n` equal chunks, so every shard
has the same work. The caller lays the tokens out that way once (`to_zigzag`); the output comes in
the same order (`from_zigzag` undoes it).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int
from jax.sharding import PartitionSpec as P

from ejkernel_nsa import api, registry
from ejkernel_nsa.problem import Piece, Segments
from ejkernel_nsa.sharding import AxisEntry, axis_names_of
from ejkernel_nsa.validation import check_nsa_call

LOAD_BALANCES = ("contiguous", "zigzag")
# The pieces that read keys at other shards' positions: XLA's, which take positions as data.
POSITIONED_PIECES = (Piece.COMPRESSED_ATTENTION, Piece.SELECTION, Piece.SELECTED_ATTENTION)


def chunk_order(parts: int, load_balance: str) -> np.ndarray:
    """The global chunk held at each local chunk slot, shard-major: `[parts * chunks_per_shard]`."""
    if load_balance == "contiguous":
        return np.arange(parts)
    return np.stack([np.arange(parts), 2 * parts - 1 - np.arange(parts)], axis=1).reshape(-1)


def zigzag_permutation(num_tokens: int, parts: int) -> np.ndarray:
    """Token order of the zigzag layout: position `i` of the laid-out axis holds token `perm[i]`."""
    if num_tokens % (2 * parts):
        raise ValueError(f"num_tokens: {num_tokens} is not divisible into 2 * {parts} zigzag chunks")
    chunk = num_tokens // (2 * parts)
    return (chunk_order(parts, "zigzag")[:, None] * chunk + np.arange(chunk)[None, :]).reshape(-1)


def to_zigzag(x, parts: int, axis: int = 1):
    """Reorder `x`'s token axis into the zigzag layout for `parts` shards (do it once, on the data)."""
    return _reorder(x, zigzag_permutation(x.shape[axis], parts), axis)


def from_zigzag(x, parts: int, axis: int = 1):
    """Undo `to_zigzag`."""
    return _reorder(x, np.argsort(zigzag_permutation(x.shape[axis], parts)), axis)


def _reorder(x, order: np.ndarray, axis: int):
    index = (slice(None),) * axis + (order,)
    sharding = getattr(jax.typeof(x), "sharding", None)
    if sharding is not None and any(entry is not None for entry in sharding.spec):
        # An explicitly sharded axis: the gather's output keeps the input's layout.
        return x.at[index].get(out_sharding=sharding)
    return x[index]


def context_parallel_nsa(
    query: Float[Array, "B T HQ Dk"],
    key: Float[Array, "B T H Dk"],
    value: Float[Array, "B T H Dv"],
    g_cmp: Float[Array, "B T HQ"] | None = None,
    g_slc: Float[Array, "B T HQ"] | None = None,
    block_indices: Int[Array, "B T H S"] | None = None,
    block_counts: int | Int[Array, "B T H"] = 16,
    block_size: int = 64,
    softmax_scale: float | None = None,
    cu_seqlens: Int[Array, " N+1"] | None = None,
    *,
    g_swa: Float[Array, "B T HQ"] | None = None,
    window_size: int = 0,
    max_block_counts: int | None = None,
    mesh: jax.sharding.Mesh,
    seq_axis: AxisEntry,
    batch_axis: AxisEntry = None,
    head_axis: AxisEntry = None,
    load_balance: str = "contiguous",
    backend: str | None = None,
) -> Float[Array, "B T HQ Dv"]:
    """`native_sparse_attention` with the token axis split over `mesh`'s `seq_axis`.

    Takes `native_sparse_attention`'s arguments, global shapes, plus the mesh and its axes
    (`batch_axis` / `head_axis` split those dimensions at the same time, with no communication).
    With `load_balance="zigzag"` every `[B, T, ...]` input (and `block_indices`' token axis) is in
    `to_zigzag` order and so is the output; block indices are global block numbers either way.
    `backend=` applies to the compression and the sliding window; the compressed attention, the
    selection and the selected attention always run on the XLA pieces (see the module docstring).

    Needs `T` divisible by `n` (`2n` with zigzag) into chunks of whole blocks
    (`T / n % block_size == 0`), and `window_size` at most one chunk. Packed sequences
    (`cu_seqlens`) are not supported.
    """
    if cu_seqlens is not None:
        raise ValueError("cu_seqlens: context parallelism does not support packed sequences; pass B rows instead")
    if load_balance not in LOAD_BALANCES:
        raise ValueError(f"load_balance: expected one of {LOAD_BALANCES}, got {load_balance!r}")
    if not isinstance(mesh, (jax.sharding.Mesh, jax.sharding.AbstractMesh)):
        raise TypeError(f"mesh: expected a jax.sharding.Mesh, got {type(mesh).__name__}")
    for name, entry in (("seq_axis", seq_axis), ("batch_axis", batch_axis), ("head_axis", head_axis)):
        for axis in axis_names_of(entry):
            if axis not in mesh.shape:
                raise ValueError(f"{name}: {axis!r} is not an axis of the mesh {dict(mesh.shape)}")
    if not axis_names_of(seq_axis):
        raise ValueError("seq_axis: expected a mesh axis name, got None")
    call = check_nsa_call(
        query, key, value, g_cmp=g_cmp, g_slc=g_slc, g_swa=g_swa, block_indices=block_indices,
        block_counts=block_counts, block_size=block_size, softmax_scale=softmax_scale,
        window_size=window_size, max_block_counts=max_block_counts,
    )
    problem = call.problem
    parts = int(np.prod([mesh.shape[a] for a in axis_names_of(seq_axis)]))
    chunks = parts * (2 if load_balance == "zigzag" else 1)
    if problem.seq_len % chunks or (problem.seq_len // chunks) % problem.block_size:
        raise ValueError(
            f"query: T={problem.seq_len} must split into {chunks} chunks ({load_balance}, {parts} shards of "
            f"{seq_axis!r}) of whole blocks of block_size={problem.block_size}"
        )
    chunk_len = problem.seq_len // chunks
    if problem.window_size > chunk_len:
        raise ValueError(f"window_size: {problem.window_size} exceeds one chunk of {chunk_len} tokens")
    for name, entry in (("batch", batch_axis), ("head", head_axis)):
        size = int(np.prod([mesh.shape[a] for a in axis_names_of(entry)]))
        dims = [problem.batch] if name == "batch" else [problem.num_q_heads, problem.num_kv_heads]
        if any(d % size for d in dims):
            raise ValueError(f"{name}_axis: {entry!r} ({size} shards) does not divide the {name} dimension {dims}")

    arrays = {"query": call.query, "key": call.key, "value": call.value, "g_cmp": call.g_cmp,
              "g_slc": call.g_slc, "g_swa": call.g_swa, "block_indices": call.block_indices,
              "block_counts": None if isinstance(call.block_counts, int) else call.block_counts}
    arrays = {name: x for name, x in arrays.items() if x is not None}
    spec = P(batch_axis, seq_axis, head_axis)
    options = dict(
        block_size=problem.block_size, scale=call.scale, window_size=problem.window_size,
        num_slots=problem.num_slots, int_counts=call.block_counts if isinstance(call.block_counts, int) else None,
        seq_axis=seq_axis, parts=parts, order=chunk_order(parts, load_balance), chunk_len=chunk_len,
        problem=problem, backend=backend,
    )

    def local(*values):
        return _local_nsa(dict(zip(arrays, values, strict=True)), **options)

    axis_names = set(axis_names_of(seq_axis)) | set(axis_names_of(batch_axis)) | set(axis_names_of(head_axis))
    mapped = jax.shard_map(local, mesh=mesh, in_specs=tuple(spec for _ in arrays), out_specs=spec,
                           axis_names=axis_names, check_vma=False)
    values = list(arrays.values())
    if any(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types):
        # Explicit axes: inputs laid out otherwise are brought to the split once, on entry.
        values = [jax.sharding.reshard(x, spec) for x in values]
    return jax.jit(mapped)(*values)


def _gather_tokens(x, seq_axis, order: np.ndarray):
    """All-gather the token (or block) axis 1 and put its chunks in global order."""
    gathered = jax.lax.all_gather(x, seq_axis, axis=1, tiled=True)
    if np.array_equal(order, np.arange(order.size)):
        return gathered
    per_chunk = gathered.shape[1] // order.size
    chunks = gathered.reshape(gathered.shape[0], order.size, per_chunk, *gathered.shape[2:])
    return jnp.take(chunks, np.argsort(order), axis=1).reshape(gathered.shape)


def _local_nsa(arrays, *, block_size, scale, window_size, num_slots, int_counts, seq_axis, parts, order,
               chunk_len, problem, backend):
    q, k, v = arrays["query"], arrays["key"], arrays["value"]
    batch, local_len, num_q_heads, _ = q.shape
    per_shard = order.size // parts
    shard = jax.lax.axis_index(seq_axis)
    # The global chunk of each local chunk slot, and the global position of each local token.
    chunk_ids = jnp.asarray(order.reshape(parts, per_shard))[shard]
    positions = (chunk_ids[:, None] * chunk_len + jnp.arange(chunk_len)[None, :]).reshape(-1).astype(jnp.int32)
    segments = Segments(jnp.array([0, local_len], jnp.int32),
                        jnp.stack([jnp.zeros_like(positions), positions], axis=-1))
    local_problem = dataclasses.replace(problem, batch=batch, seq_len=local_len, num_q_heads=num_q_heads,
                                        num_kv_heads=k.shape[2], num_seqs=1)
    pieces = registry.resolve(local_problem, "xla", "context parallelism (positions as data)", POSITIONED_PIECES)
    counts = arrays.get("block_counts", int_counts)

    out = jnp.zeros(q.shape[:3] + (v.shape[3],), jnp.float32)
    block_indices = arrays.get("block_indices")
    if "g_cmp" in arrays:
        k_cmp, v_cmp = api.mean_pool(k, v, block_size, backend=backend)
        k_cmp, v_cmp = (_gather_tokens(x, seq_axis, order) for x in (k_cmp, v_cmp))
        o_cmp, lse = pieces[Piece.COMPRESSED_ATTENTION](q, k_cmp, v_cmp, block_size=block_size, scale=scale,
                                                        segments=segments)
        out += api._gated(o_cmp, arrays["g_cmp"])
        if block_indices is None:
            q_sel, k_sel, lse_sel = jax.lax.stop_gradient((q, k_cmp, lse))
            block_indices = pieces[Piece.SELECTION](q_sel, k_sel, lse_sel, block_counts=counts, num_slots=num_slots,
                                                    block_size=block_size, scale=scale, segments=segments)
    k_all, v_all = (_gather_tokens(x, seq_axis, order) for x in (k, v))
    o_slc = pieces[Piece.SELECTED_ATTENTION](q, k_all, v_all, block_indices, counts, block_size=block_size,
                                             scale=scale, segments=segments)
    out += api._gated(o_slc, arrays.get("g_slc"))
    if "g_swa" in arrays:
        o_swa = _window(q, k_all, v_all, chunk_ids, chunk_len, window_size, scale, backend)
        out += api._gated(o_swa, arrays["g_swa"])
    return out.astype(q.dtype)


def _window(q, k_all, v_all, chunk_ids, chunk_len, window_size, scale, backend):
    """Sliding window of the local chunks: each chunk with its `W` preceding keys, packed into one
    row of sequences for the registry's window piece (the halo of global chunk 0 is a sequence of
    its own, so no query sees it), one row per batch row."""
    ext_len = window_size + chunk_len
    starts = chunk_ids * chunk_len

    def extended(x, fill_queries):
        parts = []
        for j in range(chunk_ids.shape[0]):
            local = x[:, j * chunk_len:(j + 1) * chunk_len] if fill_queries else jax.lax.dynamic_slice_in_dim(
                x, starts[j], chunk_len, axis=1)
            halo = (jnp.zeros((x.shape[0], window_size) + x.shape[2:], x.dtype) if fill_queries else
                    jax.lax.dynamic_slice_in_dim(x, jnp.maximum(starts[j] - window_size, 0), window_size, axis=1))
            parts += [halo, local]
        return jnp.concatenate(parts, axis=1)

    q_ext = extended(q, True)
    k_ext, v_ext = extended(k_all, False), extended(v_all, False)
    halo_alone = jnp.where(chunk_ids == 0, window_size, 0)
    bounds = [jnp.zeros((), jnp.int32)]
    for j in range(chunk_ids.shape[0]):
        bounds += [j * ext_len + halo_alone[j], (j + 1) * ext_len]
    # Each chunk is one sequence, or two when its halo stands alone: a fixed count of 2 per chunk.
    cu_seqlens = jnp.stack(bounds).astype(jnp.int32)

    def row(qr, kr, vr):
        return api.sliding_window_attention(qr[None], kr[None], vr[None], window_size, scale, cu_seqlens,
                                            backend=backend)[0]

    out_ext = jax.vmap(row)(q_ext, k_ext, v_ext)
    keep = [out_ext[:, j * ext_len + window_size:(j + 1) * ext_len] for j in range(chunk_ids.shape[0])]
    return jnp.concatenate(keep, axis=1)
