"""The reliability pass (issue 11): integer inputs that do not fit int32, zero-size cases, the
exception classes docs/api.md promises, interpret mode's process state, the XLA backend's memory.
NaN/Inf containment (SPEC 8) is in the shared suite (tests/backend_suite.py), for every backend.

Each test names the class of failure it pins down; values are compared with the float64 oracle.
"""

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ejkernel_nsa as nsa
from ejkernel_nsa.testing import oracle
from cases import rel_l2

rng = np.random.default_rng(11)
T, HQ, H, D, DV, BS = 48, 4, 2, 16, 8, 16


def normal(*shape):
    return rng.standard_normal(shape).astype(np.float32)


def qkv(batch=1, seq_len=T):
    return normal(batch, seq_len, HQ, D), normal(batch, seq_len, H, D), normal(batch, seq_len, H, DV)


def first_block_only(seq_len=T, slots=2):
    indices = np.full((1, seq_len, H, slots), -1, np.int64)
    indices[..., 0] = 0
    return indices


# ---- 1. integer inputs beyond int32 are rejected, never wrapped --------------------------------


@pytest.mark.parametrize("x64", [False, True], ids=["x32", "x64"])
def test_int64_block_indices_beyond_int32_are_rejected(x64):
    q, k, v = qkv()
    indices = first_block_only()
    indices[0, :, :, 1] = 2**32 + 1  # wrapped to int32 this is block 1, which most tokens may see
    with jax.enable_x64(x64):
        for form in (indices, indices.tolist()) + ((jnp.asarray(indices),) if x64 else ()):
            with pytest.raises(ValueError, match=r"^block_indices: values must fit int32"):
                nsa.apply_native_sparse_attention(q, k, v, form, block_counts=2, block_size=BS)


def test_traced_int64_block_indices_saturate_instead_of_wrapping():
    """A traced int64 value cannot be checked: it is clamped, so a far-future block stays in the
    future (ignored) instead of wrapping to block 1."""
    q, k, v = qkv()
    indices = first_block_only()
    indices[0, :, :, 1] = 2**32 + 1
    expected = oracle.nsa_forward(q, k, v, block_indices=first_block_only(), block_counts=2, block_size=BS)["o"]
    with jax.enable_x64(True):
        out = jax.jit(lambda b: nsa.apply_native_sparse_attention(q, k, v, b, block_counts=2, block_size=BS))(
            jnp.asarray(indices)
        )
    assert rel_l2(out, expected) < 1e-4


@pytest.mark.parametrize("x64", [False, True], ids=["x32", "x64"])
def test_int64_cu_seqlens_and_counts_beyond_int32_are_rejected(x64):
    q, k, v = qkv()
    g = normal(1, T, HQ)
    with jax.enable_x64(x64):
        # Decreasing, but 2**32 + 10 wraps to 10: a valid-looking [0, 10, 48].
        with pytest.raises(ValueError, match=r"^cu_seqlens: values must fit int32"):
            nsa.native_sparse_attention(q, k, v, g, block_counts=2, block_size=BS,
                                        cu_seqlens=np.array([0, 2**32 + 10, T], np.int64))
        with pytest.raises(ValueError, match=r"^block_counts: values must fit int32"):
            nsa.native_sparse_attention(q, k, v, g, block_counts=np.full((1, T, H), 2**33, np.int64),
                                        max_block_counts=2, block_size=BS)
        with pytest.raises(ValueError, match=r"^block_counts: values must fit int32"):
            nsa.native_sparse_attention(q, k, v, g, block_counts=2**40, block_size=BS)
        positions = np.stack([np.zeros(T, np.int64), np.arange(T) + 2**32], axis=1)
        with pytest.raises(ValueError, match=r"^token_indices: values must fit int32"):
            nsa.apply_native_sparse_attention(q, k, v, first_block_only(), 2, BS, cu_seqlens=np.array([0, T]),
                                              token_indices=positions)


def test_token_indices_that_disagree_with_cu_seqlens_are_rejected():
    q, k, v = qkv()
    cu_seqlens = np.array([0, 20, T], np.int32)
    seq = (np.arange(T) >= 20).astype(np.int32)
    good = np.stack([seq, np.arange(T) - 20 * seq], axis=1).astype(np.int32)
    args = (q, k, v, first_block_only(), 2, BS, None, cu_seqlens)
    expected = nsa.apply_native_sparse_attention(*args)
    np.testing.assert_allclose(nsa.apply_native_sparse_attention(*args, token_indices=good), expected, rtol=1e-6)
    for token, column, value in [(30, 1, 3), (5, 0, 1)]:
        bad = good.copy()
        bad[token, column] = value
        with pytest.raises(ValueError, match=rf"^token_indices: disagrees with cu_seqlens at token {token}"):
            nsa.apply_native_sparse_attention(*args, token_indices=bad)


# ---- 2. zero sizes and the exception classes ----------------------------------------------------


@pytest.mark.parametrize(
    "shapes, argument",
    [(((1, T, 4, D), (1, T, 0, D), (1, T, 0, DV)), "key: expected H >= 1"),
     (((1, T, 0, D), (1, T, 2, D), (1, T, 2, DV)), "query: expected HQ >= 1"),
     (((1, T, 4, 0), (1, T, 2, 0), (1, T, 2, DV)), "query: expected Dk >= 1"),
     (((1, T, 4, D), (1, T, 2, D), (1, T, 2, 0)), "value: expected Dv >= 1")],
    ids=["no kv heads", "no query heads", "zero Dk", "zero Dv"],
)
def test_zero_heads_or_head_dims_are_named_errors(shapes, argument):
    q, k, v = (normal(*s) for s in shapes)
    with pytest.raises(ValueError, match="^" + re.escape(argument)):
        nsa.native_sparse_attention(q, k, v, normal(*shapes[0][:3]), block_counts=2, block_size=BS)
    with pytest.raises(ValueError, match="^" + re.escape(argument.split(":")[0])):
        nsa.sliding_window_attention(q, k, v, 4)


@pytest.mark.parametrize("batch, seq_len", [(1, 0), (0, T)], ids=["no tokens", "no rows"])
def test_empty_calls_return_the_empty_output(batch, seq_len):
    q, k, v = qkv(batch, seq_len)
    g = normal(batch, seq_len, HQ)

    def loss(q, k, v):
        out = nsa.native_sparse_attention(q, k, v, g, g, block_counts=2, block_size=BS, g_swa=g, window_size=4)
        return out, out.sum()

    out, _ = loss(q, k, v)
    assert out.shape == (batch, seq_len, HQ, DV) and out.dtype == q.dtype
    grads = jax.grad(lambda *a: loss(*a)[1], argnums=(0, 1, 2))(q, k, v)
    assert [g.shape for g in grads] == [q.shape, k.shape, v.shape]


def test_zero_selection_slots_make_the_selected_branch_zero():
    q, k, v = qkv()
    g_cmp, g_slc = normal(1, T, HQ), normal(1, T, HQ)
    empty = np.zeros((1, T, H, 0), np.int32)
    out = nsa.native_sparse_attention(q, k, v, g_cmp, g_slc, block_indices=empty, block_size=BS)
    # The same function with one slot that names no block.
    no_block = np.full((1, T, H, 1), -1, np.int32)
    expected = oracle.nsa_forward(q, k, v, g_cmp, g_slc, block_indices=no_block, block_counts=1, block_size=BS)["o"]
    assert rel_l2(out, expected) < 1e-4
    alone = nsa.apply_native_sparse_attention(q, k, v, empty, block_size=BS)
    assert np.array_equal(np.asarray(alone), np.zeros_like(alone))
    assert not np.any(np.asarray(jax.grad(lambda k: nsa.apply_native_sparse_attention(q, k, v, empty, 2, BS).sum())(k)))


def test_block_counts_kinds():
    q, k, v = qkv()
    g = normal(1, T, HQ)
    call = dict(block_size=BS)
    with pytest.raises(TypeError, match=r"^block_counts: expected a Python int .* got a traced scalar"):
        jax.jit(lambda c: nsa.native_sparse_attention(q, k, v, g, block_counts=c, **call))(2)
    with pytest.raises(TypeError, match=r"^block_counts: expected a Python int or an integer array .* got float 2.0"):
        nsa.native_sparse_attention(q, k, v, g, block_counts=2.0, **call)
    # A concrete integer scalar is the int it holds.
    as_scalar = nsa.native_sparse_attention(q, k, v, g, block_counts=np.int64(2), **call)
    np.testing.assert_array_equal(as_scalar, nsa.native_sparse_attention(q, k, v, g, block_counts=2, **call))


# ---- 3. interpret mode is decided in one place, and leaving the block undoes it -----------------

# Run in a fresh process: the first registry load must happen inside `interpret_mode(True)`.
FIRST_LOAD_INSIDE_INTERPRET_MODE = r"""
import json, os
import numpy as np
import ejkernel_nsa as nsa
from ejkernel_nsa.testing import oracle
from ejkernel_nsa import config

rng = np.random.default_rng(3)
k, v = rng.standard_normal((1, 40, 2, 16), np.float32), rng.standard_normal((1, 40, 2, 8), np.float32)
report = {}
with config.interpret_mode(True):
    inside = nsa.backend_status()
    report["inside"] = {name: reason is None for name, reason in inside.items()}
    report["env_inside"] = os.environ.get("TRITON_INTERPRET")
    if inside["pallas_mosaic"] is None:  # says available: then forcing it must run, and be right
        k_cmp, v_cmp = nsa.mean_pool(k, v, 16, backend="pallas_mosaic")
        expected = oracle.mean_pool(k, v, 16)
        report["mosaic_error"] = max(float(np.abs(np.asarray(a) - b).max()) for a, b in zip((k_cmp, v_cmp), expected))
after = nsa.backend_status()
report["after"] = {name: reason is None for name, reason in after.items()}
report["env_after"] = os.environ.get("TRITON_INTERPRET")
try:
    nsa.mean_pool(k, v, 16, backend="pallas_mosaic")
    report["forced_after"] = "ran"
except nsa.BackendError as error:
    report["forced_after"] = str(error)
print("REPORT" + json.dumps(report))
"""


def test_interpret_mode_leaves_no_process_state():
    import json
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k not in ("EJKERNEL_NSA_INTERPRET", "TRITON_INTERPRET")}
    tests = Path(__file__).parent
    env["PYTHONPATH"] = os.pathsep.join([str(tests), str(tests.parent), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-c", FIRST_LOAD_INSIDE_INTERPRET_MODE], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.split("REPORT", 1)[1])
    if nsa.backend_status()["triton"] is not None:  # no GPU toolchain: Triton is never switched by the block
        assert not report["inside"]["triton"] and not report["after"]["triton"]
    assert report["env_inside"] is None and report["env_after"] is None
    assert report["inside"]["pallas_triton"] and report["inside"]["pallas_mosaic"]
    assert report["mosaic_error"] < 1e-5
    if nsa.backend_status()["pallas_mosaic"] is not None:  # no Hopper here: unavailable again after the block
        assert not report["after"]["pallas_mosaic"] and not report["after"]["pallas_triton"]
        assert "pallas_mosaic" in report["forced_after"]


# ---- 4. the XLA backend's memory follows T, within its chunk budget --------------------------------


@pytest.mark.parametrize("block_size, block_counts", [(16384, 16), (16, 4096)], ids=["huge block", "huge count"])
def test_xla_memory_is_bounded_at_tiny_t(block_size, block_counts):
    from ejkernel_nsa.backends.xla.layout import CHUNK_BYTES

    q, k, v = (jnp.asarray(x) for x in qkv(seq_len=64))
    g = jnp.asarray(normal(1, 64, HQ))

    def call(q, k, v, g):
        return nsa.native_sparse_attention(q, k, v, g, g, block_counts=block_counts, block_size=block_size,
                                           backend="xla")

    backward = jax.grad(lambda *a: call(*a).sum(), argnums=(0, 1, 2))
    for fn in (call, backward) if block_counts == 16 else (call,):
        compiled = jax.jit(fn).lower(q, k, v, g).compile()
        # Inputs are 48 KiB; what grows with S * BS (here 2**18 keys per token) must not appear.
        assert compiled.memory_analysis().temp_size_in_bytes < CHUNK_BYTES // 8
    if block_counts == 16:
        expected = oracle.nsa_forward(q, k, v, g, g, block_counts=block_counts, block_size=block_size)["o"]
        assert rel_l2(call(q, k, v, g), expected) < 1e-4
