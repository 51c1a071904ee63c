"""SPEC section 9 at the interface: the geometry's arguments and errors, the registry's declines
for implementations without it, and the learned compressor (`ejkernel_nsa.compressor`)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cases import assert_close
from fake_backend import install_fake_triton

import ejkernel_nsa as nsa
from ejkernel_nsa import compressor
from ejkernel_nsa.config import BACKEND_ENV
from ejkernel_nsa.problem import Piece
from ejkernel_nsa.testing import oracle

rng = np.random.default_rng(913)
T, H, G, D, DV = 90, 2, 2, 8, 6
CU = np.asarray([0, 37, 37, 90], np.int32)


def normal(*shape):
    return rng.standard_normal(shape).astype(np.float32)


Q, K, V, GATE = normal(1, T, H * G, D), normal(1, T, H, D), normal(1, T, H, DV), normal(1, T, H * G)
PAPER_LIKE = dict(block_size=32, compress_block_size=16, compress_stride=8)


@pytest.fixture(autouse=True)
def no_env_force(monkeypatch):
    monkeypatch.delenv(BACKEND_ENV, raising=False)


def call(**changes):
    args = dict(query=Q, key=K, value=V, g_cmp=GATE, block_counts=2, cu_seqlens=CU, **PAPER_LIKE)
    args.update(changes)
    return {k: v for k, v in args.items() if v is not None}


MISTAKES = [
    ("stride not dividing l", call(compress_block_size=12), "compress_stride"),
    ("stride not dividing l'", call(block_size=20, compress_block_size=16, compress_stride=8), "compress_stride"),
    ("l defaults to l' = 32, d = 12", call(compress_block_size=None, compress_stride=12), "compress_stride"),
    ("non-int l", call(compress_block_size=16.0), "compress_block_size"),
    ("zero stride", call(compress_stride=0), "compress_stride"),
    ("key_cmp without value_cmp", call(key_cmp=normal(1, T // 8 + 3, H, D)), "value_cmp"),
    ("supplied blocks without g_cmp",
     call(g_cmp=None, block_indices=np.zeros((1, T, H, 2), np.int32), key_cmp=normal(1, T // 8 + 3, H, D),
          value_cmp=normal(1, T // 8 + 3, H, DV)), "key_cmp"),
    ("mean-pool count instead of the packed T // d + N",
     call(key_cmp=normal(1, -(-T // 8), H, D), value_cmp=normal(1, -(-T // 8), H, DV)), "key_cmp"),
    ("block count of the selection block",
     call(key_cmp=normal(1, T // 32 + 3, H, D), value_cmp=normal(1, T // 32 + 3, H, DV)), "key_cmp"),
    ("value_cmp of the key's dimension",
     call(key_cmp=normal(1, T // 8 + 3, H, D), value_cmp=normal(1, T // 8 + 3, H, D)), "value_cmp"),
    ("key_cmp of another head count",
     call(key_cmp=normal(1, T // 8 + 3, 1, D), value_cmp=normal(1, T // 8 + 3, 1, DV)), "key_cmp"),
]


@pytest.mark.parametrize("args,name", [m[1:] for m in MISTAKES], ids=[m[0] for m in MISTAKES])
def test_bad_geometry_names_the_argument(args, name):
    with pytest.raises((ValueError, TypeError), match=name):
        nsa.native_sparse_attention(**args)


def test_pieces_check_the_geometry():
    with pytest.raises(ValueError, match="compress_stride"):
        nsa.mean_pool(K, V, 32, compress_block_size=16, compress_stride=6)
    k_cmp, v_cmp = nsa.mean_pool(K, V, 32, CU, compress_block_size=16, compress_stride=8)
    assert k_cmp.shape == (1, T // 8 + 3, H, D)
    with pytest.raises(ValueError, match="key_cmp: expected"):
        nsa.compressed_attention(Q, k_cmp, v_cmp, 32, cu_seqlens=CU)  # the default geometry's count
    with pytest.raises(ValueError, match="key_cmp: expected"):
        nsa.select_blocks(Q, k_cmp[:, :-1], jnp.zeros((1, T, H * G)), 2, 32, cu_seqlens=CU, compress_block_size=16,
                          compress_stride=8)


def test_defaults_describe_the_call_as_before():
    plan = nsa.explain(**call(compress_block_size=None, compress_stride=None))
    assert plan.problem.default_geometry and plan.problem.compress_block_size is None
    # l = d = l' spelled out is the same problem as the defaults
    assert nsa.explain(**call(compress_block_size=32, compress_stride=32)).problem == plan.problem
    assert Piece.COMPRESSION in plan.chosen


def test_supplied_blocks_skip_the_compression_piece():
    k_cmp, v_cmp = normal(1, T // 8 + 3, H, D), normal(1, T // 8 + 3, H, DV)
    plan = nsa.explain(**call(key_cmp=k_cmp, value_cmp=v_cmp))
    assert Piece.COMPRESSION not in plan.chosen and plan.problem.supplied_compression


@pytest.mark.parametrize("piece", [Piece.COMPRESSION, Piece.COMPRESSED_ATTENTION, Piece.SELECTION])
def test_implementations_without_the_geometry_decline_it(monkeypatch, piece):
    calls = install_fake_triton(monkeypatch, piece=piece, priority=10)
    # automatic choice: the kernel takes the default geometry, XLA the section 9 one
    assert nsa.explain(**call(compress_block_size=None, compress_stride=None)).chosen[piece].backend == "triton"
    plan = nsa.explain(**call())
    assert plan.chosen[piece].backend == "xla"
    reasons = dict(plan.rejected[piece])
    assert "l = d = l'" in reasons["triton"] and "l=16, d=8, l'=32" in reasons["triton"]
    out = nsa.native_sparse_attention(**call())
    assert not calls and bool(jnp.all(jnp.isfinite(out)))
    # forced (the piece alone: the fake has no other): a clear error, never the mean-pool geometry
    with pytest.raises(nsa.BackendError, match="l = d = l'") as error:
        run_piece(piece, backend="triton")
    assert error.value.forced == "triton"
    assert not calls
    run_piece(piece, backend="triton", compress_block_size=32, compress_stride=32)
    assert calls


def run_piece(piece, backend, **geometry):
    geometry = {**PAPER_LIKE, **geometry, "cu_seqlens": CU, "backend": backend}
    block_size = geometry.pop("block_size")
    k_cmp, v_cmp = nsa.mean_pool(K, V, block_size, **dict(geometry, backend="xla"))
    if piece == Piece.COMPRESSION:
        return nsa.mean_pool(K, V, block_size, **geometry)
    _, lse = nsa.compressed_attention(Q, k_cmp, v_cmp, block_size, **dict(geometry, backend="xla"))
    if piece == Piece.COMPRESSED_ATTENTION:
        return nsa.compressed_attention(Q, k_cmp, v_cmp, block_size, **geometry)
    return nsa.select_blocks(Q, k_cmp, lse, 2, block_size, **geometry)


def test_only_the_stride_or_only_l_changes_the_geometry(monkeypatch):
    install_fake_triton(monkeypatch, piece=Piece.SELECTION, priority=10)
    for geometry in (dict(compress_block_size=None, compress_stride=16), dict(compress_block_size=64,
                                                                              compress_stride=32)):
        plan = nsa.explain(**call(**geometry))
        assert plan.chosen[Piece.SELECTION].backend == "xla", geometry


# ---- the learned compressor ------------------------------------------------------------------


def _compressor_by_hand(branch, x, length, stride, cu):
    """NumPy, one block at a time: mean + MLP(position-embedded block), zero past the sequence."""
    branch = {k: np.asarray(v, np.float64) for k, v in branch.items()}
    x = np.asarray(x, np.float64)
    blocks = []
    offsets = []
    for n in range(len(cu) - 1):
        start, end = int(cu[n]), int(cu[n + 1])
        offsets.append(len(blocks))
        for i in range(-(-(end - start) // stride)):
            lo, hi = start + i * stride, min(start + i * stride + length, end)
            tokens = np.zeros((length,) + x.shape[2:])
            tokens[: hi - lo] = x[0, lo:hi]
            embedded = tokens + branch["position"][:, None, :]  # [l, H, D]
            flat = np.moveaxis(embedded, 1, 0).reshape(x.shape[2], -1)
            pre = flat @ branch["w_in"] + branch["b_in"]
            hidden = np.asarray(jax.nn.gelu(pre))
            blocks.append(x[0, lo:hi].mean(0) + hidden @ branch["w_out"] + branch["b_out"])
    out = np.zeros((1, x.shape[1] // stride + len(cu) - 1) + x.shape[2:])
    out[0, : len(blocks)] = np.asarray(blocks)
    return out


def test_untrained_compressor_is_overlapping_mean_pooling():
    params = compressor.init(jax.random.key(0), 16, D, DV, hidden=12)
    k_cmp, v_cmp = compressor.apply(params, K, V, compress_block_size=16, compress_stride=8, cu_seqlens=CU)
    expected_k, expected_v = oracle.overlapping_pool(K, V, 16, 8, CU)
    assert_close("key_cmp", k_cmp, expected_k, 1e-6)
    assert_close("value_cmp", v_cmp, expected_v, 1e-6)


def test_trained_compressor_matches_its_definition():
    params = compressor.init(jax.random.key(1), 16, D, DV, hidden=12)
    params = jax.tree.map(lambda p: p + 0.3 * jax.random.normal(jax.random.key(p.size), p.shape), params)
    # The definition, not a GPU's TF32 rounding of float32 matmuls (4.7e-4 on an H200), is checked.
    with jax.default_matmul_precision("highest"):
        k_cmp, v_cmp = compressor.apply(params, K, V, compress_block_size=16, compress_stride=8, cu_seqlens=CU)
    assert_close("key_cmp", k_cmp, _compressor_by_hand(params["key"], K, 16, 8, CU), 1e-5)
    assert_close("value_cmp", v_cmp, _compressor_by_hand(params["value"], V, 16, 8, CU), 1e-5)
    with pytest.raises(ValueError, match="compress_block_size=32"):
        compressor.apply(params, K, V, compress_block_size=32, compress_stride=8)


def test_gradients_reach_the_compressor_parameters():
    """d(loss)/d(params) through `native_sparse_attention` equals the oracle's gradient of the
    supplied blocks pulled back through the compressor."""
    params = compressor.init(jax.random.key(2), 16, D, DV, hidden=12)
    params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.key(p.size + 1), p.shape), params)
    k_cmp, v_cmp = compressor.apply(params, K, V, compress_block_size=16, compress_stride=8, cu_seqlens=CU)
    selection = oracle.nsa_forward(**call(key_cmp=k_cmp, value_cmp=v_cmp))["block_indices"].astype(np.int32)
    d_out = normal(1, T, H * G, DV)
    fixed = call(block_indices=selection)
    expected = oracle.nsa_vjp(d_out=d_out, key_cmp=k_cmp, value_cmp=v_cmp, **oracle_names(fixed))
    _, pull_back = jax.vjp(lambda p: compressor.apply(p, K, V, compress_block_size=16, compress_stride=8,
                                                      cu_seqlens=CU), params)
    (expected_params,) = pull_back((expected["key_cmp"].astype(np.float32), expected["value_cmp"].astype(np.float32)))

    def loss(p):
        kc, vc = compressor.apply(p, K, V, compress_block_size=16, compress_stride=8, cu_seqlens=CU)
        return jnp.sum(nsa.native_sparse_attention(**dict(fixed, key_cmp=kc, value_cmp=vc)) * d_out)

    grads = jax.jit(jax.grad(loss))(params)
    references = dict(jax.tree_util.tree_leaves_with_path(expected_params))
    for path, grad in jax.tree_util.tree_leaves_with_path(grads):
        name = jax.tree_util.keystr(path)
        if name == "['key']['b_out']":
            # A bias shared by every compressed key shifts all of a query's scores equally, which
            # its softmax ignores: the exact gradient is 0, both sides hold rounding noise.
            assert float(jnp.abs(grad).max()) < 1e-5 * float(jnp.abs(grads["key"]["w_out"]).max()) + 1e-6
            continue
        assert float(jnp.abs(references[path]).max()) > 0, name
        assert_close(f"d{name}", grad, references[path], 1e-4)


def oracle_names(args):
    return {("scale" if k == "softmax_scale" else k): v for k, v in args.items()}
