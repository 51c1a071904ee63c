"""The public NSA calls: the whole of SPEC.md in one function, and each piece on its own.

Every call checks its arguments (`validation`), describes itself as an `NSAProblem`, asks the
registry for an implementation per piece, and runs them. Which backend runs is decided at trace
time; see `ejkernel_nsa.config` for forcing one.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int
from ejkernel_nsa import config, registry
from ejkernel_nsa.input_limits import is_empty_call
from ejkernel_nsa.problem import NSAProblem, Piece, platform_of
from ejkernel_nsa.sharding import per_shard
from ejkernel_nsa.validation import (
    NSACall,
    check_compressed_args,
    check_geometry,
    check_nsa_call,
    check_pool_args,
    check_select_args,
    check_window_args,
    problem_geometry,
    static_int,
)


@per_shard
def native_sparse_attention(
    query: Float[Array, "B T HQ Dk"],
    key: Float[Array, "B TK H Dk"],
    value: Float[Array, "B TK H Dv"],
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
    compress_block_size: int | None = None,
    compress_stride: int | None = None,
    key_cmp: Float[Array, "B NC H Dk"] | None = None,
    value_cmp: Float[Array, "B NC H Dv"] | None = None,
    kv_lengths: Int[Array, " B"] | None = None,
    backend: config.Backend | None = None,
) -> Float[Array, "B T HQ Dv"]:
    """Native Sparse Attention (arXiv 2502.11089): compressed, selected and sliding-window branches.

    Args:
      query: `[B, T, HQ, Dk]`. key: `[B, TK, H, Dk]`. value: `[B, TK, H, Dv]`, with `HQ = G * H` for
        any integer group size `G`; query head `i` reads kv head `i // G`. `TK = T` for training;
        `TK > T` for decoding and chunked prefill (SPEC section 10): the queries are the last `T`
        positions of each row's keys.
      g_cmp, g_slc, g_swa: optional gates `[B, T, HQ]` of the three branches. With `g_cmp`, the
        compressed branch is added and (unless `block_indices` is given) selects the blocks.
      block_indices: `[B, T, H, S]` int, the caller's selection (local block indices; -1 = empty).
      block_counts: blocks each (token, kv head) selects: an int, or an int array `[B, T, H]`.
      block_size: the compression and selection block length.
      softmax_scale: defaults to `Dk ** -0.5`.
      cu_seqlens: `[N + 1]` int offsets of packed sequences (then `B == 1`); may be traced.
      window_size: the sliding window `W` (0 disables it; `W > 0` needs `g_swa`).
      max_block_counts: the static slot count `S` when `block_counts` is an array and the
        selection is computed.
      compress_block_size, compress_stride: the compression block length `l` (default
        `block_size`) and stride `d` (default `l`) of SPEC section 9: compressed block `i` covers
        positions `[i*d, i*d + l)`, and `block_size` stays the selection block `l'`. `d` must
        divide `l` and `block_size`. The paper's setting: `block_size=64, compress_block_size=32,
        compress_stride=16`.
      key_cmp, value_cmp: caller-supplied compressed keys/values `[B, NBc, H, Dk]` / `[B, NBc, H, Dv]`
        (a learned compressor's, see `ejkernel_nsa.compressor`) in place of mean pooling, with
        `NBc = ceil(T / d)` (packed: `T // d + N`); block `i` summarizes `[i*d, i*d + l)`.
        Gradients flow into them. Need `g_cmp`.
      kv_lengths: `[B]` int, each row's key length `L_b` (`T <= L_b <= TK`; may be traced): row
        `b`'s keys are `[0, L_b)`, its queries sit at positions `L_b - T + i`, and key slots past
        `L_b` never count. Defaults to `TK`. Not with `cu_seqlens`.
      backend: force one backend by name (see `ejkernel_nsa.backend_status()`), or some pieces
        each onto a backend, e.g. `{"sliding_window": "xla", "selected_attention": "triton"}`
        (the pieces left out are chosen automatically; see `ejkernel_nsa.config`).

    Returns:
      `[B, T, HQ, Dv]` in the query's dtype.

    Example:
      >>> import jax, jax.numpy as jnp, ejkernel_nsa
      >>> q, k, v, g = (jax.random.normal(jax.random.key(i), s) for i, s in
      ...               enumerate([(1, 256, 8, 64), (1, 256, 2, 64), (1, 256, 2, 64), (1, 256, 8)]))
      >>> ejkernel_nsa.native_sparse_attention(q, k, v, g_cmp=g, block_counts=4, block_size=32).shape
      (1, 256, 8, 64)
    """
    call = check_nsa_call(
        query, key, value, g_cmp=g_cmp, g_slc=g_slc, g_swa=g_swa, block_indices=block_indices,
        block_counts=block_counts, block_size=block_size, softmax_scale=softmax_scale,
        cu_seqlens=cu_seqlens, window_size=window_size, max_block_counts=max_block_counts,
        compress_block_size=compress_block_size, compress_stride=compress_stride, key_cmp=key_cmp,
        value_cmp=value_cmp,
        kv_lengths=kv_lengths,
    )
    return _run(call, _plan(call.problem, backend))


@per_shard
def apply_native_sparse_attention(
    query: Float[Array, "B T HQ Dk"],
    key: Float[Array, "B TK H Dk"],
    value: Float[Array, "B TK H Dv"],
    block_indices: Int[Array, "B T H S"],
    block_counts: int | Int[Array, "B T H"] = 16,
    block_size: int = 64,
    softmax_scale: float | None = None,
    cu_seqlens: Int[Array, " N+1"] | None = None,
    token_indices: Int[Array, "T 2"] | None = None,
    *,
    kv_lengths: Int[Array, " B"] | None = None,
    backend: config.Backend | None = None,
) -> Float[Array, "B T HQ Dv"]:
    """Attention over given blocks only (SPEC section 4): the selected branch without gates.

    As in `native_sparse_attention`, `key` / `value` may be longer than `query` and `kv_lengths`
    gives each row's key length (SPEC section 10).

    `block_indices` is `[B, T, H, S]` (local block indices, -1 for empty slots); each (token, kv
    head) uses the distinct entries of its first `block_counts` slots that are not in its future.
    `token_indices` (`[T, 2]`: sequence id and position per token, with `cu_seqlens`) may be passed
    when the caller already has it; otherwise it is derived from `cu_seqlens`.
    """
    call = check_nsa_call(
        query, key, value, block_indices=block_indices, block_counts=block_counts,
        block_size=block_size, softmax_scale=softmax_scale, cu_seqlens=cu_seqlens,
        token_indices=token_indices, kv_lengths=kv_lengths,
    )
    return _run(call, _plan(call.problem, backend))


def explain(query: Float[Array, "B T HQ Dk"], key: Float[Array, "B TK H Dk"], value: Float[Array, "B TK H Dv"],
            g_cmp: Float[Array, "B T HQ"] | None = None, g_slc: Float[Array, "B T HQ"] | None = None,
            block_indices: Int[Array, "B T H S"] | None = None, block_counts: int | Int[Array, "B T H"] = 16,
            block_size: int = 64, softmax_scale: float | None = None, cu_seqlens: Int[Array, " N+1"] | None = None,
            *, g_swa: Float[Array, "B T HQ"] | None = None, window_size: int = 0,
            max_block_counts: int | None = None, compress_block_size: int | None = None,
            compress_stride: int | None = None, key_cmp: Float[Array, "B NC H Dk"] | None = None,
            value_cmp: Float[Array, "B NC H Dv"] | None = None, kv_lengths: Int[Array, " B"] | None = None,
            backend: config.Backend | None = None) -> registry.Plan:
    """Which implementation each piece of this call would use, and why each other one was not.

    Takes the arguments of `native_sparse_attention`, checks them the same way, and runs nothing.
    `print(explain(...))` shows the table.
    """
    call = check_nsa_call(
        query, key, value, g_cmp=g_cmp, g_slc=g_slc, g_swa=g_swa, block_indices=block_indices,
        block_counts=block_counts, block_size=block_size, softmax_scale=softmax_scale,
        cu_seqlens=cu_seqlens, window_size=window_size, max_block_counts=max_block_counts,
        compress_block_size=compress_block_size, compress_stride=compress_stride, key_cmp=key_cmp,
        value_cmp=value_cmp,
        kv_lengths=kv_lengths,
    )
    return _plan(call.problem, backend)


def _plan(problem: NSAProblem, backend: config.Backend | None,
          pieces: tuple[Piece, ...] | None = None) -> registry.Plan:
    forced, forced_by = config.forced_backend(backend)
    return registry.resolve(problem, forced, forced_by, pieces)


def _run(call: NSACall, plan: registry.Plan) -> jax.Array:
    """Run the plan's pieces; the caller's compressed blocks (`call.key_cmp`, a learned
    compressor's or a serving cache's) replace the compression piece."""
    problem, segments, scale = call.problem, call.segments, call.scale
    q, k, v = call.query, call.key, call.value
    block_size = problem.block_size
    # SPEC section 10's row lengths reach only the implementations registered for them (the
    # registry declines the others), so a TQ == TK call passes exactly what it always did.
    rows = {} if call.kv_lengths is None else {"kv_lengths": call.kv_lengths}
    out = jnp.zeros(q.shape[:3] + (v.shape[3],), jnp.float32)
    if is_empty_call(q):  # no token (B or T is 0): the defined result is the empty output
        return out.astype(q.dtype)
    block_indices = call.block_indices
    # SPEC 9: the geometry's arguments reach only the implementations that declared it (empty
    # for the default geometry, so those of sections 1-3 are called exactly as before).
    geometry = {} if call.geometry is None else call.geometry.piece_kwargs()
    if call.g_cmp is not None:
        if call.key_cmp is not None:
            k_cmp, v_cmp = call.key_cmp, call.value_cmp
        else:
            k_cmp, v_cmp = plan[Piece.COMPRESSION](k, v, block_size=block_size, segments=segments, **geometry,
                                                   **rows)
        o_cmp, lse = plan[Piece.COMPRESSED_ATTENTION](q, k_cmp, v_cmp, block_size=block_size, scale=scale,
                                                      segments=segments, **geometry, **rows)
        out += _gated(o_cmp, call.g_cmp)
        if block_indices is None:
            # The selection is piecewise constant in its inputs: it carries no gradient.
            q_sel, k_sel, lse_sel = jax.lax.stop_gradient((q, k_cmp, lse))
            block_indices = plan[Piece.SELECTION](
                q_sel, k_sel, lse_sel, block_counts=call.block_counts, num_slots=problem.num_slots,
                block_size=block_size, scale=scale, segments=segments, **geometry, **rows,
            )
    if block_indices.shape[-1] > 0:  # S = 0 slots select nothing: the selected branch is 0
        o_slc = plan[Piece.SELECTED_ATTENTION](q, k, v, block_indices, call.block_counts, block_size=block_size,
                                               scale=scale, segments=segments, **rows)
        out += _gated(o_slc, call.g_slc)
    if call.g_swa is not None:
        o_swa = plan[Piece.SLIDING_WINDOW](q, k, v, window_size=problem.window_size, scale=scale, segments=segments,
                                           **rows)
        out += _gated(o_swa, call.g_swa)
    return out.astype(q.dtype)


def _gated(branch: jax.Array, gate: jax.Array | None) -> jax.Array:
    branch = branch.astype(jnp.float32)
    return branch if gate is None else branch * gate.astype(jnp.float32)[..., None]


# ---- the pieces, each usable alone -------------------------------------------------------------


def _piece_problem(query, key, value, block_size, segments, num_slots=0, window_size=0, per_token=False,
                   geometry=None):
    return NSAProblem(
        batch=key.shape[0], seq_len=key.shape[1] if query is None else query.shape[1],
        num_q_heads=key.shape[2] if query is None else query.shape[2], num_kv_heads=key.shape[2],
        # The query's dtype where there is one: the compressed keys are float32 whatever the
        # inputs, and a whole call describes the same piece by its inputs' dtype.
        head_dim=key.shape[3], value_dim=value.shape[3], dtype=str((key if query is None else query).dtype),
        block_size=block_size,
        num_slots=num_slots, window_size=window_size, num_seqs=None if segments is None else segments.num_seqs,
        per_token_counts=per_token, platform=platform_of(*(x for x in (query, key, value) if x is not None)),
        **({} if geometry is None else problem_geometry(geometry, supplied=False)),
    )


@per_shard
def mean_pool(key: Float[Array, "B T H Dk"], value: Float[Array, "B T H Dv"], block_size: int = 64,
              cu_seqlens: Int[Array, " N+1"] | None = None, *, compress_block_size: int | None = None,
              compress_stride: int | None = None, backend: config.Backend | None = None
              ) -> tuple[Float[Array, "B NB H Dk"], Float[Array, "B NB H Dv"]]:
    """Compress `key` `[B, T, H, Dk]` and `value` `[B, T, H, Dv]` into block means (SPEC section 1).

    With SPEC section 9's geometry (`compress_block_size=l`, `compress_stride=d`; `block_size` is
    then the selection block `l'`, checked only for `d` dividing it), block `i` is the mean over
    `[i*d, min(i*d + l, L))` and there are ceil(T / d) of them (packed: `T // d + N`).

    Returns `(key_cmp, value_cmp)`, `[B, NB, H, D]` float32, NB = ceil(T / block_size). They stay
    float32 whatever the inputs' dtype (SPEC section 1 accumulates in float32; they are
    `block_size` times smaller than the keys). A backend may round them to the query's dtype for
    its tensor-core dots (the Triton kernels do for 16-bit problems), within SPEC's tolerances.
    With `cu_seqlens`, the blocks of all sequences are packed on one axis of static length
    `T // block_size + N`: sequence n's blocks start at `sum(ceil(L_m / block_size), m < n)`, and
    the unused tail is zero.
    """
    key, value, block_size, segments = check_pool_args(key, value, block_size, cu_seqlens)
    geometry = check_geometry(block_size, compress_block_size, compress_stride)
    problem = _piece_problem(None, key, value, block_size, segments, geometry=geometry)
    fn = _plan(problem, backend, (Piece.COMPRESSION,))[Piece.COMPRESSION]
    return fn(key, value, block_size=block_size, segments=segments, **geometry.piece_kwargs())


@per_shard
def compressed_attention(query: Float[Array, "B T HQ Dk"], key_cmp: Float[Array, "B NB H Dk"],
                         value_cmp: Float[Array, "B NB H Dv"], block_size: int = 64,
                         softmax_scale: float | None = None, cu_seqlens: Int[Array, " N+1"] | None = None, *,
                         compress_block_size: int | None = None, compress_stride: int | None = None,
                         backend: config.Backend | None = None
                         ) -> tuple[Float[Array, "B T HQ Dv"], Float[Array, "B T HQ"]]:
    """Attention of each query over the complete compressed blocks before it (SPEC section 2).

    With SPEC section 9's geometry, block `i` covers `[i*d, i*d + l)` and is seen from position
    `i*d + l - 1` on; `key_cmp` / `value_cmp` may then be any compressor's blocks of that layout.

    `key_cmp` / `value_cmp` are `mean_pool`'s output. Returns `(out, lse)`: `[B, T, HQ, Dv]` in the
    query's dtype, and the float32 log-sum-exp `[B, T, HQ]` of the scaled scores (-inf, with a
    zero output, for the first `block_size - 1` tokens, which see no complete block).
    """
    geometry = check_geometry(static_int("block_size", block_size, 1), compress_block_size, compress_stride)
    query, key_cmp, value_cmp, block_size, scale, segments = check_compressed_args(
        query, key_cmp, value_cmp, block_size, softmax_scale, cu_seqlens, geometry
    )
    problem = _piece_problem(query, key_cmp, value_cmp, block_size, segments, geometry=geometry)
    fn = _plan(problem, backend, (Piece.COMPRESSED_ATTENTION,))[Piece.COMPRESSED_ATTENTION]
    return fn(query, key_cmp, value_cmp, block_size=block_size, scale=scale, segments=segments,
              **geometry.piece_kwargs())


@per_shard
def select_blocks(query: Float[Array, "B T HQ Dk"], key_cmp: Float[Array, "B NB H Dk"], lse: Float[Array, "B T HQ"],
                  block_counts: int | Int[Array, "B T H"] = 16, block_size: int = 64,
                  softmax_scale: float | None = None, cu_seqlens: Int[Array, " N+1"] | None = None, *,
                  max_block_counts: int | None = None, compress_block_size: int | None = None,
                  compress_stride: int | None = None, backend: config.Backend | None = None) -> Int[Array, "B T H S"]:
    """Top-k block selection (SPEC section 3): `[B, T, H, S]` int32 local block indices, -1 = empty.

    With SPEC section 9's geometry the indices are of selection blocks of `block_size`, each
    scored by the compressed probabilities weighted by `|C_i ∩ S_j| / l`.

    Scores each candidate block by the compressed-attention probability summed over the query
    heads of the group (`lse` is `compressed_attention`'s second output); the first, previous
    and current blocks are always chosen while there is room; ties go to the later block.
    `S` is `max_block_counts` if given, else the int `block_counts`.
    """
    geometry = check_geometry(static_int("block_size", block_size, 1), compress_block_size, compress_stride)
    query, key_cmp, lse, block_counts, num_slots, block_size, scale, segments = check_select_args(
        query, key_cmp, lse, block_counts, block_size, softmax_scale, cu_seqlens, max_block_counts, geometry
    )
    problem = _piece_problem(query, key_cmp, key_cmp, block_size, segments, num_slots,
                             per_token=not isinstance(block_counts, int), geometry=geometry)
    fn = _plan(problem, backend, (Piece.SELECTION,))[Piece.SELECTION]
    return jax.lax.stop_gradient(
        fn(query, key_cmp, lse, block_counts=block_counts, num_slots=num_slots, block_size=block_size, scale=scale,
           segments=segments, **geometry.piece_kwargs())
    )


@per_shard
def sliding_window_attention(query: Float[Array, "B T HQ Dk"], key: Float[Array, "B T H Dk"],
                             value: Float[Array, "B T H Dv"], window_size: int, softmax_scale: float | None = None,
                             cu_seqlens: Int[Array, " N+1"] | None = None, *, backend: config.Backend | None = None
                             ) -> Float[Array, "B T HQ Dv"]:
    """Causal attention over the last `window_size` keys of each query's own sequence (SPEC
    section 5). Returns `[B, T, HQ, Dv]` in the query's dtype."""
    query, key, value, window_size, scale, segments = check_window_args(
        query, key, value, window_size, softmax_scale, cu_seqlens
    )
    problem = _piece_problem(query, key, value, 1, segments, window_size=window_size)
    fn = _plan(problem, backend, (Piece.SLIDING_WINDOW,))[Piece.SLIDING_WINDOW]
    return fn(query, key, value, window_size=window_size, scale=scale, segments=segments)
