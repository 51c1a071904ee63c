"""Tests of the float64 oracle itself: it is only useful if it is trustworthy.

(a) its analytic gradient against central finite differences of its forward pass,
(b) hand-checkable cases of each SPEC rule,
(c) finiteness on random inputs.
"""

import math
import zlib

import numpy as np
import pytest

from ejkernel_nsa.testing import oracle


def _rng(seed):
    return np.random.default_rng(seed)


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _inputs(rng, B, T, H, G, Dk, Dv, gates=("g_cmp", "g_slc", "g_swa")):
    HQ = G * H
    args = dict(
        query=rng.normal(size=(B, T, HQ, Dk)),
        key=rng.normal(size=(B, T, H, Dk)),
        value=rng.normal(size=(B, T, H, Dv)),
    )
    for name in gates:
        args[name] = _sigmoid(rng.normal(size=(B, T, HQ)))
    return args


def _softmax_out(q, keys, values, scale):
    s = scale * keys @ q
    w = np.exp(s - s.max())
    return (w / w.sum()) @ values


# ----------------------------------------------------------------------------------------------
# (a) analytic gradient == finite differences
# ----------------------------------------------------------------------------------------------

GRAD_CASES = {
    # varlen, G=3, Dk != Dv, lengths not multiples of BS (one is), window on, every gate,
    # per-token block counts
    "varlen_all_gates": dict(
        B=1, T=30, H=2, G=3, Dk=8, Dv=5, block_size=4, cu_seqlens=[0, 7, 19, 30],
        window_size=5, gates=("g_cmp", "g_slc", "g_swa"), counts="array", max_block_counts=3,
    ),
    # batched, no slc gate, int block counts, explicit scale
    "batch_no_slc_gate": dict(
        B=2, T=13, H=1, G=2, Dk=6, Dv=7, block_size=3, cu_seqlens=None, window_size=4,
        gates=("g_cmp", "g_swa"), counts=2, max_block_counts=None, scale=0.37,
    ),
    # caller's indices without compression (g_cmp absent), no window
    "given_indices_no_cmp": dict(
        B=1, T=17, H=2, G=2, Dk=4, Dv=3, block_size=3, cu_seqlens=[0, 10, 17], window_size=0,
        gates=("g_slc",), counts=2, max_block_counts=None, given_indices=True,
    ),
}


@pytest.mark.parametrize("case", sorted(GRAD_CASES))
def test_vjp_matches_central_differences(case):
    cfg = dict(GRAD_CASES[case])
    rng = _rng(zlib.crc32(case.encode()))
    B, T, H, G = cfg["B"], cfg["T"], cfg["H"], cfg["G"]
    args = _inputs(rng, B, T, H, G, cfg["Dk"], cfg["Dv"], cfg["gates"])
    counts = rng.integers(1, 4, size=(B, T, H)) if cfg["counts"] == "array" else cfg["counts"]
    common = dict(
        block_counts=counts, block_size=cfg["block_size"], scale=cfg.get("scale"),
        cu_seqlens=cfg["cu_seqlens"], window_size=cfg["window_size"],
        max_block_counts=cfg["max_block_counts"],
    )
    if cfg.get("given_indices"):
        # random local indices incl. -1, duplicates and future blocks
        indices = rng.integers(-1, T // cfg["block_size"] + 2, size=(B, T, H, 3))
    else:
        indices = oracle.nsa_forward(**args, **common)["block_indices"]
    d_out = rng.normal(size=(B, T, G * H, cfg["Dv"]))

    grads = oracle.nsa_vjp(**args, d_out=d_out, block_indices=indices, **common)

    def loss(**overrides):
        full = {**args, **overrides}
        # the selection is held fixed: the forward's indices are passed back in
        return np.sum(oracle.nsa_forward(**full, block_indices=indices, **common)["o"] * d_out)

    eps = 1e-6
    for name in args:
        analytic, numeric = [], []
        directions = [rng.normal(size=args[name].shape) for _ in range(3)]
        # single coordinates too, so a wrong entry cannot hide inside a random projection
        for flat in rng.choice(args[name].size, size=6, replace=False):
            one_hot = np.zeros(args[name].size)
            one_hot[flat] = 1.0
            directions.append(one_hot.reshape(args[name].shape))
        for direction in directions:
            plus = loss(**{name: args[name] + eps * direction})
            minus = loss(**{name: args[name] - eps * direction})
            numeric.append((plus - minus) / (2 * eps))
            analytic.append(np.sum(grads[name] * direction))
        analytic, numeric = np.array(analytic), np.array(numeric)
        rel = np.linalg.norm(analytic - numeric) / np.linalg.norm(analytic)
        assert rel < 1e-6, (name, rel, analytic, numeric)
    for name in ("g_cmp", "g_slc", "g_swa"):
        assert (grads[name] is None) == (name not in args)


def test_vjp_reaches_every_key_through_pooling():
    # with only the cmp branch reaching a block's tail tokens, their key gradient must be the
    # block's compressed-key gradient divided by the block's token count, i.e. equal across it
    rng = _rng(811)
    B, T, H, G, BS = 1, 9, 1, 2, 4
    args = _inputs(rng, B, T, H, G, 4, 3, gates=("g_cmp",))
    # select nothing (block_counts 0): keys reach the output only through compression
    grads = oracle.nsa_vjp(
        **args, d_out=rng.normal(size=(B, T, G * H, 3)), block_counts=0, block_size=BS,
        max_block_counts=1,
    )
    d_key = grads["key"][0, :, 0]
    for lo, hi in ((0, 4), (4, 8)):
        np.testing.assert_allclose(d_key[lo:hi], np.broadcast_to(d_key[lo], d_key[lo:hi].shape))
    assert np.abs(d_key[:8]).max() > 0
    # token 8 opens block 2, which is never complete inside T=9: no gradient reaches it
    np.testing.assert_array_equal(d_key[8], 0.0)


# ----------------------------------------------------------------------------------------------
# (b) hand-checkable cases
# ----------------------------------------------------------------------------------------------


def test_sequences():
    assert oracle.sequences(2, 5, None) == [(0, 0, 5), (1, 0, 5)]
    assert oracle.sequences(1, 9, np.array([0, 4, 4, 9])) == [(0, 0, 4), (0, 4, 4), (0, 4, 9)]
    with pytest.raises(ValueError):
        oracle.sequences(2, 9, [0, 9])
    with pytest.raises(ValueError):
        oracle.sequences(1, 9, [0, 5])


def test_mean_pool_partial_blocks_and_varlen_layout():
    rng = _rng(3)
    key = rng.normal(size=(1, 10, 2, 3))
    value = rng.normal(size=(1, 10, 2, 5))
    k_cmp, v_cmp = oracle.mean_pool(key, value, 4)
    assert k_cmp.shape == (1, 3, 2, 3) and v_cmp.shape == (1, 3, 2, 5)
    np.testing.assert_allclose(k_cmp[0, 1], key[0, 4:8].mean(0))
    np.testing.assert_allclose(k_cmp[0, 2], (key[0, 8] + key[0, 9]) / 2)
    np.testing.assert_allclose(v_cmp[0, 2], (value[0, 8] + value[0, 9]) / 2)

    # lengths 3 and 7: sequence 0 has 1 block at row 0, sequence 1 has 2 blocks at rows 1, 2;
    # T // BS + N = 2 + 2 = 4 rows, the last unused and zero
    k_cmp, v_cmp = oracle.mean_pool(key, value, 4, cu_seqlens=[0, 3, 10])
    assert k_cmp.shape == (1, 4, 2, 3)
    np.testing.assert_allclose(k_cmp[0, 0], key[0, 0:3].mean(0))
    np.testing.assert_allclose(k_cmp[0, 1], key[0, 3:7].mean(0))
    np.testing.assert_allclose(v_cmp[0, 2], value[0, 7:10].mean(0))
    np.testing.assert_array_equal(k_cmp[0, 3], 0.0)


def test_compressed_attention_by_hand():
    rng = _rng(5)
    BS, G, Dk = 4, 2, 3
    args = _inputs(rng, 1, 12, 1, G, Dk, 2, gates=())
    q, k, v = args["query"], args["key"], args["value"]
    k_cmp, v_cmp = oracle.mean_pool(k, v, BS)
    o, lse = oracle.compressed_attention(q, k_cmp, v_cmp, BS)
    scale = Dk**-0.5
    # the first BS - 1 tokens see no complete block
    np.testing.assert_array_equal(o[0, : BS - 1], 0.0)
    assert np.all(lse[0, : BS - 1] == -np.inf)
    # tokens BS-1 .. 2BS-2 see exactly block 0: probability 1
    for t in range(BS - 1, 2 * BS - 1):
        for i in range(G):
            np.testing.assert_allclose(o[0, t, i], v[0, 0:BS, 0].mean(0))
            np.testing.assert_allclose(lse[0, t, i], scale * q[0, t, i] @ k[0, 0:BS, 0].mean(0))
    # token 11 sees blocks 0, 1, 2
    for i in range(G):
        s = scale * k_cmp[0, :3, 0] @ q[0, 11, i]
        p = np.exp(s) / np.exp(s).sum()
        np.testing.assert_allclose(o[0, 11, i], p @ v_cmp[0, :3, 0])
        np.testing.assert_allclose(lse[0, 11, i], math.log(np.exp(s).sum()))


def test_selection_scores_by_hand():
    rng = _rng(7)
    BS, G, H, Dk = 2, 3, 2, 4
    args = _inputs(rng, 1, 11, H, G, Dk, 3, gates=())
    q, k, v = args["query"], args["key"], args["value"]
    k_cmp, v_cmp = oracle.mean_pool(k, v, BS)
    _, lse = oracle.compressed_attention(q, k_cmp, v_cmp, BS)
    scores = oracle.selection_scores(q, k_cmp, lse, BS)
    assert scores.shape == (1, 11, H, 6)
    scale = Dk**-0.5
    t = 9  # IC = 4, NC = 5: candidates 0..4, forced 0, 3, 4, free 1, 2
    for h in range(H):
        row = scores[0, t, h]
        assert np.all(row[5:] == -np.inf)
        np.testing.assert_array_equal(row[[0, 3, 4]], float(G))
        for c in (1, 2):
            expect = 0.0
            for i in range(h * G, (h + 1) * G):
                s = scale * k_cmp[0, :5, h] @ q[0, t, i]
                expect += np.exp(s[c]) / np.exp(s).sum()
            np.testing.assert_allclose(row[c], expect)
    # token 0: only its own block 0 (forced)
    np.testing.assert_array_equal(scores[0, 0, :, 0], float(G))
    assert np.all(scores[0, 0, :, 1:] == -np.inf)


def test_select_blocks_padding_ties_and_counts():
    inf = np.inf
    scores = np.array(
        [
            [0.5, 0.5, 0.2, 0.5, -inf],  # three-way tie: larger indices win
            [3.0, 3.0, -inf, -inf, -inf],  # two candidates, four slots: pad with -1
            [0.1, 0.9, 0.3, 0.7, 0.2],
        ]
    ).reshape(1, 3, 1, 5)
    picked = oracle.select_blocks(scores, 2, 4)
    assert picked.dtype == np.int64 and picked.shape == (1, 3, 1, 4)
    assert set(picked[0, 0, 0]) == {3, 1, -1}
    assert sorted(picked[0, 1, 0]) == [-1, -1, 0, 1]
    assert set(picked[0, 2, 0]) == {1, 3, -1}
    # per-token counts, capped by the slot count
    counts = np.array([1, 9, 0]).reshape(1, 3, 1)
    picked = oracle.select_blocks(scores, counts, 3)
    assert sorted(picked[0, 0, 0]) == [-1, -1, 3]
    assert sorted(picked[0, 1, 0]) == [-1, 0, 1]
    assert list(picked[0, 2, 0]) == [-1, -1, -1]


def test_forced_blocks_always_chosen():
    rng = _rng(11)
    BS, G, H = 3, 2, 2
    args = _inputs(rng, 1, 20, H, G, 4, 4, gates=("g_cmp",))
    for n in (1, 2, 3):
        out = oracle.nsa_forward(**args, block_counts=n, block_size=BS)
        for t in range(20):
            ic = t // BS
            forced = [ic, ic - 1, 0] if ic >= 1 else [0]  # ties among forced: larger index first
            want = set(list(dict.fromkeys(forced))[:n])
            for h in range(H):
                got = set(out["block_indices"][0, t, h]) - {-1}
                assert want <= got, (n, t, h, got)


def test_near_tie_mask():
    inf = np.inf
    scores = np.array(
        [
            [2.0, 0.5, 0.4995, -inf],  # n=2: gap 5e-4 < 1e-3 * 2 -> near tie
            [2.0, 0.5, 0.45, -inf],  # gap 0.05 -> separated
            [2.0, 0.1, -inf, -inf],  # two candidates, n=2 -> nothing to decide
        ]
    ).reshape(1, 3, 1, 4)
    mask = oracle.near_tie_mask(scores, 2, 2, group_size=2)
    assert mask[0, :, 0].tolist() == [False, True, True]


def _selected_case(seed):
    rng = _rng(seed)
    BS, G, H, T = 3, 2, 2, 14
    args = _inputs(rng, 1, T, H, G, 4, 5, gates=())
    return rng, BS, G, H, T, args


def test_selected_attention_by_hand():
    rng, BS, G, H, T, args = _selected_case(13)
    q, k, v = args["query"], args["key"], args["value"]
    indices = np.full((1, T, H, 3), -1)
    t = 10  # IC = 3: block 3 is [9, 12) but only keys 9, 10 are causal
    indices[0, t, 0] = [3, 1, -1]
    indices[0, t, 1] = [0, -1, -1]
    o = oracle.selected_attention(q, k, v, indices, 3, BS)
    scale = 4**-0.5
    keys0 = [3, 4, 5, 9, 10]
    for i in range(G):
        np.testing.assert_allclose(
            o[0, t, i], _softmax_out(q[0, t, i], k[0, keys0, 0], v[0, keys0, 0], scale)
        )
        np.testing.assert_allclose(
            o[0, t, G + i], _softmax_out(q[0, t, G + i], k[0, 0:3, 1], v[0, 0:3, 1], scale)
        )
    # every other token selected nothing: zero output
    others = [s for s in range(T) if s != t]
    np.testing.assert_array_equal(o[0, others], 0.0)


def test_duplicates_future_blocks_and_slots_beyond_n_are_ignored():
    rng, BS, G, H, T, args = _selected_case(17)
    # a clean, duplicate-free, causal selection per token
    clean = np.full((1, T, H, 4), -1)
    for t in range(T):
        for h in range(H):
            ic = t // BS
            picks = rng.choice(ic + 1, size=min(2, ic + 1), replace=False)
            clean[0, t, h, : len(picks)] = picks
    reference = oracle.selected_attention(
        **args, block_indices=clean, block_counts=3, block_size=BS
    )

    messy = clean.copy()
    for t in range(T):
        for h in range(H):
            ic = t // BS
            messy[0, t, h, 2] = clean[0, t, h, 0]  # duplicate inside the first n = 3 slots
            messy[0, t, h, 3] = ic  # slot 4 is beyond n = 3: must be ignored
            if rng.random() < 0.5:
                messy[0, t, h, 2] = ic + 1 + rng.integers(0, 3)  # a future block instead
    got = oracle.selected_attention(**args, block_indices=messy, block_counts=3, block_size=BS)
    np.testing.assert_allclose(got, reference, rtol=1e-13, atol=1e-13)
    # other negatives behave like -1
    negative = np.where(clean < 0, -7, clean)
    got = oracle.selected_attention(**args, block_indices=negative, block_counts=3, block_size=BS)
    np.testing.assert_allclose(got, reference, rtol=1e-13, atol=1e-13)


def test_sliding_window_by_hand():
    rng = _rng(19)
    G, H, T, Dk = 2, 1, 9, 3
    args = _inputs(rng, 1, T, H, G, Dk, 4, gates=())
    q, k, v = args["query"], args["key"], args["value"]
    # W = 1: each query sees only its own key
    o = oracle.sliding_window_attention(q, k, v, 1)
    np.testing.assert_allclose(o[0, :, 0], v[0, :, 0])
    np.testing.assert_allclose(o[0, :, 1], v[0, :, 0])
    o = oracle.sliding_window_attention(q, k, v, 3, scale=0.8)
    for t in range(T):
        lo = max(0, t - 2)
        np.testing.assert_allclose(
            o[0, t, 1], _softmax_out(q[0, t, 1], k[0, lo : t + 1, 0], v[0, lo : t + 1, 0], 0.8)
        )


def test_output_combination_and_argument_errors():
    rng = _rng(23)
    B, T, H, G, BS = 1, 12, 2, 2, 3
    args = _inputs(rng, B, T, H, G, 4, 3)
    indices = rng.integers(-1, T // BS, size=(B, T, H, 2))
    given = dict(block_indices=indices, block_counts=2, block_size=BS, window_size=4)
    out = oracle.nsa_forward(**args, **given)
    # the caller's indices win over computing a selection; the cmp branch still contributes
    np.testing.assert_array_equal(out["block_indices"], indices)
    assert out["scores"] is None and out["num_slots"] == 2
    expect = (
        args["g_slc"][..., None] * out["o_slc"]
        + args["g_cmp"][..., None] * out["o_cmp"]
        + args["g_swa"][..., None] * out["o_swa"]
    )
    np.testing.assert_allclose(out["o"], expect)
    # without g_slc the selected branch enters ungated
    no_slc = {n: a for n, a in args.items() if n != "g_slc"}
    out2 = oracle.nsa_forward(**no_slc, **given)
    np.testing.assert_allclose(out2["o"] - out["o"], (1 - args["g_slc"][..., None]) * out["o_slc"])
    # computed selection: scores are reported and the used indices are the selected top-n
    out3 = oracle.nsa_forward(**args, block_counts=2, block_size=BS, window_size=4)
    np.testing.assert_array_equal(out3["block_indices"], oracle.select_blocks(out3["scores"], 2, 2))
    # default scale is Dk ** -0.5
    out4 = oracle.nsa_forward(**args, block_counts=2, block_size=BS, window_size=4, scale=0.5)
    np.testing.assert_allclose(out4["o"], out3["o"])

    no_cmp = {n: a for n, a in args.items() if n != "g_cmp"}
    with pytest.raises(ValueError):
        oracle.nsa_forward(**no_cmp, block_counts=2, block_size=BS, window_size=4)
    with pytest.raises(ValueError):
        oracle.nsa_forward(**args, block_counts=2, block_size=BS, window_size=0)
    with pytest.raises(ValueError):  # array counts need a static slot count
        oracle.nsa_forward(
            **args, block_counts=np.full((B, T, H), 2), block_size=BS, window_size=4
        )
    bad = dict(args, query=rng.normal(size=(B, T, 3, 4)))  # HQ=3 is not a multiple of H=2
    with pytest.raises(ValueError):
        oracle.nsa_forward(**bad, block_indices=indices, block_counts=2, block_size=BS)


def test_float32_inputs_are_upcast():
    rng = _rng(29)
    args = _inputs(rng, 1, 10, 1, 2, 4, 4, gates=("g_cmp",))
    out64 = oracle.nsa_forward(**args, block_counts=2, block_size=3)
    args32 = {n: a.astype(np.float32) for n, a in args.items()}
    out32 = oracle.nsa_forward(**args32, block_counts=2, block_size=3)
    assert out32["o"].dtype == np.float64
    np.testing.assert_allclose(out32["o"], out64["o"], rtol=1e-5, atol=1e-6)


def _run_both(args, common, cu, d_out):
    return (
        oracle.nsa_forward(**args, cu_seqlens=cu, **common),
        oracle.nsa_vjp(**args, d_out=d_out, cu_seqlens=cu, **common),
    )


def test_varlen_equals_each_sequence_alone():
    rng = _rng(31)
    cu = [0, 7, 19, 30]
    T, H, G, BS, Dv = 30, 2, 3, 4, 5
    args = _inputs(rng, 1, T, H, G, 6, Dv)
    counts = rng.integers(1, 4, size=(1, T, H))
    d_out = rng.normal(size=(1, T, G * H, Dv))
    common = dict(block_size=BS, window_size=5, max_block_counts=3)
    packed, packed_grads = _run_both(args, dict(common, block_counts=counts), cu, d_out)
    assert packed["scores"].shape == (1, T, H, 3)  # NBmax = ceil(12 / 4)
    for start, end in zip(cu[:-1], cu[1:]):
        part = {n: a[:, start:end] for n, a in args.items()}
        alone, alone_grads = _run_both(
            part, dict(common, block_counts=counts[:, start:end]), None, d_out[:, start:end]
        )
        for name in ("o", "o_cmp", "o_slc", "o_swa", "lse", "block_indices"):
            np.testing.assert_allclose(
                packed[name][:, start:end], alone[name], rtol=1e-12, atol=1e-12
            )
        nb = alone["scores"].shape[-1]
        np.testing.assert_allclose(packed["scores"][:, start:end, :, :nb], alone["scores"])
        assert np.all(packed["scores"][:, start:end, :, nb:] == -np.inf)
        for name in ("query", "key", "value", "g_cmp", "g_slc", "g_swa"):
            np.testing.assert_allclose(
                packed_grads[name][:, start:end], alone_grads[name], rtol=1e-12, atol=1e-12
            )


def test_varlen_of_equal_lengths_equals_batch():
    rng = _rng(37)
    T, H, G, BS, Dv = 10, 1, 4, 3, 3
    args = _inputs(rng, 2, T, H, G, 5, Dv)
    d_out = rng.normal(size=(2, T, G * H, Dv))
    common = dict(block_size=BS, block_counts=2, window_size=3)
    batched, batched_grads = _run_both(args, common, None, d_out)
    flat = {n: a.reshape(1, 2 * T, *a.shape[2:]) for n, a in args.items()}
    flat_d_out = d_out.reshape(1, 2 * T, G * H, Dv)
    packed, packed_grads = _run_both(flat, common, [0, T, 2 * T], flat_d_out)
    for name in ("o", "lse", "block_indices"):
        np.testing.assert_allclose(
            packed[name].reshape(batched[name].shape), batched[name], rtol=1e-12
        )
    for name in ("query", "key", "value", "g_cmp", "g_swa"):
        np.testing.assert_allclose(
            packed_grads[name].reshape(batched_grads[name].shape), batched_grads[name], rtol=1e-12
        )


# ----------------------------------------------------------------------------------------------
# (c) finiteness
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "B, T, H, G, Dk, Dv, BS, W, cu",
    [
        (2, 23, 1, 16, 8, 8, 4, 0, None),
        (1, 40, 2, 3, 16, 5, 8, 7, [0, 1, 2, 9, 40]),  # sequences shorter than a block
        (1, 33, 4, 1, 4, 12, 2, 33, [0, 16, 33]),
    ],
)
def test_finite_on_random_inputs(B, T, H, G, Dk, Dv, BS, W, cu):
    rng = _rng(zlib.crc32(repr((T, H, G)).encode()))
    gates = ("g_cmp", "g_slc", "g_swa") if W else ("g_cmp", "g_slc")
    args = _inputs(rng, B, T, H, G, Dk, Dv, gates)
    args["query"] *= 30.0  # large logits: the softmax must stay stable
    common = dict(block_counts=3, block_size=BS, cu_seqlens=cu, window_size=W)
    out = oracle.nsa_forward(**args, **common)
    for name in ("o", "o_cmp", "o_slc") + (("o_swa",) if W else ()):
        assert np.all(np.isfinite(out[name])), name
    # -inf marks non-candidate blocks; nothing else may be non-finite
    assert np.all(np.isfinite(out["scores"]) | (out["scores"] == -np.inf))
    # lse is -inf exactly where no complete block is visible, finite elsewhere
    for _, start, end in oracle.sequences(B, T, cu):
        for t in range(end - start):
            row = out["lse"][:, start + t]
            assert np.all(np.isfinite(row)) == ((t + 1) // BS > 0)
            assert np.all(row == -np.inf) == ((t + 1) // BS == 0)
    grads = oracle.nsa_vjp(**args, d_out=rng.normal(size=out["o"].shape), **common)
    for name, grad in grads.items():
        if grad is not None:
            assert np.all(np.isfinite(grad)), name
