"""The float64 oracle's SPEC section 9 (compression geometry, supplied compression) checked
against section 1-3's independent code, by hand, and by central finite differences."""

import numpy as np
import pytest

from ejkernel_nsa.testing import oracle


def _inputs(rng, T, H, G, Dk, Dv, B=1):
    return dict(
        query=rng.normal(size=(B, T, G * H, Dk)),
        key=rng.normal(size=(B, T, H, Dk)),
        value=rng.normal(size=(B, T, H, Dv)),
        g_cmp=1 / (1 + np.exp(-rng.normal(size=(B, T, G * H)))),
        g_slc=1 / (1 + np.exp(-rng.normal(size=(B, T, G * H)))),
    )


def test_equal_geometry_is_sections_1_to_3():
    rng = np.random.default_rng(90)
    args = _inputs(rng, T=37, H=2, G=2, Dk=6, Dv=5)
    common = dict(block_counts=3, block_size=4, cu_seqlens=[0, 13, 13, 37])
    default = oracle.nsa_forward(**args, **common)
    general = oracle.nsa_forward(**args, **common, compress_block_size=4, compress_stride=4)
    for name in ("o", "o_cmp", "lse", "scores"):
        np.testing.assert_allclose(general[name], default[name], rtol=1e-12, atol=1e-12, err_msg=name)
    np.testing.assert_array_equal(general["block_indices"], default["block_indices"])
    d_out = rng.normal(size=default["o"].shape)
    fixed = dict(common, block_indices=default["block_indices"])
    grads = oracle.nsa_vjp(**args, d_out=d_out, **fixed)
    general_grads = oracle.nsa_vjp(**args, d_out=d_out, **fixed, compress_block_size=4, compress_stride=4)
    for name in ("query", "key", "value", "g_cmp", "g_slc"):
        np.testing.assert_allclose(general_grads[name], grads[name], rtol=1e-12, atol=1e-12, err_msg=name)


def test_paper_weights_are_half_one_one_one_half():
    # SPEC 9: with l=32, d=16, l'=64, selection block j takes blocks 4j-1 .. 4j+3 at 1/2, 1, 1, 1, 1/2.
    j = 3
    weights = [oracle.overlap_weight(i, j, 32, 16, 64) for i in range(4 * j - 3, 4 * j + 6)]
    assert weights == [0, 0, 0.5, 1, 1, 1, 0.5, 0, 0]
    # each compressed block lies inside the selection blocks it overlaps: its weights sum to 1
    for length, stride, selection in ((32, 16, 64), (16, 8, 32), (24, 8, 16), (8, 8, 32)):
        for i in range(12):
            assert sum(oracle.overlap_weight(i, j, length, stride, selection) for j in range(40)) == 1


def test_visible_compressed_blocks():
    counts = [oracle.num_visible_compressed(t, 32, 16) for t in (0, 30, 31, 46, 47, 63, 64)]
    assert counts == [0, 0, 1, 1, 2, 3, 3]


def test_overlapping_pool_by_hand_and_packed_layout():
    rng = np.random.default_rng(3)
    key, value = rng.normal(size=(1, 17, 1, 3)), rng.normal(size=(1, 17, 1, 2))
    cu = [0, 10, 17]
    k_cmp, v_cmp = oracle.overlapping_pool(key, value, 4, 2, cu)
    assert k_cmp.shape == (1, 17 // 2 + 2, 1, 3)
    spans = [(0, 4), (2, 6), (4, 8), (6, 10), (8, 10), (10, 14), (12, 16), (14, 17), (16, 17)]
    for row, (lo, hi) in enumerate(spans):
        np.testing.assert_allclose(k_cmp[0, row], key[0, lo:hi].mean(0))
        np.testing.assert_allclose(v_cmp[0, row], value[0, lo:hi].mean(0))
    np.testing.assert_array_equal(k_cmp[0, len(spans):], 0.0)


def test_transfer_without_overlap_sums_finer_blocks():
    # l = d = 16, l' = 64: each selection block's score is the sum of its four compressed blocks'
    # scores in sections 2-3 with BS = 16 (whose unforced blocks are those below IC16 - 1).
    rng = np.random.default_rng(7)
    args = _inputs(rng, T=200, H=1, G=2, Dk=4, Dv=3)
    q, key, value = args["query"], args["key"], args["value"]
    k_cmp, v_cmp = oracle.mean_pool(key, value, 16)
    _, lse = oracle.compressed_attention(q, k_cmp, v_cmp, 16)
    fine = oracle.selection_scores(q, k_cmp, lse, 16)
    coarse = oracle.transferred_scores(q, k_cmp, lse, 64, 16, 16)
    checked = 0
    for t in range(200):
        for j in range(1, t // 64 - 1):
            np.testing.assert_allclose(coarse[0, t, 0, j], fine[0, t, 0, 4 * j : 4 * j + 4].sum(), rtol=1e-12)
            checked += 1
    assert checked > 0


def test_transfer_keeps_the_probability_mass():
    rng = np.random.default_rng(11)
    args = _inputs(rng, T=70, H=2, G=3, Dk=4, Dv=3)
    cu = [0, 31, 70]
    k_cmp, v_cmp = oracle.overlapping_pool(args["key"], args["value"], 8, 4, cu)
    _, lse = oracle.overlapping_compressed_attention(args["query"], k_cmp, v_cmp, 8, 4, cu_seqlens=cu)
    raw = oracle.transferred_scores(args["query"], k_cmp, lse, 16, 8, 4, cu_seqlens=cu, forced=False)
    for start, end in ((0, 31), (31, 70)):
        for t in range(end - start):
            total = raw[0, start + t][raw[0, start + t] > -np.inf].reshape(2, -1).sum(axis=1)
            expected = 3.0 if oracle.num_visible_compressed(t, 8, 4) else 0.0
            np.testing.assert_allclose(total, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("supplied", [False, True])
def test_geometry_vjp_matches_central_differences(supplied):
    rng = np.random.default_rng(13 + supplied)
    T, H, G, Dk, Dv, length, stride, block = 29, 1, 2, 4, 3, 8, 4, 16
    cu = [0, 11, 29]
    args = _inputs(rng, T, H, G, Dk, Dv)
    if supplied:
        rows = T // stride + 2
        args["key_cmp"], args["value_cmp"] = rng.normal(size=(1, rows, H, Dk)), rng.normal(size=(1, rows, H, Dv))
    common = dict(block_counts=2, block_size=block, cu_seqlens=cu, window_size=0,
                  compress_block_size=length, compress_stride=stride)
    indices = oracle.nsa_forward(**args, **common)["block_indices"]
    d_out = rng.normal(size=(1, T, G * H, Dv))
    grads = oracle.nsa_vjp(**args, d_out=d_out, block_indices=indices, **common)

    def loss(**overrides):
        return np.sum(oracle.nsa_forward(**{**args, **overrides}, block_indices=indices, **common)["o"] * d_out)

    eps = 1e-6
    for name in args:
        directions = [rng.normal(size=args[name].shape) for _ in range(3)]
        numeric = [(loss(**{name: args[name] + eps * u}) - loss(**{name: args[name] - eps * u})) / (2 * eps)
                   for u in directions]
        analytic = [np.sum(grads[name] * u) for u in directions]
        rel = np.linalg.norm(np.subtract(analytic, numeric)) / np.linalg.norm(analytic)
        assert rel < 1e-6, (name, rel)
    if supplied:
        # keys reach the output through the selected branch only: no gradient through pooling
        only_selected = oracle.nsa_vjp(**{**args, "g_cmp": args["g_cmp"] * 0}, d_out=d_out, block_indices=indices,
                                       **common)
        np.testing.assert_allclose(only_selected["key"], grads["key"])


def test_geometry_errors():
    rng = np.random.default_rng(5)
    args = _inputs(rng, T=20, H=1, G=1, Dk=4, Dv=3)
    with pytest.raises(ValueError, match="compress_stride"):
        oracle.nsa_forward(**args, block_size=16, compress_block_size=12, compress_stride=8)
    with pytest.raises(ValueError, match="key_cmp has shape"):
        oracle.nsa_forward(**args, block_size=16, compress_block_size=8, compress_stride=4,
                           key_cmp=np.zeros((1, 4, 1, 4)), value_cmp=np.zeros((1, 4, 1, 3)))
    with pytest.raises(ValueError, match="together"):
        oracle.nsa_forward(**args, block_size=16, key_cmp=np.zeros((1, 2, 1, 4)))
