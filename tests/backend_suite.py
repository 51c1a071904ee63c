"""The equivalence suite every backend runs: values, gradients and selection against the float64
oracle, under jit, grad, vmap and traced varlen offsets.

A backend's test file subclasses `BackendSuite`, sets `backend` (the name it is forced by) and, if
it cannot do everything, narrows `dtypes` / `groups`. Each test forces the backend, so a backend
that declines a drawn case fails the test instead of being replaced by another. A backend without
a kernel for some piece names it in `xla_pieces`: the tests then force per piece (`backend=
{piece: name}`), that piece onto XLA and every other onto the backend.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from containment import PLANTINGS, check_containment, check_gradient_containment
from ejkernel_nsa.testing import oracle
from cases import (
    TOLERANCES,
    Case,
    assert_close,
    cases,
    geometry_cases,
    make_inputs,
    oracle_kwargs,
    same_slot_sets,
    well_separated_heads,
)

import ejkernel_nsa as nsa
from ejkernel_nsa import registry
from ejkernel_nsa.problem import Piece

ARRAY_ARGS = ("query", "key", "value", "g_cmp", "g_slc", "g_swa", "block_indices", "block_counts", "cu_seqlens",
              "key_cmp", "value_cmp")
# SPEC 9's draws: a sixth of the profile's examples, at least 3 (see BackendSuite).
GEOMETRY_EXAMPLES = max(3, settings().max_examples // 6)


def jitted_nsa(args: dict, backend: str | dict[Piece, str]):
    """`native_sparse_attention` under jit: arrays traced (cu_seqlens too), options static."""
    arrays = {k: v for k, v in args.items() if k in ARRAY_ARGS and v is not None and not isinstance(v, int)}
    options = {k: v for k, v in args.items() if k not in arrays}
    fn = jax.jit(functools.partial(nsa.native_sparse_attention, backend=backend, **options))
    return fn, arrays


class BackendSuite:
    backend: str
    dtypes: tuple[str, ...] = ("float32", "bfloat16")
    groups: tuple[int, ...] = (1, 2, 3, 4, 8, 16)
    # Relative L2 bound on compressed attention's lse for 16-bit problems (SPEC 8 bounds only the
    # output, gradients and selection): scores whose compressed keys are float32 or tf32 (10
    # mantissa bits) stay within 1e-3.
    lse_tolerance_16bit: float = 1e-3
    # Whether the backend computes SPEC section 9's geometry (l, d != l'); if not, it must decline it.
    compression_geometry: bool = False
    # The pieces the backend has no kernel for, run on XLA (each forced there too).
    xla_pieces: tuple[Piece, ...] = ()
    # SPEC 8 containment (tests/containment.py): the keyword arguments of each `check_containment`
    # / `check_gradient_containment` call, compiled (every planting, poison and tensor) and in an
    # interpreter, where each call takes seconds: one NaN value in the later sequence of a packed
    # row (41), which shares a kernel tile with the earlier sequence's last tokens, whose future
    # it also is, so one planting exercises both kinds of blind token and (for the gradients)
    # the key and value rows that only the other sequence sees.
    containment_runs: tuple[dict, ...] = ({},)
    gradient_containment_runs: tuple[dict, ...] = ({},)
    interpreted_containment_runs: tuple[dict, ...] = (
        dict(poisons=(np.nan,), tensors=("value",), plantings=PLANTINGS[2:3]),)
    interpreted_gradient_containment_runs: tuple[dict, ...] = interpreted_containment_runs

    @property
    def forced(self) -> str | dict[Piece, str]:
        """What every call of the suite passes as `backend=`: the backend, or per piece."""
        if not self.xla_pieces:
            return self.backend
        return {piece: "xla" if piece in self.xla_pieces else self.backend for piece in Piece}

    @pytest.fixture(autouse=True)
    def backend_runs_here(self):
        reason = nsa.backend_status()[self.backend]
        if reason is not None:
            pytest.skip(f"{self.backend} cannot run here: {reason}")

    # ---- hypothesis: every option of the contract ------------------------------------------

    @given(data=st.data())
    def test_forward_matches_oracle(self, data):
        case = data.draw(cases(self.dtypes, self.groups), label="case")
        args = make_inputs(case)
        out_tol, _ = TOLERANCES[case.dtype]
        expected = oracle.nsa_forward(**oracle_kwargs(args))
        fn, arrays = jitted_nsa(args, self.forced)
        out = fn(**arrays)
        assert out.dtype == jnp.dtype(case.dtype), f"output dtype {out.dtype}, expected the query's"
        out = np.asarray(out, np.float64)
        assert np.all(np.isfinite(out)), "NaN or Inf in the output"

        if expected["scores"] is None:
            assert_close("output", out, expected["o"], out_tol)
        else:
            # Near ties may legitimately pick other blocks: compare those heads through a shared
            # selection below, and the rest directly.
            keep = well_separated_heads(expected, args, case)
            assert_close("output (well-separated heads)", out[keep], expected["o"][keep], out_tol)
            shared = dict(args, block_indices=expected["block_indices"].astype(np.int32))
            fn, arrays = jitted_nsa(shared, self.forced)
            assert_close("output (shared selection)", fn(**arrays), expected["o"], out_tol)
            self.check_pieces(case, args, expected)

    def check_pieces(self, case, args, expected):
        """Each piece of the computed-selection path, on its own, against the oracle's."""
        out_tol, _ = TOLERANCES[case.dtype]
        common = dict(block_size=case.block_size, cu_seqlens=args["cu_seqlens"], backend=self.forced)
        k_cmp, v_cmp = nsa.mean_pool(args["key"], args["value"], **common)
        ref_k_cmp, ref_v_cmp = oracle.mean_pool(args["key"], args["value"], case.block_size, args["cu_seqlens"])
        assert_close("key_cmp", k_cmp, ref_k_cmp, 1e-5)
        assert_close("value_cmp", v_cmp, ref_v_cmp, 1e-5)
        o_cmp, lse = nsa.compressed_attention(args["query"], k_cmp, v_cmp, **common)
        assert_close("compressed output", o_cmp, expected["o_cmp"], out_tol)
        seen = np.isfinite(expected["lse"])
        assert np.array_equal(np.isfinite(np.asarray(lse)), seen), "lse must be -inf exactly where no block is seen"
        lse_tol = 1e-5 if case.dtype == "float32" else self.lse_tolerance_16bit
        assert_close("lse", np.asarray(lse)[seen], expected["lse"][seen], lse_tol)
        indices = nsa.select_blocks(
            args["query"], k_cmp, lse, args["block_counts"], max_block_counts=args.get("max_block_counts"), **common
        )
        separated = oracle.near_tie_mask(expected["scores"], args["block_counts"], expected["num_slots"], case.group)
        agree = same_slot_sets(indices, expected["block_indices"], separated)
        assert agree.all(), f"selection differs at well-separated (b, t, h) {np.argwhere(~agree)[:5].tolist()}"
        if case.window_size:
            o_swa = nsa.sliding_window_attention(
                args["query"], args["key"], args["value"], case.window_size, cu_seqlens=args["cu_seqlens"],
                backend=self.forced,
            )
            assert_close("window output", o_swa, expected["o_swa"], out_tol)

    @given(data=st.data())
    def test_gradients_match_oracle(self, data):
        case = data.draw(cases(self.dtypes, self.groups), label="case")
        args = make_inputs(case)
        _, grad_tol = TOLERANCES[case.dtype]
        if not case.given_indices:
            # Selection carries no gradient; a shared one keeps near ties out of the comparison.
            selection = oracle.nsa_forward(**oracle_kwargs(args))["block_indices"]
            args = dict(args, block_indices=selection.astype(np.int32))
        d_out = np.random.default_rng(case.seed + 1).standard_normal(
            (case.batch, case.seq_len, case.num_q_heads, case.value_dim)
        )
        expected = oracle.nsa_vjp(d_out=d_out, **oracle_kwargs(args))
        fn, arrays = jitted_nsa(args, self.forced)
        wrt = [name for name in ("query", "key", "value", "g_cmp", "g_slc", "g_swa") if arrays.get(name) is not None]

        def loss(*diff):
            out = fn(**dict(arrays, **dict(zip(wrt, diff, strict=True))))
            return jnp.sum(out.astype(jnp.float32) * d_out.astype(np.float32))

        grads = jax.jit(jax.grad(loss, argnums=tuple(range(len(wrt)))))(*(arrays[n] for n in wrt))
        for name, grad in zip(wrt, grads, strict=True):
            assert grad.dtype == arrays[name].dtype, f"d{name} dtype"
            assert_close(f"d{name}", grad, expected[name], grad_tol)

    # ---- SPEC section 9: compression geometry and supplied compressed blocks ----------------
    # A sixth of the profile's examples (each draws new shapes, so each compiles anew): the
    # geometry-independent options are drawn by the tests above.

    @settings(max_examples=GEOMETRY_EXAMPLES)
    @given(data=st.data())
    def test_geometry_forward_matches_oracle(self, data):
        if not self.compression_geometry:
            pytest.skip(f"{self.backend} declines SPEC section 9's geometry (test_geometry_is_declined)")
        case = data.draw(geometry_cases(self.dtypes, self.groups), label="case")
        args = make_inputs(case)
        out_tol, _ = TOLERANCES[case.dtype]
        expected = oracle.nsa_forward(**oracle_kwargs(args))
        fn, arrays = jitted_nsa(args, self.forced)
        out = np.asarray(fn(**arrays), np.float64)
        assert np.all(np.isfinite(out)), "NaN or Inf in the output"
        if expected["scores"] is None:
            assert_close("output", out, expected["o"], out_tol)
            return
        keep = well_separated_heads(expected, args, case)
        assert_close("output (well-separated heads)", out[keep], expected["o"][keep], out_tol)
        shared = dict(args, block_indices=expected["block_indices"].astype(np.int32))
        fn, arrays = jitted_nsa(shared, self.forced)
        assert_close("output (shared selection)", fn(**arrays), expected["o"], out_tol)
        self.check_geometry_pieces(case, args, expected)

    def check_geometry_pieces(self, case, args, expected):
        out_tol, _ = TOLERANCES[case.dtype]
        common = dict(block_size=case.block_size, cu_seqlens=args["cu_seqlens"], backend=self.forced,
                      compress_block_size=case.compress_block_size, compress_stride=case.compress_stride)
        if case.supplied:
            k_cmp, v_cmp = args["key_cmp"], args["value_cmp"]
        else:
            k_cmp, v_cmp = nsa.mean_pool(args["key"], args["value"], **common)
            ref_k_cmp, ref_v_cmp = oracle.overlapping_pool(
                args["key"], args["value"], case.compress_block_size, case.compress_stride, args["cu_seqlens"])
            assert_close("key_cmp", k_cmp, ref_k_cmp, 1e-5)
            assert_close("value_cmp", v_cmp, ref_v_cmp, 1e-5)
        o_cmp, lse = nsa.compressed_attention(args["query"], k_cmp, v_cmp, **common)
        assert_close("compressed output", o_cmp, expected["o_cmp"], out_tol)
        seen = np.isfinite(expected["lse"])
        assert np.array_equal(np.isfinite(np.asarray(lse)), seen), "lse must be -inf exactly where no block is seen"
        indices = nsa.select_blocks(
            args["query"], k_cmp, lse, args["block_counts"], max_block_counts=args.get("max_block_counts"), **common
        )
        separated = oracle.near_tie_mask(expected["scores"], args["block_counts"], expected["num_slots"], case.group)
        agree = same_slot_sets(indices, expected["block_indices"], separated)
        assert agree.all(), f"selection differs at well-separated (b, t, h) {np.argwhere(~agree)[:5].tolist()}"

    @settings(max_examples=GEOMETRY_EXAMPLES)
    @given(data=st.data())
    def test_geometry_gradients_match_oracle(self, data):
        if not self.compression_geometry:
            pytest.skip(f"{self.backend} declines SPEC section 9's geometry (test_geometry_is_declined)")
        case = data.draw(geometry_cases(self.dtypes, self.groups), label="case")
        args = make_inputs(case)
        _, grad_tol = TOLERANCES[case.dtype]
        if not case.given_indices:
            selection = oracle.nsa_forward(**oracle_kwargs(args))["block_indices"]
            args = dict(args, block_indices=selection.astype(np.int32))
        d_out = np.random.default_rng(case.seed + 1).standard_normal(
            (case.batch, case.seq_len, case.num_q_heads, case.value_dim)
        )
        expected = oracle.nsa_vjp(d_out=d_out, **oracle_kwargs(args))
        fn, arrays = jitted_nsa(args, self.forced)
        wrt = [name for name in ("query", "key", "value", "g_cmp", "g_slc", "g_swa", "key_cmp", "value_cmp")
               if arrays.get(name) is not None]

        def loss(*diff):
            out = fn(**dict(arrays, **dict(zip(wrt, diff, strict=True))))
            return jnp.sum(out.astype(jnp.float32) * d_out.astype(np.float32))

        grads = jax.jit(jax.grad(loss, argnums=tuple(range(len(wrt)))))(*(arrays[n] for n in wrt))
        for name, grad in zip(wrt, grads, strict=True):
            assert grad.dtype == arrays[name].dtype, f"d{name} dtype"
            assert_close(f"d{name}", grad, expected[name], grad_tol)

    def test_geometry_is_declined(self):
        """A backend without SPEC 9's geometry refuses it when forced, with the reason, instead of
        pooling disjoint blocks (nothing runs: the registry decides before tracing)."""
        if self.compression_geometry:
            pytest.skip(f"{self.backend} computes SPEC section 9's geometry")
        args = make_inputs(fixed_case(seq_len=100, group=2, window_size=0))
        with pytest.raises(registry.BackendError, match="l = d = l'"):
            nsa.explain(**dict(args, compress_block_size=16, compress_stride=8), backend=self.forced)

    # ---- SPEC 8: NaN / Inf containment ---------------------------------------------------------

    def test_nan_and_inf_are_contained(self):
        """A NaN or Inf key or value reaches no output of a query that cannot see it (a future
        position, another packed sequence), and the tokens that see it are not finite."""
        interpreted = registry.is_interpreted(self.backend)
        for run in self.interpreted_containment_runs if interpreted else self.containment_runs:
            check_containment(self.forced, **run)

    def test_nan_and_inf_are_contained_in_the_gradients(self):
        """The same for the gradients: those of the blind queries and gates, and of the keys and
        values only they see, are the clean run's; the planted token's query gradient is not
        finite, as its output is not."""
        interpreted = registry.is_interpreted(self.backend)
        for run in self.interpreted_gradient_containment_runs if interpreted else self.gradient_containment_runs:
            check_gradient_containment(self.forced, **run)

    # ---- transformations and the fixed examples ---------------------------------------------

    def test_selection_carries_no_gradient(self):
        args = make_inputs(fixed_case(seq_len=150, group=2, window_size=0))
        fn, arrays = jitted_nsa(args, self.forced)
        computed = jax.grad(lambda q, k, v: fn(**dict(arrays, query=q, key=k, value=v)).sum(), argnums=(0, 1, 2))
        k_cmp, v_cmp = nsa.mean_pool(args["key"], args["value"], 32, backend=self.forced)
        _, lse = nsa.compressed_attention(args["query"], k_cmp, v_cmp, 32, backend=self.forced)
        selection = nsa.select_blocks(args["query"], k_cmp, lse, 3, 32, backend=self.forced)
        given_fn, given_arrays = jitted_nsa(dict(args, block_indices=selection), self.forced)
        given = jax.grad(
            lambda q, k, v: given_fn(**dict(given_arrays, query=q, key=k, value=v)).sum(), argnums=(0, 1, 2)
        )
        for a, b in zip(computed(*(arrays[n] for n in ("query", "key", "value"))),
                        given(*(arrays[n] for n in ("query", "key", "value"))), strict=True):
            assert_close("gradient with computed vs given selection", a, b, 1e-5)

    def test_gradients_without_jit(self):
        """Eager `jax.grad` traces differently from `jit` (array constants arrive as NumPy-backed
        literals); a packed varlen batch with an empty sequence, against the oracle."""
        case = fixed_case(seq_len=90, group=3, window_size=0, cu_seqlens=(0, 0, 45, 90))
        args = make_inputs(case)
        d_out = np.random.default_rng(5).standard_normal((1, 90, case.num_q_heads, case.value_dim))
        options = {k: v for k, v in args.items() if k not in ("query", "key", "value", "g_cmp", "g_slc", "g_swa")}

        def loss(q, k, v, g_cmp, g_slc):
            out = nsa.native_sparse_attention(q, k, v, g_cmp, g_slc, backend=self.forced, **options)
            return jnp.sum(out * d_out.astype(np.float32))

        names = ("query", "key", "value", "g_cmp", "g_slc")
        grads = jax.grad(loss, argnums=tuple(range(5)))(*(args[n] for n in names))
        selection = oracle.nsa_forward(**oracle_kwargs(args))["block_indices"]
        expected = oracle.nsa_vjp(d_out=d_out, **oracle_kwargs(dict(args, block_indices=selection)))
        for name, grad in zip(names, grads, strict=True):
            assert_close(f"d{name}", grad, expected[name], 1e-3)

    def test_jit_with_traced_cu_seqlens(self):
        case = fixed_case(seq_len=170, group=3, window_size=24, cu_seqlens=(0, 40, 41, 170))
        args = make_inputs(case)
        fn, arrays = jitted_nsa(args, self.forced)
        for cu in ((0, 40, 41, 170), (0, 100, 150, 170), (0, 0, 64, 170)):
            cu = np.asarray(cu, np.int32)
            expected = oracle.nsa_forward(**oracle_kwargs(dict(args, cu_seqlens=cu)))
            keep = well_separated_heads(expected, args, case)
            out = np.asarray(fn(**dict(arrays, cu_seqlens=cu)), np.float64)
            assert_close(f"output with cu_seqlens={cu.tolist()}", out[keep], expected["o"][keep], 1e-4)
        assert fn._cache_size() == 1, "new cu_seqlens values of the same length must not retrace"

    def test_vmap_over_leading_axis(self):
        args = make_inputs(fixed_case(seq_len=96, group=4, window_size=16, batch=2))
        stacked = {k: v for k, v in args.items() if k in ("query", "key", "value", "g_cmp", "g_slc", "g_swa")}
        options = {k: v for k, v in args.items() if k not in stacked}
        call = functools.partial(nsa.native_sparse_attention, backend=self.forced, **options)
        # Split the batch of 2 into a vmapped axis of 2 batches of 1.
        batched = jax.vmap(lambda kw: call(**kw))({k: v[:, None] for k, v in stacked.items()})
        one_by_one = np.stack([call(**{k: v[i : i + 1] for k, v in stacked.items()}) for i in range(2)])
        assert_close("vmap", batched, one_by_one, 1e-6)

    def test_seed_example(self):
        """The seed library's README example: B=2, T=2048, 32 query and 32 kv heads, D=64, gates,
        16 blocks of 64. Checked against the oracle on one batch row and 4 heads (with G = 1 each
        head is independent of the others)."""
        if registry.is_interpreted(self.backend):
            pytest.skip("too large for an interpreter; runs where the backend is compiled")
        rng = np.random.default_rng(2048)
        B, T, H, D = 2, 2048, 32, 64
        q, k, v = (rng.standard_normal((B, T, H, D)).astype(np.float32) for _ in range(3))
        g_cmp, g_slc = (rng.uniform(0, 1, (B, T, H)).astype(np.float32) for _ in range(2))
        out = nsa.native_sparse_attention(q, k, v, g_cmp, g_slc, block_counts=16, block_size=64, backend=self.forced)
        assert out.shape == (B, T, H, D) and bool(jnp.all(jnp.isfinite(out)))
        heads = slice(0, 4)
        expected = oracle.nsa_forward(
            q[:1, :, heads], k[:1, :, heads], v[:1, :, heads], g_cmp[:1, :, heads], g_slc[:1, :, heads],
            block_counts=16, block_size=64,
        )
        # Random data at this size makes many near ties among the ~1/32 probabilities of late
        # tokens: compare those through the oracle's own selection, the rest as computed.
        keep = oracle.near_tie_mask(expected["scores"], 16, 16, 1)
        assert keep.mean() > 0.5, "too few well-separated selections to compare"
        assert_close("seed example", np.asarray(out[:1, :, heads])[keep], expected["o"][keep], 1e-4)
        shared = nsa.native_sparse_attention(
            q[:1, :, heads], k[:1, :, heads], v[:1, :, heads], g_cmp[:1, :, heads], g_slc[:1, :, heads],
            block_indices=expected["block_indices"].astype(np.int32), block_size=64, backend=self.forced,
        )
        assert_close("seed example (shared selection)", shared, expected["o"], 1e-4)


def fixed_case(seq_len, group, window_size, cu_seqlens=None, batch=1):
    return Case(
        batch=batch, seq_len=seq_len, group=group, kv_heads=2, head_dim=32, value_dim=24, block_size=32,
        num_slots=3, window_size=window_size, dtype="float32", cu_seqlens=cu_seqlens, g_cmp=True, g_slc=True,
        per_token_counts=False, given_indices=False, seed=seq_len * 7 + group,
    )


# The head dims models use, which the hypothesis suite (small dims, for the oracle's sake) does not draw.
MODEL_HEAD_DIMS = [(64, 64), (128, 128), (192, 128)]


def check_model_sized_heads(backend: str, group: int, head_dim: int, value_dim: int, dtype: str):
    """A kernel backend at model head dims (`MODEL_HEAD_DIMS`): values and gradients against the
    oracle, values against the XLA backend. Varlen for odd groups, per-token counts for some."""
    import dataclasses

    case = dataclasses.replace(
        fixed_case(seq_len=333, group=group, window_size=48, cu_seqlens=(0, 100, 333) if group % 2 else None),
        kv_heads=1, head_dim=head_dim, value_dim=value_dim, block_size=32, num_slots=4, dtype=dtype,
        per_token_counts=group % 4 == 1,
    )
    args = make_inputs(case)
    out_tol, grad_tol = TOLERANCES[dtype]
    expected = oracle.nsa_forward(**oracle_kwargs(args))
    keep = well_separated_heads(expected, args, case)
    kernel_fn, arrays = jitted_nsa(args, backend)
    xla_fn, _ = jitted_nsa(args, "xla")
    out = np.asarray(kernel_fn(**arrays), np.float64)
    assert_close("output vs oracle", out[keep], expected["o"][keep], out_tol)
    assert_close("output vs xla", out[keep], np.asarray(xla_fn(**arrays), np.float64)[keep], out_tol)

    shared = dict(args, block_indices=expected["block_indices"].astype(np.int32))
    fn, arrays = jitted_nsa(shared, backend)
    d_out = np.random.default_rng(group).standard_normal(out.shape)
    wrt = ("query", "key", "value", "g_cmp", "g_slc", "g_swa")
    grads = jax.grad(
        lambda *xs: jnp.sum(fn(**dict(arrays, **dict(zip(wrt, xs)))).astype(jnp.float32) * d_out.astype(np.float32)),
        argnums=tuple(range(len(wrt))),
    )(*(arrays[n] for n in wrt))
    reference = oracle.nsa_vjp(d_out=d_out, **oracle_kwargs(shared))
    for name, grad in zip(wrt, grads):
        assert_close(f"d{name}", grad, reference[name], grad_tol)
