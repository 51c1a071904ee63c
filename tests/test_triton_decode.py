"""The Triton decoding kernels against the float64 oracle: one query per row against a cache.

`backends/triton/decode.py` (the selected branch) with given selections holding empty slots,
duplicates and future blocks; `decode_compressed.py` and `decode_window.py` (the compressed branch,
its lse, and the window, through `decode_span.py`'s split-K kernel) at random row lengths, split
into several parts of several tiles each; NaN and Inf planted past each row's length, and in the
compressed blocks past its last complete one. Runs where the Triton backend runs: on a GPU, or on
a CPU with EJKERNEL_NSA_INTERPRET=1 (Triton's interpreter), at tiny shapes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cases import TOLERANCES, assert_close

import ejkernel_nsa as nsa
from ejkernel_nsa.testing import oracle


@pytest.fixture(autouse=True)
def triton_runs_here():
    reason = nsa.backend_status()["triton"]
    if reason is not None:
        pytest.skip(f"triton cannot run here: {reason}")


@pytest.mark.parametrize("group, dtype, per_token", [(2, "float32", False), (3, "bfloat16", True)])
def test_decode_step_matches_oracle(group, dtype, per_token):
    rng = np.random.default_rng(group)
    B, TK, H, D, BS, S = 3, 80, 2, 32, 16, 4
    lengths = np.array([1, 47, 80], np.int32)

    def cast(x):
        return np.asarray(jnp.asarray(x, dtype))

    q = cast(rng.standard_normal((B, 1, group * H, D)))
    k, v = cast(rng.standard_normal((B, TK, H, D))), cast(rng.standard_normal((B, TK, H, 16)))
    indices = rng.integers(-1, TK // BS + 2, (B, 1, H, S)).astype(np.int32)
    indices[:, :, :, 1] = indices[:, :, :, 0]  # a duplicate
    counts = rng.integers(0, S + 1, (B, 1, H)).astype(np.int32) if per_token else S
    expected = oracle.nsa_forward_cached(q, k, v, lengths, block_indices=indices, block_counts=counts, block_size=BS)
    k_dirty, v_dirty = k.copy(), v.copy()
    for b, n in enumerate(lengths):
        k_dirty[b, n:], v_dirty[b, n:] = np.nan, np.inf
    plan = nsa.explain(q, k_dirty, v_dirty, block_indices=indices, block_counts=counts, block_size=BS,
                       kv_lengths=lengths, backend="triton")
    assert plan.chosen[nsa.Piece.SELECTED_ATTENTION].fn.__module__.endswith("triton.decode")
    out = jax.jit(lambda q, k, v, i, n: nsa.apply_native_sparse_attention(
        q, k, v, i, counts, BS, kv_lengths=n, backend="triton"))(q, k_dirty, v_dirty, indices, lengths)
    assert out.dtype == jnp.dtype(dtype) and np.all(np.isfinite(np.asarray(out, np.float64)))
    assert_close("decode step", out, expected["o"], TOLERANCES[dtype][0])


@pytest.fixture
def small_splits(monkeypatch):
    """The split-K kernel with 16-row tiles and few programs, so that a tiny span is still cut
    into several parts of several tiles (at serving sizes a part is one 64-row tile)."""
    # Imported here, after the registry defined the kernels (in the interpreter, where asked).
    from ejkernel_nsa.backends.triton import decode_span

    monkeypatch.setattr(decode_span, "key_tile", lambda head_dim, value_dim, dots: 16)
    monkeypatch.setattr(decode_span, "TARGET_PROGRAMS", 8)


def _random_decode_step(rng, group, dtype, kv_heads, block_size, capacity, window):
    """A decoding step's inputs at random row lengths (one shorter than a block, so it sees no
    compressed block, one inside the window, one past it), NaN/Inf planted past each length."""
    lengths = np.array([rng.integers(1, block_size), rng.integers(block_size, window),
                        rng.integers(window, capacity + 1)], np.int32)
    B, HQ = len(lengths), group * kv_heads

    def cast(x):
        return np.asarray(jnp.asarray(x, dtype))

    q = cast(rng.standard_normal((B, 1, HQ, 32)))
    k = cast(rng.standard_normal((B, capacity, kv_heads, 32)))
    v = cast(rng.standard_normal((B, capacity, kv_heads, 16)))
    gates = [cast(1 / (1 + np.exp(-rng.standard_normal((B, 1, HQ))))) for _ in range(3)]
    k_dirty, v_dirty = k.copy(), v.copy()
    for b, n in enumerate(lengths):
        k_dirty[b, n:], v_dirty[b, n:] = np.nan, np.inf
    return lengths, q, (k, v), (k_dirty, v_dirty), gates


@pytest.mark.parametrize("group, kv_heads, dtype", [(1, 2, "float32"), (4, 2, "bfloat16"), (16, 1, "float32")])
def test_compressed_and_window_pieces_match_oracle(small_splits, group, kv_heads, dtype):
    """Each piece alone: the compressed branch's output and lse (what the selection reads), and
    the window, against the oracle; compressed blocks past a row's last complete one hold NaN, as
    a cache's partial and stale blocks may."""
    rng = np.random.default_rng([group, 14])
    BS, TK, W = 8, 160, 37
    lengths, q, (k, v), (k_dirty, v_dirty), gates = _random_decode_step(rng, group, dtype, kv_heads, BS, TK, W)
    indices = np.zeros((len(lengths), 1, kv_heads, 1), np.int32)
    expected = oracle.nsa_forward_cached(q, k, v, lengths, g_cmp=gates[0], block_indices=indices, block_counts=1,
                                         block_size=BS, g_swa=gates[2], window_size=W)
    k_cmp, v_cmp = (x.astype(np.float32) for x in oracle.mean_pool_cached(k, v, BS, lengths))
    for b, n in enumerate(lengths):
        k_cmp[b, n // BS:], v_cmp[b, n // BS:] = np.nan, -np.inf
    plan = nsa.explain(q, k_dirty, v_dirty, gates[0], block_indices=indices, block_counts=1, block_size=BS,
                       g_swa=gates[2], window_size=W, kv_lengths=lengths,
                       backend={nsa.Piece.COMPRESSED_ATTENTION: "triton", nsa.Piece.SLIDING_WINDOW: "triton"})
    compressed, window = plan[nsa.Piece.COMPRESSED_ATTENTION], plan[nsa.Piece.SLIDING_WINDOW]
    assert compressed.__module__.endswith("triton.decode_compressed"), str(plan)
    assert window.__module__.endswith("triton.decode_window"), str(plan)
    scale = 32 ** -0.5
    o_cmp, lse = jax.jit(lambda q, kc, vc, n: compressed(q, kc, vc, block_size=BS, scale=scale, segments=None,
                                                         kv_lengths=n))(q, k_cmp, v_cmp, lengths)
    o_swa = jax.jit(lambda q, k, v, n: window(q, k, v, window_size=W, scale=scale, segments=None,
                                              kv_lengths=n))(q, k_dirty, v_dirty, lengths)
    tolerance = TOLERANCES[dtype][0]
    for name, got in (("o_cmp", o_cmp), ("o_swa", o_swa)):
        assert got.dtype == jnp.dtype(dtype) and np.all(np.isfinite(np.asarray(got, np.float64))), name
        assert_close(name, got, expected[name], tolerance)
    assert lse.dtype == jnp.float32
    lse, want = np.asarray(lse, np.float64), expected["lse"]
    assert np.array_equal(np.isneginf(lse), np.isneginf(want))
    seen = np.isfinite(want)
    assert np.isneginf(want[0]).all() and seen[1:].all()  # row 0 is shorter than one block
    # Float32 dots over the float32 blocks, whatever the query's dtype: the lse is close for bf16 too.
    np.testing.assert_allclose(lse[seen], want[seen], rtol=0, atol=1e-4)


@pytest.mark.parametrize("group", [1, 4, 16])
def test_whole_decode_step_matches_oracle(small_splits, group):
    """All three branches through the public call, the selection computed on XLA from the
    Triton compressed branch's lse, NaN planted past each row's length."""
    rng = np.random.default_rng([group, 10])
    BS, TK, W = 16, 192, 40
    kv_heads = 1 if group == 16 else 2
    lengths, q, (k, v), (k_dirty, v_dirty), gates = _random_decode_step(rng, group, "float32", kv_heads, BS, TK, W)
    options = dict(block_counts=3, block_size=BS, g_swa=gates[2], window_size=W)
    expected = oracle.nsa_forward_cached(q, k, v, lengths, gates[0], gates[1], **options)
    plan = nsa.explain(q, k_dirty, v_dirty, gates[0], gates[1], kv_lengths=lengths, backend={
        nsa.Piece.COMPRESSED_ATTENTION: "triton", nsa.Piece.SELECTED_ATTENTION: "triton",
        nsa.Piece.SLIDING_WINDOW: "triton"}, **options)
    assert {piece: impl.backend for piece, impl in plan.chosen.items()} == {
        nsa.Piece.COMPRESSION: "xla", nsa.Piece.COMPRESSED_ATTENTION: "triton", nsa.Piece.SELECTION: "xla",
        nsa.Piece.SELECTED_ATTENTION: "triton", nsa.Piece.SLIDING_WINDOW: "triton"}, str(plan)
    out = jax.jit(lambda q, k, v, n: nsa.native_sparse_attention(q, k, v, gates[0], gates[1], kv_lengths=n,
                                                                 backend=plan.forced, **options))(
        q, k_dirty, v_dirty, lengths)
    assert np.all(np.isfinite(np.asarray(out)))
    assert_close("decode step", out, expected["o"], TOLERANCES["float32"][0])


def test_compressed_piece_takes_the_papers_geometry(small_splits):
    """SPEC section 9's blocks (l=16, d=8, l'=16): visible once i*d + l <= L; against the oracle's
    overlapping compressed branch over each row's prefix, its query last."""
    rng = np.random.default_rng(9)
    length, stride, BS, TK, H, G = 16, 8, 16, 120, 2, 4
    lengths = np.array([9, 16, 17, 23, 120], np.int32)
    q = rng.standard_normal((len(lengths), 1, G * H, 32)).astype(np.float32)
    k, v = (rng.standard_normal((len(lengths), TK, H, 32)).astype(np.float32) for _ in range(2))
    k_cmp = np.full((len(lengths), TK // stride, H, 32), np.nan, np.float32)
    v_cmp = k_cmp.copy()
    expected_o, expected_lse = [], []
    for b, n in enumerate(lengths):
        kc, vc = oracle.overlapping_pool(k[b : b + 1, :n], v[b : b + 1, :n], length, stride)
        visible = oracle.num_visible_compressed(n - 1, length, stride)  # the rest stay NaN: never read
        k_cmp[b, :visible], v_cmp[b, :visible] = kc[0, :visible], vc[0, :visible]
        q_full = np.concatenate([np.zeros((1, n - 1, G * H, 32)), q[b : b + 1]], axis=1)
        o, lse = oracle.overlapping_compressed_attention(q_full, kc, vc, length, stride)
        expected_o.append(o[0, -1:])
        expected_lse.append(lse[0, -1:])
    plan = nsa.explain(q, k, v, q[..., 0], block_indices=np.zeros((len(lengths), 1, H, 1), np.int32), block_counts=1,
                       block_size=BS, compress_block_size=length, compress_stride=stride, kv_lengths=lengths,
                       backend={nsa.Piece.COMPRESSED_ATTENTION: "triton"})
    fn = plan[nsa.Piece.COMPRESSED_ATTENTION]
    assert fn.__module__.endswith("triton.decode_compressed"), str(plan)
    o, lse = fn(q, k_cmp, v_cmp, block_size=BS, scale=32 ** -0.5, segments=None, compress_block_size=length,
                compress_stride=stride, kv_lengths=lengths)
    assert_close("o_cmp", o, np.stack(expected_o), TOLERANCES["float32"][0])
    want = np.stack(expected_lse)
    seen = np.isfinite(want)
    assert not seen[0].any() and seen[1:].all()  # 9 tokens complete no block of 16
    assert np.array_equal(np.isneginf(np.asarray(lse)), ~seen)
    np.testing.assert_allclose(np.asarray(lse)[seen], want[seen], atol=1e-4)


def test_the_decoding_kernels_decline_everything_but_a_decoding_step():
    """`explain` says why: a full-length call runs the full-length kernels, the decoding ones
    listed with their reason; a prefill chunk has no Triton kernel for these pieces."""
    k = np.zeros((1, 32, 1, 16), np.float32)
    options = dict(block_counts=2, block_size=16, window_size=8)

    def explain(tokens, kv_lengths, piece):
        q, g = np.zeros((1, tokens, 2, 16), np.float32), np.zeros((1, tokens, 2), np.float32)
        return nsa.explain(q, k, k, g, g_swa=g, block_indices=np.zeros((1, tokens, 1, 2), np.int32),
                           kv_lengths=kv_lengths, **options, backend={piece: "triton"})

    for piece, full_module in [(nsa.Piece.COMPRESSED_ATTENTION, "compressed_attention"),
                               (nsa.Piece.SLIDING_WINDOW, "sliding_window")]:
        plan = explain(32, None, piece)
        assert plan.chosen[piece].fn.__module__.endswith(f"triton.{full_module}")
        assert any(backend == "triton" and reason.startswith("decoding steps only")
                   for backend, reason in plan.rejected[piece]), str(plan)
        with pytest.raises(nsa.BackendError, match="one query per row"):
            explain(3, np.array([20]), piece)


def test_differentiating_the_kernel_raises_clearly():
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal(s).astype(np.float32) for s in ((1, 1, 2, 16), (1, 32, 1, 16), (1, 32, 1, 16)))
    indices = np.array([[[[0, 1]]]], np.int32)
    loss = lambda q: nsa.apply_native_sparse_attention(q, k, v, indices, 2, 16, kv_lengths=np.array([20]),
                                                       backend="triton").sum()
    with pytest.raises(NotImplementedError, match="no backward"):
        jax.grad(loss)(q)


def test_prefill_chunks_decline_the_decoding_kernel():
    q = np.zeros((1, 3, 2, 16), np.float32)
    k = np.zeros((1, 32, 1, 16), np.float32)
    with pytest.raises(nsa.BackendError, match="one query per row"):
        nsa.explain(q, k, k, block_indices=np.zeros((1, 3, 1, 2), np.int32), block_counts=2, block_size=16,
                    backend="triton")


@pytest.mark.gpu
@pytest.mark.parametrize("batch, context", [(1, 8192), (8, 32768)])
def test_serving_shape_matches_xla_on_a_gpu(batch, context):
    """Issue 14's serving shape (HQ=64, H=4, D=128, BS=64, S=16, W=512, bf16): a whole decoding
    step with the cache, automatic choice (Triton's decoding kernels for the compressed branch,
    the selected branch and the window) against all-XLA."""
    from ejkernel_nsa import cache as kv_cache

    keys = jax.random.split(jax.random.key(context), 4)
    k = jax.random.normal(keys[0], (batch, context, 4, 128), jnp.bfloat16)
    v = jax.random.normal(keys[1], (batch, context, 4, 128), jnp.bfloat16)
    lengths = jax.random.randint(keys[2], (batch,), context // 2, context + 1)
    cache = kv_cache.from_keys(k, v, lengths, block_size=64)
    q = jax.random.normal(keys[3], (batch, 1, 64, 128), jnp.bfloat16)
    g = jax.nn.sigmoid(q[..., 0].astype(jnp.float32)).astype(jnp.bfloat16)

    def step(backend):
        return jax.jit(lambda c, q, g: kv_cache.attend(c, q, g_cmp=g, g_slc=g, g_swa=g, block_counts=16,
                                                       window_size=512, backend=backend))(cache, q, g)

    plan = nsa.explain(q, k, v, g_cmp=g, g_slc=g, g_swa=g, block_counts=16, block_size=64, window_size=512,
                       kv_lengths=lengths)
    for piece, module in [(nsa.Piece.COMPRESSED_ATTENTION, "decode_compressed"),
                          (nsa.Piece.SELECTED_ATTENTION, "decode"), (nsa.Piece.SLIDING_WINDOW, "decode_window")]:
        assert plan.chosen[piece].fn.__module__.endswith(f"triton.{module}"), str(plan)
    assert_close("automatic vs xla", step(None), step("xla"), 2e-2)


@pytest.mark.gpu
def test_compressed_and_window_kernels_match_oracle_at_the_serving_shape():
    """Issue 14's shape (HQ=64, H=4, D=128, BS=64, W=512, bf16), compiled: the compressed branch
    (output and lse, over a cache's float32 blocks) and the window against the float64 oracle,
    rows at random lengths with NaN past them, with the launch's own tiles and splits."""
    rng = np.random.default_rng(128)
    B, TK, H, G, D, BS, W = 2, 8192, 4, 16, 128, 64, 512
    lengths = np.sort(rng.integers(W // 2, TK + 1, B)).astype(np.int32)
    cast = lambda x: np.array(jnp.asarray(x, jnp.bfloat16))  # noqa: E731 (a writable copy)
    q, k, v = cast(rng.standard_normal((B, 1, G * H, D))), *(cast(rng.standard_normal((B, TK, H, D))) for _ in range(2))
    g = cast(rng.random((B, 1, G * H)))
    indices = np.zeros((B, 1, H, 1), np.int32)
    expected = oracle.nsa_forward_cached(q, k, v, lengths, g_cmp=g, block_indices=indices, block_counts=1,
                                         block_size=BS, g_swa=g, window_size=W)
    k_cmp, v_cmp = (x.astype(np.float32) for x in oracle.mean_pool_cached(k, v, BS, lengths))
    for b, n in enumerate(lengths):
        k[b, n:], v[b, n:], k_cmp[b, n // BS:] = np.nan, np.inf, np.nan
    plan = nsa.explain(q, k, v, g, block_indices=indices, block_counts=1, block_size=BS, g_swa=g, window_size=W,
                       kv_lengths=lengths)
    assert plan.chosen[nsa.Piece.COMPRESSED_ATTENTION].fn.__module__.endswith("triton.decode_compressed"), str(plan)
    assert plan.chosen[nsa.Piece.SLIDING_WINDOW].fn.__module__.endswith("triton.decode_window"), str(plan)
    options = dict(scale=D ** -0.5, segments=None, kv_lengths=jnp.asarray(lengths))
    o_cmp, lse = jax.jit(lambda *a: plan[nsa.Piece.COMPRESSED_ATTENTION](*a, block_size=BS, **options))(
        q, k_cmp, v_cmp)
    o_swa = jax.jit(lambda *a: plan[nsa.Piece.SLIDING_WINDOW](*a, window_size=W, **options))(q, k, v)
    assert_close("o_cmp", o_cmp, expected["o_cmp"], TOLERANCES["bfloat16"][0])
    assert_close("o_swa", o_swa, expected["o_swa"], TOLERANCES["bfloat16"][0])
    np.testing.assert_allclose(np.asarray(lse), expected["lse"], atol=1e-3)
