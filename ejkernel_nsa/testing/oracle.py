"""Slow float64 NumPy reading of SPEC.md (the NSA contract; docs/semantics.md in prose).

This is the test oracle every ejkernel_nsa backend is compared against. It is deliberately
naive: explicit Python loops over (sequence, token, head), one small softmax per query, float64
everywhere, no jax. Speed is not a goal; being obviously equal to the SPEC text is.

Layout of the code:
  * each attention branch is first turned into a *plan*: for every (batch row, token row, query
    head) the exact list of key rows it attends to. The forward pass and the analytic backward
    pass both walk the same plan, so they cannot disagree about which keys are visible.
  * the public functions mirror the SPEC sections 1-6; `nsa_vjp` is section 7 done by hand.

Conventions shared by all functions:
  * query [B, T, HQ, Dk], key [B, T, H, Dk], value [B, T, H, Dv], HQ = G * H, query head i reads
    kv head i // G.
  * with cu_seqlens, B == 1 and token i with cu[n] <= i < cu[n+1] sits at local position
    i - cu[n] of sequence n. block_indices hold *local* block indices.
  * compressed keys/values use flash-linear-attention's packed layout: without cu_seqlens
    [B, ceil(T / BS), H, D]; with cu_seqlens [1, T // BS + N, H, D], sequence n's blocks starting
    at row sum_{m<n} ceil(L_m / BS).
"""

from __future__ import annotations

import math

import numpy as np

# SPEC section 8: a selection is "well separated" when the n-th and (n+1)-th scores differ by
# more than this many units of G.
NEAR_TIE_GAP_PER_HEAD = 1e-3


# ----------------------------------------------------------------------------------------------
# small helpers
# ----------------------------------------------------------------------------------------------


def _as_f64(x):
    return None if x is None else np.asarray(x, dtype=np.float64)


def _resolve_scale(scale, head_dim_k: int) -> float:
    return float(head_dim_k) ** -0.5 if scale is None else float(scale)


def _group_size(num_q_heads: int, num_kv_heads: int) -> int:
    if num_kv_heads <= 0 or num_q_heads % num_kv_heads != 0:
        raise ValueError(f"HQ={num_q_heads} is not a multiple of H={num_kv_heads}")
    return num_q_heads // num_kv_heads


def _check_block_size(block_size) -> int:
    if int(block_size) != block_size or int(block_size) < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    return int(block_size)


def _num_blocks(length: int, block_size: int) -> int:
    return -(-length // block_size)


def _counts_array(block_counts, shape) -> np.ndarray:
    """block_counts as an int64 array [B, T, H] (an int is broadcast)."""
    counts = np.asarray(block_counts)
    if counts.ndim == 0:
        counts = np.full(shape, int(counts), dtype=np.int64)
    elif counts.shape != tuple(shape):
        raise ValueError(f"block_counts has shape {counts.shape}, expected {tuple(shape)}")
    if not np.issubdtype(counts.dtype, np.integer) and not np.all(counts == np.round(counts)):
        raise ValueError("block_counts must hold integers")
    counts = counts.astype(np.int64)
    if np.any(counts < 0):
        raise ValueError("block_counts must be >= 0")
    return counts


def _check_gate(gate, shape, name):
    gate = _as_f64(gate)
    if gate is not None and gate.shape != tuple(shape):
        raise ValueError(f"{name} has shape {gate.shape}, expected {tuple(shape)}")
    return gate


def sequences(batch: int, seq_len: int, cu_seqlens) -> list[tuple[int, int, int]]:
    """(batch_row, start, end) token ranges, one per sequence."""
    if cu_seqlens is None:
        return [(b, 0, seq_len) for b in range(batch)]
    cu = [int(x) for x in np.asarray(cu_seqlens).reshape(-1)]
    if batch != 1:
        raise ValueError(f"cu_seqlens needs B == 1, got B={batch}")
    if len(cu) < 2 or cu[0] != 0 or cu[-1] != seq_len:
        raise ValueError(f"cu_seqlens must start at 0 and end at T={seq_len}, got {cu}")
    if any(b < a for a, b in zip(cu[:-1], cu[1:])):
        raise ValueError(f"cu_seqlens must be non-decreasing, got {cu}")
    return [(0, cu[n], cu[n + 1]) for n in range(len(cu) - 1)]


def _segments(batch, seq_len, cu_seqlens, block_size):
    """(batch_row, start, end, first compressed row) per sequence, in the packed layout."""
    segments = []
    block_offset = 0
    for b, start, end in sequences(batch, seq_len, cu_seqlens):
        # without cu_seqlens every row has its own compressed tensor row, so offsets restart at 0
        segments.append((b, start, end, 0 if cu_seqlens is None else block_offset))
        block_offset += _num_blocks(end - start, block_size)
    return segments


def _num_compressed_rows(seq_len, num_sequences, block_size, varlen):
    if varlen:
        return seq_len // block_size + num_sequences
    return _num_blocks(seq_len, block_size)


# ----------------------------------------------------------------------------------------------
# plans: which key rows each (batch row, token row, query head) attends to
# ----------------------------------------------------------------------------------------------
# A plan is a list of (b, row, i, h, key_rows): query[b, row, i] attends to
# keys[b, key_rows, h] / values[b, key_rows, h]. (b, row, i) missing from the plan, or an empty
# key_rows, means "no key visible": output 0, lse -inf.


def _compressed_plan(segments, num_q_heads, group, block_size):
    plan = []
    for b, start, end, offset in segments:
        for t in range(end - start):
            num_complete = (t + 1) // block_size  # SPEC 2: only complete blocks are visible
            rows = np.arange(offset, offset + num_complete)
            for i in range(num_q_heads):
                plan.append((b, start + t, i, i // group, rows))
    return plan


def _selected_plan(segments, num_q_heads, group, block_size, block_indices, counts):
    plan = []
    num_slots = block_indices.shape[-1]
    for b, start, end, _ in segments:
        for t in range(end - start):
            current_block = t // block_size
            for i in range(num_q_heads):
                h = i // group
                n = min(int(counts[b, start + t, h]), num_slots)
                chosen = sorted(
                    {int(c) for c in block_indices[b, start + t, h, :n] if 0 <= c <= current_block}
                )
                local_keys = [
                    j
                    for c in chosen
                    for j in range(c * block_size, min((c + 1) * block_size, t + 1))
                ]
                plan.append((b, start + t, i, h, start + np.asarray(local_keys, dtype=np.int64)))
    return plan


def _window_plan(segments, num_q_heads, group, window_size):
    plan = []
    for b, start, end, _ in segments:
        for t in range(end - start):
            local_keys = np.arange(max(0, t - window_size + 1), t + 1)
            for i in range(num_q_heads):
                plan.append((b, start + t, i, i // group, start + local_keys))
    return plan


def _softmax_attend(q, keys, values, scale):
    """One query against a key set: (output, log-sum-exp, probabilities)."""
    scores = scale * (keys @ q)
    peak = scores.max()
    weights = np.exp(scores - peak)
    total = weights.sum()
    probs = weights / total
    return probs @ values, peak + math.log(total), probs


def _run_plan(plan, query, keys, values, scale):
    B, T, HQ, _ = query.shape
    out = np.zeros((B, T, HQ, values.shape[-1]))
    lse = np.full((B, T, HQ), -np.inf)
    for b, row, i, h, key_rows in plan:
        if len(key_rows) == 0:
            continue
        out[b, row, i], lse[b, row, i], _ = _softmax_attend(
            query[b, row, i], keys[b, key_rows, h], values[b, key_rows, h], scale
        )
    return out, lse


def _run_plan_backward(plan, query, keys, values, scale, d_out):
    """Gradients of sum(out * d_out) for the plan: (d_query, d_keys, d_values)."""
    d_query = np.zeros_like(query)
    d_keys = np.zeros_like(keys)
    d_values = np.zeros_like(values)
    for b, row, i, h, key_rows in plan:
        if len(key_rows) == 0:
            continue  # output is the constant 0: no gradient anywhere
        q = query[b, row, i]
        k = keys[b, key_rows, h]
        v = values[b, key_rows, h]
        do = d_out[b, row, i]
        o, _, p = _softmax_attend(q, k, v, scale)
        # o = sum_j p_j v_j, p = softmax(s), s_j = scale * <q, k_j>
        d_p = v @ do
        d_s = p * (d_p - do @ o)
        d_query[b, row, i] += scale * (d_s @ k)
        # np.add.at because key_rows never repeat here, but be safe against it anyway
        np.add.at(d_keys, (b, key_rows, h), scale * np.outer(d_s, q))
        np.add.at(d_values, (b, key_rows, h), np.outer(p, do))
    return d_query, d_keys, d_values


# ----------------------------------------------------------------------------------------------
# SPEC section 1: compression
# ----------------------------------------------------------------------------------------------


def mean_pool(key, value, block_size, cu_seqlens=None):
    """Block means of key and value in the packed compressed layout."""
    key, value = _as_f64(key), _as_f64(value)
    block_size = _check_block_size(block_size)
    B, T, H, Dk = key.shape
    segments = _segments(B, T, cu_seqlens, block_size)
    rows = _num_compressed_rows(T, len(segments), block_size, cu_seqlens is not None)
    k_cmp = np.zeros((B, rows, H, Dk))
    v_cmp = np.zeros((B, rows, H, value.shape[-1]))
    for b, start, end, offset in segments:
        for c in range(_num_blocks(end - start, block_size)):
            lo, hi = start + c * block_size, min(start + (c + 1) * block_size, end)
            k_cmp[b, offset + c] = key[b, lo:hi].mean(axis=0)
            v_cmp[b, offset + c] = value[b, lo:hi].mean(axis=0)
    return k_cmp, v_cmp


def _mean_pool_backward(d_k_cmp, d_v_cmp, key_shape, value_shape, block_size, cu_seqlens):
    """Spread each block's gradient evenly over the tokens the block averaged."""
    d_key = np.zeros(key_shape)
    d_value = np.zeros(value_shape)
    B, T = key_shape[:2]
    for b, start, end, offset in _segments(B, T, cu_seqlens, block_size):
        for c in range(_num_blocks(end - start, block_size)):
            lo, hi = start + c * block_size, min(start + (c + 1) * block_size, end)
            d_key[b, lo:hi] += d_k_cmp[b, offset + c] / (hi - lo)
            d_value[b, lo:hi] += d_v_cmp[b, offset + c] / (hi - lo)
    return d_key, d_value


# ----------------------------------------------------------------------------------------------
# SPEC section 2: compressed attention
# ----------------------------------------------------------------------------------------------


def compressed_attention(query, k_cmp, v_cmp, block_size, scale=None, cu_seqlens=None):
    """(o_cmp [B, T, HQ, Dv], lse [B, T, HQ]); lse = -inf, o_cmp = 0 where no block is visible."""
    query, k_cmp, v_cmp = _as_f64(query), _as_f64(k_cmp), _as_f64(v_cmp)
    block_size = _check_block_size(block_size)
    B, T, HQ, Dk = query.shape
    group = _group_size(HQ, k_cmp.shape[2])
    segments = _segments(B, T, cu_seqlens, block_size)
    plan = _compressed_plan(segments, HQ, group, block_size)
    return _run_plan(plan, query, k_cmp, v_cmp, _resolve_scale(scale, Dk))


# ----------------------------------------------------------------------------------------------
# SPEC section 3: selection
# ----------------------------------------------------------------------------------------------


def selection_scores(query, k_cmp, lse, block_size, scale=None, cu_seqlens=None):
    """Scores [B, T, H, NBmax] over local block indices; -inf for non-candidates (c > t // BS)."""
    query, k_cmp, lse = _as_f64(query), _as_f64(k_cmp), _as_f64(lse)
    block_size = _check_block_size(block_size)
    B, T, HQ, Dk = query.shape
    H = k_cmp.shape[2]
    group = _group_size(HQ, H)
    scale = _resolve_scale(scale, Dk)
    segments = _segments(B, T, cu_seqlens, block_size)
    max_blocks = max(
        (_num_blocks(end - start, block_size) for _, start, end, _ in segments), default=0
    )
    scores = np.full((B, T, H, max_blocks), -np.inf)
    for b, start, end, offset in segments:
        for t in range(end - start):
            current_block = t // block_size
            for h in range(H):
                score = np.zeros(current_block + 1)
                # blocks c < IC are complete (IC <= NC), so they have a compressed probability
                for c in range(current_block):
                    for i in range(h * group, (h + 1) * group):
                        s = scale * (query[b, start + t, i] @ k_cmp[b, offset + c, h])
                        score[c] += math.exp(s - lse[b, start + t, i])
                forced = {0, current_block} | ({current_block - 1} if current_block >= 1 else set())
                for c in forced:
                    score[c] = float(group)
                scores[b, start + t, h, : current_block + 1] = score
    return scores


def select_blocks(scores, block_counts, num_slots):
    """Top-n local block indices [B, T, H, num_slots] int64; ties -> larger index; -1 pads."""
    scores = _as_f64(scores)
    if np.isnan(scores).any():
        raise ValueError("selection scores contain NaN")
    B, T, H, _ = scores.shape
    num_slots = int(num_slots)
    if num_slots < 0:
        raise ValueError(f"num_slots must be >= 0, got {num_slots}")
    counts = _counts_array(block_counts, (B, T, H))
    out = np.full((B, T, H, num_slots), -1, dtype=np.int64)
    for b in range(B):
        for t in range(T):
            for h in range(H):
                n = min(int(counts[b, t, h]), num_slots)
                row = scores[b, t, h]
                candidates = [c for c in range(row.shape[0]) if row[c] > -np.inf]
                # highest score first; among equal scores the larger block index first
                ranked = sorted(candidates, key=lambda c: (-row[c], -c))
                chosen = ranked[:n]
                out[b, t, h, : len(chosen)] = chosen
    return out


def near_tie_mask(scores, block_counts, num_slots, group_size):
    """[B, T, H] True where the n-th and (n+1)-th scores differ by more than 1e-3 * G."""
    scores = _as_f64(scores)
    B, T, H, _ = scores.shape
    counts = _counts_array(block_counts, (B, T, H))
    threshold = NEAR_TIE_GAP_PER_HEAD * group_size
    mask = np.ones((B, T, H), dtype=bool)
    for b in range(B):
        for t in range(T):
            for h in range(H):
                n = min(int(counts[b, t, h]), int(num_slots))
                ranked = np.sort(scores[b, t, h][scores[b, t, h] > -np.inf])[::-1]
                # n == 0 selects nothing and <= n candidates selects everything: no choice made
                if n == 0 or len(ranked) <= n:
                    continue
                mask[b, t, h] = ranked[n - 1] - ranked[n] > threshold
    return mask


# ----------------------------------------------------------------------------------------------
# SPEC sections 4 and 5: selected and sliding-window attention
# ----------------------------------------------------------------------------------------------


def _check_block_indices(block_indices, shape_bth):
    block_indices = np.asarray(block_indices)
    if block_indices.ndim != 4 or block_indices.shape[:3] != tuple(shape_bth):
        raise ValueError(
            f"block_indices has shape {block_indices.shape}, expected {tuple(shape_bth)} + (S,)"
        )
    if not np.issubdtype(block_indices.dtype, np.integer):
        raise ValueError("block_indices must be integers")
    return block_indices.astype(np.int64)


def selected_attention(
    query, key, value, block_indices, block_counts, block_size, scale=None, cu_seqlens=None
):
    """o_slc [B, T, HQ, Dv] over the distinct, causal blocks of block_indices[..., :n]."""
    query, key, value = _as_f64(query), _as_f64(key), _as_f64(value)
    block_size = _check_block_size(block_size)
    B, T, HQ, Dk = query.shape
    H = key.shape[2]
    group = _group_size(HQ, H)
    block_indices = _check_block_indices(block_indices, (B, T, H))
    counts = _counts_array(block_counts, (B, T, H))
    segments = _segments(B, T, cu_seqlens, block_size)
    plan = _selected_plan(segments, HQ, group, block_size, block_indices, counts)
    out, _ = _run_plan(plan, query, key, value, _resolve_scale(scale, Dk))
    return out


def sliding_window_attention(query, key, value, window_size, scale=None, cu_seqlens=None):
    """o_swa [B, T, HQ, Dv] over keys [max(0, t - W + 1), t]."""
    query, key, value = _as_f64(query), _as_f64(key), _as_f64(value)
    window_size = int(window_size)
    if window_size <= 0:
        raise ValueError(f"sliding window needs window_size > 0, got {window_size}")
    B, T, HQ, Dk = query.shape
    group = _group_size(HQ, key.shape[2])
    # block_size only places compressed rows, which this branch does not use
    segments = _segments(B, T, cu_seqlens, 1)
    plan = _window_plan(segments, HQ, group, window_size)
    out, _ = _run_plan(plan, query, key, value, _resolve_scale(scale, Dk))
    return out


# ----------------------------------------------------------------------------------------------
# SPEC section 6: the whole forward pass, and section 7: its gradient
# ----------------------------------------------------------------------------------------------


def _prepare(query, key, value, g_cmp, g_slc, g_swa, block_size, scale, cu_seqlens, window_size):
    query, key, value = _as_f64(query), _as_f64(key), _as_f64(value)
    if query.ndim != 4 or key.ndim != 4 or value.ndim != 4:
        raise ValueError("query, key, value must be [B, T, heads, D]")
    B, T, HQ, Dk = query.shape
    if key.shape[:2] != (B, T) or value.shape[:3] != key.shape[:3] or key.shape[-1] != Dk:
        raise ValueError(
            f"inconsistent shapes: query {query.shape}, key {key.shape}, value {value.shape}"
        )
    group = _group_size(HQ, key.shape[2])
    gates = {
        name: _check_gate(gate, (B, T, HQ), name)
        for name, gate in (("g_cmp", g_cmp), ("g_slc", g_slc), ("g_swa", g_swa))
    }
    window_size = int(window_size)
    if window_size < 0:
        raise ValueError(f"window_size must be >= 0, got {window_size}")
    if gates["g_swa"] is not None and window_size == 0:
        raise ValueError("g_swa was given but window_size == 0 disables the sliding window")
    return dict(
        query=query,
        key=key,
        value=value,
        group=group,
        block_size=_check_block_size(block_size),
        scale=_resolve_scale(scale, Dk),
        segments=_segments(B, T, cu_seqlens, _check_block_size(block_size)),
        window_size=window_size,
        **gates,
    )


def nsa_forward(
    query,
    key,
    value,
    g_cmp=None,
    g_slc=None,
    block_indices=None,
    block_counts=16,
    block_size=64,
    scale=None,
    cu_seqlens=None,
    g_swa=None,
    window_size=0,
    max_block_counts=None,
    *,
    compress_block_size=None,
    compress_stride=None,
    key_cmp=None,
    value_cmp=None,
    _with_plans=False,
) -> dict:
    """Every intermediate of SPEC section 6 (see module docstring for layouts); with any of the
    SPEC 9 arguments (compression geometry, supplied key_cmp/value_cmp), section 9's path."""
    p = _prepare(query, key, value, g_cmp, g_slc, g_swa, block_size, scale, cu_seqlens, window_size)
    geometry = None
    if any(x is not None for x in (compress_block_size, compress_stride, key_cmp, value_cmp)):
        geometry = compression_geometry(block_size, compress_block_size, compress_stride)
        key_cmp, value_cmp = _supplied_compression(key_cmp, value_cmp, p["key"], p["value"], geometry[2],
                                                   cu_seqlens)
        if key_cmp is not None and p["g_cmp"] is None:
            raise ValueError("key_cmp/value_cmp are used only by the compressed branch, which needs g_cmp")
    query, key, value = p["query"], p["key"], p["value"]
    B, T, HQ, _ = query.shape
    H = key.shape[2]
    group, block_size, scale, segments = p["group"], p["block_size"], p["scale"], p["segments"]
    if p["g_cmp"] is None and block_indices is None:
        raise ValueError("block_indices is required when g_cmp is not given")
    counts = _counts_array(block_counts, (B, T, H))

    k_cmp = v_cmp = o_cmp = lse = scores = cmp_plan = None
    if p["g_cmp"] is not None and geometry is not None:
        _, length, stride = geometry
        if key_cmp is not None:
            k_cmp, v_cmp = key_cmp, value_cmp
        else:
            k_cmp, v_cmp = overlapping_pool(key, value, length, stride, cu_seqlens)
        cmp_plan = _overlapping_compressed_plan(_segments(B, T, cu_seqlens, stride), HQ, group, length, stride)
        o_cmp, lse = _run_plan(cmp_plan, query, k_cmp, v_cmp, scale)
    elif p["g_cmp"] is not None:
        k_cmp, v_cmp = mean_pool(key, value, block_size, cu_seqlens)
        cmp_plan = _compressed_plan(segments, HQ, group, block_size)
        o_cmp, lse = _run_plan(cmp_plan, query, k_cmp, v_cmp, scale)

    if block_indices is None:
        if max_block_counts is not None:
            num_slots = int(max_block_counts)
        elif np.ndim(block_counts) == 0:
            num_slots = int(block_counts)
        else:
            # SPEC 3: the slot count must be static, never read from the counts array
            raise ValueError("array block_counts with a computed selection needs max_block_counts")
        if geometry is None:
            scores = selection_scores(query, k_cmp, lse, block_size, scale, cu_seqlens)
        else:
            scores = transferred_scores(query, k_cmp, lse, block_size, geometry[1], geometry[2], scale,
                                        cu_seqlens)
        block_indices = select_blocks(scores, counts, num_slots)
    else:
        block_indices = _check_block_indices(block_indices, (B, T, H))
        num_slots = block_indices.shape[-1]

    slc_plan = _selected_plan(segments, HQ, group, block_size, block_indices, counts)
    o_slc, _ = _run_plan(slc_plan, query, key, value, scale)

    o_swa = swa_plan = None
    if p["window_size"] > 0:
        swa_plan = _window_plan(segments, HQ, group, p["window_size"])
        o_swa, _ = _run_plan(swa_plan, query, key, value, scale)

    o = o_slc * p["g_slc"][..., None] if p["g_slc"] is not None else o_slc.copy()
    if p["g_cmp"] is not None:
        o = o + p["g_cmp"][..., None] * o_cmp
    # SPEC 6 adds the window term only when its gate is given (see the report on this choice)
    if p["g_swa"] is not None:
        o = o + p["g_swa"][..., None] * o_swa

    result = {
        "o": o,
        "o_cmp": o_cmp,
        "o_slc": o_slc,
        "o_swa": o_swa,
        "lse": lse,
        "block_indices": block_indices,
        "scores": scores,
        "num_slots": num_slots,
    }
    if _with_plans:
        result["_internals"] = dict(
            prepared=p, k_cmp=k_cmp, v_cmp=v_cmp, cmp_plan=cmp_plan, slc_plan=slc_plan,
            swa_plan=swa_plan, geometry=geometry, supplied=key_cmp is not None,
        )
    return result


def nsa_vjp(
    query,
    key,
    value,
    d_out,
    g_cmp=None,
    g_slc=None,
    block_indices=None,
    block_counts=16,
    block_size=64,
    scale=None,
    cu_seqlens=None,
    g_swa=None,
    window_size=0,
    max_block_counts=None,
    *,
    compress_block_size=None,
    compress_stride=None,
    key_cmp=None,
    value_cmp=None,
) -> dict:
    """Analytic gradients of sum(o * d_out), the selection held fixed (it carries no gradient).
    With supplied key_cmp/value_cmp (SPEC 9), their gradients too, and none through pooling."""
    fwd = nsa_forward(
        query, key, value, g_cmp=g_cmp, g_slc=g_slc, block_indices=block_indices,
        block_counts=block_counts, block_size=block_size, scale=scale, cu_seqlens=cu_seqlens,
        g_swa=g_swa, window_size=window_size, max_block_counts=max_block_counts,
        compress_block_size=compress_block_size, compress_stride=compress_stride, key_cmp=key_cmp,
        value_cmp=value_cmp, _with_plans=True,
    )
    internals = fwd["_internals"]
    p = internals["prepared"]
    query, key, value, scale = p["query"], p["key"], p["value"], p["scale"]
    d_out = _as_f64(d_out)
    if d_out.shape != fwd["o"].shape:
        raise ValueError(f"d_out has shape {d_out.shape}, expected {fwd['o'].shape}")

    grads = {"g_cmp": None, "g_slc": None, "g_swa": None}

    # selected branch: o_slc enters o as g_slc * o_slc, or as o_slc itself
    if p["g_slc"] is not None:
        grads["g_slc"] = np.sum(d_out * fwd["o_slc"], axis=-1)
        d_o_slc = d_out * p["g_slc"][..., None]
    else:
        d_o_slc = d_out
    d_query, d_key, d_value = _run_plan_backward(
        internals["slc_plan"], query, key, value, scale, d_o_slc
    )

    if p["g_cmp"] is not None:
        grads["g_cmp"] = np.sum(d_out * fwd["o_cmp"], axis=-1)
        dq, d_k_cmp, d_v_cmp = _run_plan_backward(
            internals["cmp_plan"], query, internals["k_cmp"], internals["v_cmp"], scale,
            d_out * p["g_cmp"][..., None],
        )
        geometry = internals["geometry"]
        if internals["supplied"]:
            grads.update(key_cmp=d_k_cmp, value_cmp=d_v_cmp)
            dk, dv = 0.0, 0.0
        elif geometry is not None:
            dk, dv = _overlapping_pool_backward(
                d_k_cmp, d_v_cmp, key.shape, value.shape, geometry[1], geometry[2], cu_seqlens
            )
        else:
            dk, dv = _mean_pool_backward(
                d_k_cmp, d_v_cmp, key.shape, value.shape, p["block_size"], cu_seqlens
            )
        d_query, d_key, d_value = d_query + dq, d_key + dk, d_value + dv

    if p["g_swa"] is not None:
        grads["g_swa"] = np.sum(d_out * fwd["o_swa"], axis=-1)
        dq, dk, dv = _run_plan_backward(
            internals["swa_plan"], query, key, value, scale, d_out * p["g_swa"][..., None]
        )
        d_query, d_key, d_value = d_query + dq, d_key + dk, d_value + dv

    grads.update(query=d_query, key=d_key, value=d_value)
    return grads


# ----------------------------------------------------------------------------------------------
# SPEC section 9: compression geometry (block length l, stride d, selection block l') and
# caller-supplied compressed keys/values. Sections 1-3 above are its special case l = d = l';
# these functions are written separately so that the special case is a real check of both.
# ----------------------------------------------------------------------------------------------


def compression_geometry(block_size, compress_block_size=None, compress_stride=None):
    """(l', l, d): the selection block, the compression block length and its stride."""
    selection_block = _check_block_size(block_size)
    length = selection_block if compress_block_size is None else _check_block_size(compress_block_size)
    stride = length if compress_stride is None else _check_block_size(compress_stride)
    if length % stride or selection_block % stride:
        raise ValueError(f"compress_stride d={stride} must divide l={length} and l'={selection_block}")
    return selection_block, length, stride


def overlap_weight(i, j, length, stride, selection_block):
    """|C_i ∩ S_j| / l with C_i = [i*d, i*d + l) and S_j = [j*l', (j+1)*l')."""
    lo = max(i * stride, j * selection_block)
    hi = min(i * stride + length, (j + 1) * selection_block)
    return max(0, hi - lo) / length


def num_visible_compressed(t, length, stride):
    """Compressed blocks a query at position t sees: those with i*d + l <= t + 1."""
    return 0 if t + 1 < length else (t + 1 - length) // stride + 1


def overlapping_pool(key, value, length, stride, cu_seqlens=None):
    """Means over [i*d, min(i*d + l, L)) per sequence, packed as T // d + N rows with varlen."""
    key, value = _as_f64(key), _as_f64(value)
    B, T, H, Dk = key.shape
    segments = _segments(B, T, cu_seqlens, stride)
    rows = _num_compressed_rows(T, len(segments), stride, cu_seqlens is not None)
    k_cmp = np.zeros((B, rows, H, Dk))
    v_cmp = np.zeros((B, rows, H, value.shape[-1]))
    for b, start, end, offset in segments:
        for i in range(_num_blocks(end - start, stride)):
            lo, hi = start + i * stride, min(start + i * stride + length, end)
            k_cmp[b, offset + i] = key[b, lo:hi].mean(axis=0)
            v_cmp[b, offset + i] = value[b, lo:hi].mean(axis=0)
    return k_cmp, v_cmp


def _overlapping_pool_backward(d_k_cmp, d_v_cmp, key_shape, value_shape, length, stride, cu_seqlens):
    d_key = np.zeros(key_shape)
    d_value = np.zeros(value_shape)
    B, T = key_shape[:2]
    for b, start, end, offset in _segments(B, T, cu_seqlens, stride):
        for i in range(_num_blocks(end - start, stride)):
            lo, hi = start + i * stride, min(start + i * stride + length, end)
            d_key[b, lo:hi] += d_k_cmp[b, offset + i] / (hi - lo)
            d_value[b, lo:hi] += d_v_cmp[b, offset + i] / (hi - lo)
    return d_key, d_value


def _overlapping_compressed_plan(segments, num_q_heads, group, length, stride):
    plan = []
    for b, start, end, offset in segments:
        for t in range(end - start):
            rows = np.arange(offset, offset + num_visible_compressed(t, length, stride))
            for i in range(num_q_heads):
                plan.append((b, start + t, i, i // group, rows))
    return plan


def overlapping_compressed_attention(query, k_cmp, v_cmp, length, stride, scale=None, cu_seqlens=None):
    """(o_cmp, lse) of SPEC 9's compressed branch."""
    query, k_cmp, v_cmp = _as_f64(query), _as_f64(k_cmp), _as_f64(v_cmp)
    B, T, HQ, Dk = query.shape
    group = _group_size(HQ, k_cmp.shape[2])
    plan = _overlapping_compressed_plan(_segments(B, T, cu_seqlens, stride), HQ, group, length, stride)
    return _run_plan(plan, query, k_cmp, v_cmp, _resolve_scale(scale, Dk))


def transferred_scores(query, k_cmp, lse, block_size, length, stride, scale=None, cu_seqlens=None,
                       forced=True):
    """Selection scores [B, T, H, NB'max] of SPEC 9: score_j = sum over the group's heads and the
    visible compressed blocks i of p_i * |C_i ∩ S_j| / l; -inf for non-candidates. With
    `forced=False` the forced blocks keep their transferred score (for checking the transfer)."""
    query, k_cmp, lse = _as_f64(query), _as_f64(k_cmp), _as_f64(lse)
    B, T, HQ, Dk = query.shape
    H = k_cmp.shape[2]
    group = _group_size(HQ, H)
    scale = _resolve_scale(scale, Dk)
    segments = _segments(B, T, cu_seqlens, stride)
    max_blocks = max((_num_blocks(end - start, block_size) for _, start, end, _ in segments), default=0)
    scores = np.full((B, T, H, max_blocks), -np.inf)
    for b, start, end, offset in segments:
        for t in range(end - start):
            current_block = t // block_size
            visible = num_visible_compressed(t, length, stride)
            for h in range(H):
                score = np.zeros(current_block + 1)
                for i in range(visible):
                    p = sum(
                        math.exp(scale * (query[b, start + t, q] @ k_cmp[b, offset + i, h]) - lse[b, start + t, q])
                        for q in range(h * group, (h + 1) * group)
                    )
                    for j in range(current_block + 1):
                        score[j] += p * overlap_weight(i, j, length, stride, block_size)
                if forced:
                    for j in {0, current_block} | ({current_block - 1} if current_block >= 1 else set()):
                        score[j] = float(group)
                scores[b, start + t, h, : current_block + 1] = score
    return scores


def _supplied_compression(key_cmp, value_cmp, key, value, stride, cu_seqlens):
    """The caller's compressed keys/values, checked against SPEC 9's block count and layout."""
    if (key_cmp is None) != (value_cmp is None):
        raise ValueError("key_cmp and value_cmp must be given together")
    if key_cmp is None:
        return None, None
    key_cmp, value_cmp = _as_f64(key_cmp), _as_f64(value_cmp)
    B, T, H = key.shape[:3]
    rows = _num_compressed_rows(T, len(sequences(B, T, cu_seqlens)), stride, cu_seqlens is not None)
    for name, x, dim in (("key_cmp", key_cmp, key.shape[-1]), ("value_cmp", value_cmp, value.shape[-1])):
        if x.shape != (B, rows, H, dim):
            raise ValueError(f"{name} has shape {x.shape}, expected {(B, rows, H, dim)}")
    return key_cmp, value_cmp


# SPEC section 10: queries against a longer key sequence (decoding, chunked prefill)
# ----------------------------------------------------------------------------------------------
# query [B, TQ, HQ, Dk] against key [B, TK, H, Dk] with per-row key lengths L_b (default TK):
# query i of row b sits at position L_b - TQ + i and sees the keys [0, L_b) only. Written on its
# own (not through the packed-sequence plans above) so that the test comparing it with the last
# TQ rows of a full-sequence call compares two independent readings of the SPEC.


def row_lengths(batch, query_len, key_len, kv_lengths):
    """Each row's key length L_b, checked: TQ <= L_b <= TK."""
    if query_len > key_len:
        raise ValueError(f"TQ={query_len} exceeds TK={key_len}")
    lengths = [key_len] * batch if kv_lengths is None else [int(x) for x in np.asarray(kv_lengths).reshape(-1)]
    if len(lengths) != batch or any(not query_len <= n <= key_len for n in lengths):
        raise ValueError(f"kv_lengths must be {batch} ints in [TQ={query_len}, TK={key_len}], got {lengths}")
    return lengths


def _cached_queries(lengths, query_len):
    """(b, query row, position) for every query."""
    return [(b, i, n - query_len + i) for b, n in enumerate(lengths) for i in range(query_len)]


def mean_pool_cached(key, value, block_size, lengths):
    """[B, ceil(TK / BS), H, D] block means over each row's keys [0, L_b); blocks past L_b are 0."""
    key, value = _as_f64(key), _as_f64(value)
    B, TK, H, _ = key.shape
    num_blocks = _num_blocks(TK, block_size)
    k_cmp = np.zeros((B, num_blocks, H, key.shape[-1]))
    v_cmp = np.zeros((B, num_blocks, H, value.shape[-1]))
    for b, n in enumerate(lengths):
        for c in range(_num_blocks(n, block_size)):
            lo, hi = c * block_size, min((c + 1) * block_size, n)
            k_cmp[b, c] = key[b, lo:hi].mean(axis=0)
            v_cmp[b, c] = value[b, lo:hi].mean(axis=0)
    return k_cmp, v_cmp


def _cached_plans(queries, num_q_heads, group, block_size, window_size, block_indices, counts):
    """The compressed, selected and window plans (as above: (b, row, i, h, key rows))."""
    cmp_plan, slc_plan, swa_plan = [], [], []
    for b, row, t in queries:
        current_block = t // block_size
        for i in range(num_q_heads):
            h = i // group
            cmp_plan.append((b, row, i, h, np.arange((t + 1) // block_size)))
            if block_indices is not None:
                n = min(int(counts[b, row, h]), block_indices.shape[-1])
                chosen = sorted({int(c) for c in block_indices[b, row, h, :n] if 0 <= c <= current_block})
                keys = [j for c in chosen for j in range(c * block_size, min((c + 1) * block_size, t + 1))]
                slc_plan.append((b, row, i, h, np.asarray(keys, dtype=np.int64)))
            if window_size > 0:
                swa_plan.append((b, row, i, h, np.arange(max(0, t - window_size + 1), t + 1)))
    return cmp_plan, slc_plan, swa_plan


def _cached_selection_scores(query, k_cmp, lse, queries, group, block_size, scale):
    B, TQ, HQ, _ = query.shape
    H = k_cmp.shape[2]
    scores = np.full((B, TQ, H, k_cmp.shape[1]), -np.inf)
    for b, row, t in queries:
        current_block = t // block_size
        for h in range(H):
            score = np.zeros(current_block + 1)
            for c in range(current_block):
                for i in range(h * group, (h + 1) * group):
                    score[c] += math.exp(scale * (query[b, row, i] @ k_cmp[b, c, h]) - lse[b, row, i])
            for c in {0, current_block} | ({current_block - 1} if current_block >= 1 else set()):
                score[c] = float(group)
            scores[b, row, h, : current_block + 1] = score
    return scores


def nsa_forward_cached(
    query, key, value, kv_lengths=None, g_cmp=None, g_slc=None, block_indices=None, block_counts=16,
    block_size=64, scale=None, g_swa=None, window_size=0, max_block_counts=None,
) -> dict:
    """SPEC section 10: NSA of the TQ queries against the first L_b keys of each row."""
    query, key, value = _as_f64(query), _as_f64(key), _as_f64(value)
    B, TQ, HQ, Dk = query.shape
    TK, H = key.shape[1:3]
    group, block_size, scale = _group_size(HQ, H), _check_block_size(block_size), _resolve_scale(scale, Dk)
    gates = {name: _check_gate(g, (B, TQ, HQ), name) for name, g in (("g_cmp", g_cmp), ("g_slc", g_slc),
                                                                     ("g_swa", g_swa))}
    if gates["g_cmp"] is None and block_indices is None:
        raise ValueError("block_indices is required when g_cmp is not given")
    lengths = row_lengths(B, TQ, TK, kv_lengths)
    queries = _cached_queries(lengths, TQ)
    counts = _counts_array(block_counts, (B, TQ, H))
    window_size = int(window_size)

    k_cmp = v_cmp = o_cmp = lse = scores = None
    if gates["g_cmp"] is not None:
        k_cmp, v_cmp = mean_pool_cached(key, value, block_size, lengths)
        cmp_plan, _, _ = _cached_plans(queries, HQ, group, block_size, 0, None, counts)
        o_cmp, lse = _run_plan(cmp_plan, query, k_cmp, v_cmp, scale)
    if block_indices is None:
        num_slots = int(max_block_counts) if max_block_counts is not None else int(block_counts)
        scores = _cached_selection_scores(query, k_cmp, lse, queries, group, block_size, scale)
        block_indices = select_blocks(scores, counts, num_slots)
    else:
        block_indices = _check_block_indices(block_indices, (B, TQ, H))
        num_slots = block_indices.shape[-1]
    cmp_plan, slc_plan, swa_plan = _cached_plans(queries, HQ, group, block_size, window_size, block_indices, counts)
    o_slc, _ = _run_plan(slc_plan, query, key, value, scale)
    o = o_slc * gates["g_slc"][..., None] if gates["g_slc"] is not None else o_slc.copy()
    if gates["g_cmp"] is not None:
        o = o + gates["g_cmp"][..., None] * o_cmp
    o_swa = None
    if gates["g_swa"] is not None:
        o_swa, _ = _run_plan(swa_plan, query, key, value, scale)
        o = o + gates["g_swa"][..., None] * o_swa
    return dict(
        o=o, o_cmp=o_cmp, o_slc=o_slc, o_swa=o_swa, lse=lse, block_indices=block_indices, scores=scores,
        num_slots=num_slots, k_cmp=k_cmp, v_cmp=v_cmp, lengths=lengths,
        _plans=(cmp_plan, slc_plan, swa_plan), _gates=gates, _scale=scale, _block_size=block_size,
    )


def nsa_vjp_cached(query, key, value, d_out, kv_lengths=None, **options) -> dict:
    """Analytic gradients of sum(o * d_out) for `nsa_forward_cached`, the selection held fixed."""
    fwd = nsa_forward_cached(query, key, value, kv_lengths, **options)
    query, key, value, d_out = _as_f64(query), _as_f64(key), _as_f64(value), _as_f64(d_out)
    cmp_plan, slc_plan, swa_plan = fwd["_plans"]
    gates, scale = fwd["_gates"], fwd["_scale"]
    grads = {"g_cmp": None, "g_slc": None, "g_swa": None}
    d_slc = d_out
    if gates["g_slc"] is not None:
        grads["g_slc"] = np.sum(d_out * fwd["o_slc"], axis=-1)
        d_slc = d_out * gates["g_slc"][..., None]
    d_query, d_key, d_value = _run_plan_backward(slc_plan, query, key, value, scale, d_slc)
    if gates["g_cmp"] is not None:
        grads["g_cmp"] = np.sum(d_out * fwd["o_cmp"], axis=-1)
        dq, d_k_cmp, d_v_cmp = _run_plan_backward(
            cmp_plan, query, fwd["k_cmp"], fwd["v_cmp"], scale, d_out * gates["g_cmp"][..., None]
        )
        d_query += dq
        block_size = fwd["_block_size"]
        for b, n in enumerate(fwd["lengths"]):
            for c in range(_num_blocks(n, block_size)):
                lo, hi = c * block_size, min((c + 1) * block_size, n)
                d_key[b, lo:hi] += d_k_cmp[b, c] / (hi - lo)
                d_value[b, lo:hi] += d_v_cmp[b, c] / (hi - lo)
    if gates["g_swa"] is not None:
        grads["g_swa"] = np.sum(d_out * fwd["o_swa"], axis=-1)
        dq, dk, dv = _run_plan_backward(swa_plan, query, key, value, scale, d_out * gates["g_swa"][..., None])
        d_query, d_key, d_value = d_query + dq, d_key + dk, d_value + dv
    grads.update(query=d_query, key=d_key, value=d_value)
    return grads
