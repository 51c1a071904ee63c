"""The oracle's SPEC section 10 (queries against a longer key sequence) against its own
full-sequence reading: the TQ queries of row b are the last TQ rows of a full-sequence call over
that row's first L_b keys, in value and in gradient; key slots past L_b never matter."""

import numpy as np
import pytest

from ejkernel_nsa.testing import oracle

BLOCK = 8


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _problem(seed, batch, key_len, query_len, group, kv_heads, window, given):
    rng = np.random.default_rng(seed)
    HQ = group * kv_heads
    lengths = rng.integers(query_len, key_len + 1, batch)
    args = dict(
        query=rng.normal(size=(batch, query_len, HQ, 8)),
        key=rng.normal(size=(batch, key_len, kv_heads, 8)),
        value=rng.normal(size=(batch, key_len, kv_heads, 6)),
        g_cmp=_sigmoid(rng.normal(size=(batch, query_len, HQ))),
        g_slc=_sigmoid(rng.normal(size=(batch, query_len, HQ))),
        g_swa=_sigmoid(rng.normal(size=(batch, query_len, HQ))) if window else None,
    )
    options = dict(block_counts=3, block_size=BLOCK, window_size=window)
    if given:
        args["block_indices"] = rng.integers(-1, key_len // BLOCK + 2, (batch, query_len, kv_heads, 3))
    return rng, lengths, args, options


def _full_row(rng, args, b, n, query_len):
    """Row b as a full-sequence call over its first n keys: random queries before the last TQ."""
    full = {}
    for name, x in args.items():
        if x is None:
            full[name] = None
        elif name in ("key", "value"):
            full[name] = x[b:b + 1, :n]
        else:
            filler = rng.normal(size=(1, n - query_len) + x.shape[2:])
            if name == "block_indices":
                filler = rng.integers(-1, 3, filler.shape)
            full[name] = np.concatenate([filler, x[b:b + 1]], axis=1)
    return full


CASES = [  # seed, batch, TK, TQ, group, kv heads, window, given block_indices
    (0, 2, 45, 1, 2, 1, 0, False),
    (1, 3, 40, 1, 1, 2, 5, False),
    (2, 2, 50, 7, 3, 1, 9, False),
    (3, 2, 33, 33, 2, 1, 4, False),
    (4, 2, 41, 12, 2, 2, 0, True),
    (5, 1, 24, 9, 4, 1, 24, False),
]


@pytest.mark.parametrize("case", CASES, ids=[f"TK{c[2]}-TQ{c[3]}-G{c[4]}-W{c[6]}" for c in CASES])
def test_cached_queries_are_the_last_rows_of_a_full_call(case):
    seed, batch, key_len, query_len = case[:4]
    rng, lengths, args, options = _problem(*case)
    cached = oracle.nsa_forward_cached(kv_lengths=lengths, **args, **options)
    for b, n in enumerate(lengths):
        full = oracle.nsa_forward(**_full_row(rng, args, b, n, query_len), **options)
        for name in ("o", "o_cmp", "o_slc", "lse"):
            np.testing.assert_allclose(cached[name][b], full[name][0, -query_len:], rtol=1e-12, atol=1e-12,
                                       err_msg=f"{name} of row {b} (L={n})")
        np.testing.assert_array_equal(np.sort(cached["block_indices"][b], -1),
                                      np.sort(full["block_indices"][0, -query_len:], -1))


@pytest.mark.parametrize("case", CASES[1:5], ids=[f"TK{c[2]}-TQ{c[3]}-G{c[4]}-W{c[6]}" for c in CASES[1:5]])
def test_cached_gradients_are_the_full_calls_restricted_to_the_last_rows(case):
    seed, batch, key_len, query_len = case[:4]
    rng, lengths, args, options = _problem(*case)
    cached = oracle.nsa_forward_cached(kv_lengths=lengths, **args, **options)
    # A shared selection: gradients are compared for a fixed set of blocks (SPEC 7).
    args = dict(args, block_indices=cached["block_indices"])
    d_out = rng.normal(size=cached["o"].shape)
    grads = oracle.nsa_vjp_cached(args["query"], args["key"], args["value"], d_out, lengths,
                                  **{k: v for k, v in args.items() if k not in ("query", "key", "value")}, **options)
    for b, n in enumerate(lengths):
        full = _full_row(rng, args, b, n, query_len)
        d_full = np.concatenate([np.zeros((1, n - query_len) + d_out.shape[2:]), d_out[b:b + 1]], axis=1)
        ref = oracle.nsa_vjp(full.pop("query"), full.pop("key"), full.pop("value"), d_full, **full, **options)
        for name in ("query", "g_cmp", "g_slc", "g_swa"):
            if grads[name] is not None:
                np.testing.assert_allclose(grads[name][b], ref[name][0, -query_len:], rtol=1e-10, atol=1e-12,
                                           err_msg=name)
        for name in ("key", "value"):
            np.testing.assert_allclose(grads[name][b, :n], ref[name][0], rtol=1e-10, atol=1e-12, err_msg=name)
            assert not np.any(grads[name][b, n:]), f"{name} slots past L={n} got a gradient"


def test_slots_past_each_rows_length_never_matter():
    rng, lengths, args, options = _problem(7, 3, 48, 4, 2, 1, 6, False)
    lengths = np.array([4, 30, 48])
    expected = oracle.nsa_forward_cached(kv_lengths=lengths, **args, **options)
    poisoned = dict(args, key=args["key"].copy(), value=args["value"].copy())
    for b, n in enumerate(lengths):
        poisoned["key"][b, n:] = np.nan
        poisoned["value"][b, n:] = np.inf
    got = oracle.nsa_forward_cached(kv_lengths=lengths, **poisoned, **options)
    np.testing.assert_array_equal(got["o"], expected["o"])


def test_lengths_outside_the_query_and_key_range_are_refused():
    rng, _, args, options = _problem(8, 2, 20, 5, 1, 1, 0, False)
    for bad in ([4, 20], [5, 21], [5]):
        with pytest.raises(ValueError, match="kv_lengths"):
            oracle.nsa_forward_cached(kv_lengths=bad, **args, **options)
