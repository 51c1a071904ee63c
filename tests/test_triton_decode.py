"""The Triton decoding kernel (backends/triton/decode.py) against the float64 oracle: one query per
row against a cache, given selections with empty slots, duplicates and future blocks, NaN planted
past each row's length. Runs where the Triton backend runs: on a GPU, or on a CPU with
EJKERNEL_NSA_INTERPRET=1 (Triton's interpreter), at tiny shapes."""

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
    """Issue 14's serving shape (HQ=64, H=4, D=128, BS=64, S=16, bf16): a whole decoding step with
    the cache, automatic choice (Triton's kernel for the selected branch) against all-XLA."""
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
    assert plan.chosen[nsa.Piece.SELECTED_ATTENTION].backend == "triton", str(plan)
    assert_close("automatic vs xla", step(None), step("xla"), 2e-2)
