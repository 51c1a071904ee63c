"""SPEC section 10 through the public calls: queries shorter than the keys (decoding, chunked
prefill) and per-row `kv_lengths`, against the float64 oracle, for every backend that computes
them (the XLA backend; the others must decline with a reason)."""

from __future__ import annotations

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cases import TOLERANCES, assert_close, same_slot_sets
from hypothesis import given, settings
from hypothesis import strategies as st

import ejkernel_nsa as nsa
from ejkernel_nsa import registry
from ejkernel_nsa.testing import oracle

# The backends whose every piece is registered for SPEC section 10.
LONGER_KEY_BACKENDS = sorted(
    {impl.backend for impl in registry.implementations() if impl.longer_keys}
    - {impl.backend for impl in registry.implementations() if not impl.longer_keys}
)
GATES = ("g_cmp", "g_slc", "g_swa")
# Every drawn shape compiles anew: a quarter of the profile's examples (a tenth for gradients)
# keeps this file's CI share near a minute on a 2-core CPU.
FORWARD_EXAMPLES = settings(max_examples=max(3, settings.default.max_examples // 4))
GRADIENT_EXAMPLES = settings(max_examples=max(2, settings.default.max_examples // 10))


@dataclasses.dataclass(frozen=True)
class CachedCase:
    lengths: tuple[int, ...]
    key_len: int
    query_len: int
    group: int
    kv_heads: int
    block_size: int
    num_slots: int
    window_size: int
    dtype: str
    g_slc: bool
    per_token_counts: bool
    given_indices: bool
    seed: int


@st.composite
def cached_cases(draw, dtypes=("float32", "bfloat16")):
    block_size = draw(st.sampled_from((8, 16)))
    key_len = draw(st.integers(1, 5 * block_size + 3))
    query_len = draw(st.sampled_from(sorted({1, 2, min(key_len, block_size + 1), key_len})))
    query_len = min(query_len, key_len)
    lengths = tuple(draw(st.lists(st.integers(query_len, key_len), min_size=1, max_size=3)))
    given_indices = draw(st.booleans())
    return CachedCase(
        lengths=lengths, key_len=key_len, query_len=query_len, group=draw(st.sampled_from((1, 2, 3, 4))),
        kv_heads=draw(st.sampled_from((1, 2))), block_size=block_size, num_slots=draw(st.integers(1, 4)),
        window_size=draw(st.sampled_from((0, 1, 5, block_size, 3 * block_size))), dtype=draw(st.sampled_from(dtypes)),
        g_slc=draw(st.booleans()), per_token_counts=draw(st.booleans()), given_indices=given_indices,
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def make_cached_inputs(case: CachedCase, poison: bool = True) -> tuple[dict, dict]:
    """(the library's arguments, the oracle's): random inputs rounded to the case's dtype, with
    NaN and Inf planted in every key/value slot past a row's length when `poison`."""
    rng = np.random.default_rng(case.seed)
    B, TQ, TK, H = len(case.lengths), case.query_len, case.key_len, case.kv_heads
    HQ = case.group * H

    def normal(*shape):
        return np.asarray(jnp.asarray(rng.standard_normal(shape), case.dtype))

    def gate():
        return np.asarray(jnp.asarray(1 / (1 + np.exp(-rng.standard_normal((B, TQ, HQ)))), case.dtype))

    args = dict(
        query=normal(B, TQ, HQ, 16), key=normal(B, TK, H, 16), value=normal(B, TK, H, 8), g_cmp=gate(),
        g_slc=gate() if case.g_slc else None, g_swa=gate() if case.window_size else None,
        block_size=case.block_size, window_size=case.window_size, kv_lengths=np.asarray(case.lengths, np.int32),
    )
    if case.per_token_counts:
        args["block_counts"] = rng.integers(0, case.num_slots + 1, (B, TQ, H)).astype(np.int32)
        args["max_block_counts"] = case.num_slots
    else:
        args["block_counts"] = case.num_slots
    if case.given_indices:
        args["block_indices"] = rng.integers(-1, TK // case.block_size + 2, (B, TQ, H, case.num_slots)).astype(np.int32)
        if rng.random() < 0.5:
            args["g_cmp"] = None
    reference = dict(args)
    if poison:
        args["key"], args["value"] = args["key"].copy(), args["value"].copy()
        for b, n in enumerate(case.lengths):
            args["key"][b, n:] = np.nan
            args["value"][b, n:] = np.inf
    return args, reference


def oracle_forward(reference: dict) -> dict:
    kwargs = {k: v for k, v in reference.items() if k != "kv_lengths"}
    return oracle.nsa_forward_cached(kv_lengths=reference["kv_lengths"], **kwargs)


ARRAYS = ("query", "key", "value", *GATES, "block_indices", "kv_lengths")


def jitted(args: dict, backend: str):
    """`native_sparse_attention` under jit: arrays traced (kv_lengths too), options static."""
    arrays = {k: v for k, v in args.items() if k in ARRAYS and v is not None}
    if not isinstance(args["block_counts"], int):
        arrays["block_counts"] = args["block_counts"]
    options = {k: v for k, v in args.items() if k not in arrays}
    return jax.jit(functools.partial(nsa.native_sparse_attention, backend=backend, **options)), arrays


@pytest.mark.parametrize("backend", LONGER_KEY_BACKENDS)
class TestLongerKeys:
    @FORWARD_EXAMPLES
    @given(data=st.data())
    def test_forward_matches_oracle(self, backend, data):
        case = data.draw(cached_cases(), label="case")
        args, reference = make_cached_inputs(case)
        out_tol, _ = TOLERANCES[case.dtype]
        expected = oracle_forward(reference)
        fn, arrays = jitted(args, backend)
        out = np.asarray(fn(**arrays), np.float64)
        assert np.all(np.isfinite(out)), "NaN or Inf reached the output (planted past a row's length)"
        if expected["scores"] is None:
            assert_close("output", out, expected["o"], out_tol)
            return
        separated = oracle.near_tie_mask(expected["scores"], args["block_counts"], expected["num_slots"], case.group)
        keep = np.repeat(separated, case.group, axis=2)
        assert_close("output (well-separated heads)", out[keep], expected["o"][keep], out_tol)
        fn, arrays = jitted(dict(args, block_indices=expected["block_indices"].astype(np.int32)), backend)
        assert_close("output (shared selection)", fn(**arrays), expected["o"], out_tol)

    @GRADIENT_EXAMPLES
    @given(data=st.data())
    def test_gradients_match_oracle(self, backend, data):
        case = data.draw(cached_cases(dtypes=("float32",)), label="case")
        args, reference = make_cached_inputs(case, poison=False)
        selection = oracle_forward(reference)["block_indices"].astype(np.int32)
        args, reference = (dict(x, block_indices=selection) for x in (args, reference))
        d_out = np.random.default_rng(case.seed + 1).standard_normal((len(case.lengths), case.query_len,
                                                                       case.group * case.kv_heads, 8))
        kwargs = {k: v for k, v in reference.items() if k not in ("query", "key", "value", "kv_lengths")}
        expected = oracle.nsa_vjp_cached(reference["query"], reference["key"], reference["value"], d_out,
                                         reference["kv_lengths"], **kwargs)
        fn, arrays = jitted(args, backend)
        wrt = [n for n in ("query", "key", "value", *GATES) if arrays.get(n) is not None]

        def loss(*xs):
            return jnp.sum(fn(**dict(arrays, **dict(zip(wrt, xs, strict=True)))) * d_out.astype(np.float32))

        grads = jax.jit(jax.grad(loss, argnums=tuple(range(len(wrt)))))(*(arrays[n] for n in wrt))
        for name, grad in zip(wrt, grads, strict=True):
            assert_close(f"d{name}", grad, expected[name], 1e-3)

    def test_pieces_match_oracle_selection(self, backend):
        """The computed selection itself, at well-separated (token, head) pairs, with NaN planted."""
        case = CachedCase(lengths=(37, 80, 64), key_len=80, query_len=3, group=2, kv_heads=2, block_size=8,
                          num_slots=3, window_size=0, dtype="float32", g_slc=True, per_token_counts=False,
                          given_indices=False, seed=11)
        args, reference = make_cached_inputs(case)
        expected = oracle_forward(reference)
        indices = jax.jit(lambda **a: _selection(backend, **a))(**{k: args[k] for k in ("query", "key", "value",
                                                                                        "kv_lengths")})
        separated = oracle.near_tie_mask(expected["scores"], 3, 3, case.group)
        agree = same_slot_sets(indices, expected["block_indices"], separated)
        assert separated.mean() > 0.5 and agree.all()

    def test_one_compiled_function_serves_every_length(self, backend):
        case = CachedCase(lengths=(20, 40), key_len=64, query_len=4, group=2, kv_heads=1, block_size=8,
                          num_slots=3, window_size=9, dtype="float32", g_slc=True, per_token_counts=False,
                          given_indices=False, seed=3)
        args, _ = make_cached_inputs(case, poison=False)
        fn, arrays = jitted(args, backend)
        for lengths in ((4, 64), (33, 17), (64, 64)):
            lengths = np.asarray(lengths, np.int32)
            expected = oracle_forward(dict(args, kv_lengths=lengths))
            out = fn(**dict(arrays, kv_lengths=lengths))
            keep = np.repeat(oracle.near_tie_mask(expected["scores"], 3, 3, 2), 2, axis=2)
            assert_close(f"lengths {lengths.tolist()}", np.asarray(out)[keep], expected["o"][keep], 1e-4)
        assert fn._cache_size() == 1, "new kv_lengths values must not retrace"

    def test_without_kv_lengths_every_row_has_all_the_keys(self, backend):
        case = CachedCase(lengths=(50, 50), key_len=50, query_len=6, group=3, kv_heads=1, block_size=8,
                          num_slots=2, window_size=5, dtype="float32", g_slc=False, per_token_counts=False,
                          given_indices=False, seed=5)
        args, reference = make_cached_inputs(case, poison=False)
        expected = oracle_forward(dict(reference, kv_lengths=None))
        args.pop("kv_lengths")
        fn, arrays = jitted(dict(args, block_indices=expected["block_indices"].astype(np.int32)), backend)
        out = fn(**arrays)
        assert out.shape == (2, 6, 3, 8)
        assert_close("output (shared selection)", out, expected["o"], 1e-4)

    def test_apply_takes_longer_keys(self, backend):
        case = CachedCase(lengths=(30, 45), key_len=48, query_len=5, group=2, kv_heads=2, block_size=8,
                          num_slots=4, window_size=0, dtype="float32", g_slc=False, per_token_counts=False,
                          given_indices=True, seed=9)
        args, reference = make_cached_inputs(case)
        expected = oracle.nsa_forward_cached(reference["query"], reference["key"], reference["value"],
                                             reference["kv_lengths"], block_indices=reference["block_indices"],
                                             block_counts=4, block_size=8)
        apply = jax.jit(functools.partial(nsa.apply_native_sparse_attention, block_counts=4, block_size=8,
                                          backend=backend))
        out = apply(args["query"], args["key"], args["value"], args["block_indices"], kv_lengths=args["kv_lengths"])
        assert_close("apply_native_sparse_attention", out, expected["o"], 1e-4)


def _selection(backend, query, key, value, kv_lengths):
    """The selection of a whole call, read back through a given-selection call's plan."""
    from ejkernel_nsa.api import _plan
    from ejkernel_nsa.problem import Piece
    from ejkernel_nsa.validation import check_nsa_call

    call = check_nsa_call(query, key, value, g_cmp=query[..., 0], block_counts=3, block_size=8, kv_lengths=kv_lengths)
    plan = _plan(call.problem, backend)
    rows = dict(kv_lengths=call.kv_lengths)
    k_cmp, v_cmp = plan[Piece.COMPRESSION](key, value, block_size=8, segments=None, **rows)
    _, lse = plan[Piece.COMPRESSED_ATTENTION](query, k_cmp, v_cmp, block_size=8, scale=call.scale, segments=None,
                                              **rows)
    return plan[Piece.SELECTION](query, k_cmp, lse, block_counts=3, num_slots=3, block_size=8, scale=call.scale,
                                 segments=None, **rows)


# ---- the interface: errors and declines ----------------------------------------------------------

rng = np.random.default_rng(1)
B, TQ, TK, HQ, H, D = 2, 3, 40, 4, 2, 8


def args_with(**changes):
    args = dict(query=rng.standard_normal((B, TQ, HQ, D), np.float32),
                key=rng.standard_normal((B, TK, H, D), np.float32),
                value=rng.standard_normal((B, TK, H, D), np.float32),
                g_cmp=rng.standard_normal((B, TQ, HQ), np.float32), block_counts=2, block_size=8,
                kv_lengths=np.array([10, 40], np.int32))
    args.update(changes)
    return {k: v for k, v in args.items() if v is not None}


MISTAKES = [
    ("query longer than the keys", args_with(key=np.zeros((B, 2, H, D), np.float32),
                                             value=np.zeros((B, 2, H, D), np.float32), kv_lengths=None), "key"),
    ("value shorter than the key", args_with(value=np.zeros((B, TK - 1, H, D), np.float32)), "value"),
    ("kv_lengths of rank 2", args_with(kv_lengths=np.zeros((B, 1), np.int32)), "kv_lengths"),
    ("kv_lengths of another batch", args_with(kv_lengths=np.array([10, 20, 30], np.int32)), "kv_lengths"),
    ("float kv_lengths", args_with(kv_lengths=np.array([10.0, 40.0])), "kv_lengths"),
    ("kv_lengths below TQ", args_with(kv_lengths=np.array([2, 40], np.int32)), "kv_lengths"),
    ("kv_lengths above TK", args_with(kv_lengths=np.array([10, 41], np.int32)), "kv_lengths"),
    ("gate of the keys' length", args_with(g_cmp=np.zeros((B, TK, HQ), np.float32)), "g_cmp"),
    ("cu_seqlens with longer keys", args_with(query=np.zeros((1, TQ, HQ, D), np.float32),
                                              key=np.zeros((1, TK, H, D), np.float32),
                                              value=np.zeros((1, TK, H, D), np.float32),
                                              g_cmp=np.zeros((1, TQ, HQ), np.float32), kv_lengths=None,
                                              cu_seqlens=np.array([0, 20, 40], np.int32)), "cu_seqlens"),
    ("cu_seqlens with kv_lengths", args_with(query=np.zeros((1, TK, HQ, D), np.float32),
                                             key=np.zeros((1, TK, H, D), np.float32),
                                             value=np.zeros((1, TK, H, D), np.float32),
                                             g_cmp=np.zeros((1, TK, HQ), np.float32), kv_lengths=np.array([40]),
                                             cu_seqlens=np.array([0, 20, 40], np.int32)), "cu_seqlens"),
]


@pytest.mark.parametrize("args, argument", [m[1:] for m in MISTAKES], ids=[m[0] for m in MISTAKES])
def test_mistake_is_named(args, argument):
    with pytest.raises((TypeError, ValueError), match=rf"^{re.escape(argument)}\b"):
        nsa.native_sparse_attention(**args)


def test_kernel_backends_decline_longer_keys_with_the_reason():
    args = args_with()
    with nsa.interpret_mode():
        for name in ("triton", "pallas_triton", "pallas_mosaic"):
            with pytest.raises(nsa.BackendError) as error:
                nsa.explain(**args, backend=name)
            if nsa.backend_status()[name] is None:
                assert "SPEC section 10" in str(error.value), str(error.value)
        plan = nsa.explain(**args)
    assert {impl.backend for impl in plan.chosen.values()} == {"xla"}
    assert plan.problem.query_len == TQ and plan.problem.seq_len == TK and plan.problem.kv_lengths


def test_a_full_length_call_is_described_as_before():
    args = args_with(query=rng.standard_normal((B, TK, HQ, D), np.float32),
                     g_cmp=rng.standard_normal((B, TK, HQ), np.float32), kv_lengths=None)
    problem = nsa.explain(**args).problem
    assert problem.query_len is None and not problem.kv_lengths and not problem.against_longer_keys


@pytest.mark.parametrize("backend", LONGER_KEY_BACKENDS)
@pytest.mark.parametrize("length, stride, block_size", [(16, 8, 16), (8, 4, 16)])
def test_longer_keys_with_overlapping_compression(backend, length, stride, block_size):
    """SPEC section 10 with section 9's geometry: each row's TQ queries, against its first L_b
    keys (NaN/Inf planted past them), give the last TQ rows of the full-length call on that
    prefix (the oracle, with filler queries before them), selection included."""
    rng = np.random.default_rng(length * block_size)
    TQ, TK, H, G, D = 3, 6 * block_size + 5, 2, 2, 16
    lengths = np.asarray([TK, 4 * block_size + 1, TQ + 2 * block_size], np.int32)
    B = len(lengths)
    query = rng.standard_normal((B, TQ, H * G, D)).astype(np.float32)
    key, value = (rng.standard_normal((B, TK, H, D)).astype(np.float32) for _ in range(2))
    gates = [(1 / (1 + np.exp(-rng.standard_normal((B, TQ, H * G))))).astype(np.float32) for _ in range(3)]
    options = dict(block_counts=3, block_size=block_size, window_size=5, compress_block_size=length,
                   compress_stride=stride)
    poisoned = key.copy(), value.copy()
    for b, n in enumerate(lengths):
        poisoned[0][b, n:], poisoned[1][b, n:] = np.nan, np.inf
    out = nsa.native_sparse_attention(query, *poisoned, *gates[:2], g_swa=gates[2], kv_lengths=lengths,
                                      backend=backend, **options)
    for b, n in enumerate(lengths):
        # The full-length call on the row's prefix: filler queries and gates, then the row's own.
        def full(x):
            filler = rng.standard_normal((1, n - TQ) + x.shape[2:]).astype(np.float32)
            return np.concatenate([filler, x[b : b + 1]], axis=1)

        q_full, (g_cmp, g_slc, g_swa) = full(query), (full(g) for g in gates)
        expected = oracle.nsa_forward(q_full, key[b : b + 1, :n], value[b : b + 1, :n], g_cmp, g_slc,
                                      g_swa=g_swa, **options)["o"][0, -TQ:]
        assert_close(f"row {b} (L={n})", np.asarray(out[b]), expected, 1e-4)
