"""Every Pallas Triton kernel lowers to Triton IR for an H100, on a machine without a GPU.

This is what can be checked of the Triton lowering without a GPU: JAX lowers each `pallas_call`
(forward and backward) for the `cuda` platform, which runs the Pallas-to-Triton lowering rules:
unsupported primitives, non-power-of-two tensors and operand type mismatches fail here. Triton's
own compile to PTX (layouts, shared memory, registers) happens in XLA on a GPU and is not checked.

JAX asks the GPU for its compute capability while lowering; without one, the (private) query is
pointed at an H100's description. A JAX that moves it makes this test skip, not fail.
"""

import jax
import jax.numpy as jnp
import pytest
from conftest import has_gpu

from ejkernel_nsa import config
from ejkernel_nsa.problem import Segments

pytestmark = pytest.mark.skipif(has_gpu(), reason="on a GPU the kernels are compiled and run by the suite")
TRITON_CALL = "__gpu$xla.gpu.triton"


@pytest.fixture(autouse=True)
def h100_lowering(monkeypatch):
    try:
        from jax._src.pallas.triton import gpu_info
    except ImportError as error:
        pytest.skip(f"JAX's Pallas Triton internals moved: {error}")
    if not hasattr(gpu_info, "get_gpu_info_from_version") or not hasattr(gpu_info.GpuVersion, "H100"):
        pytest.skip("JAX's Pallas Triton GPU description moved")
    monkeypatch.setattr(gpu_info, "get_gpu_info", lambda: gpu_info.get_gpu_info_from_version(gpu_info.GpuVersion.H100))
    with config.interpret_mode(False):
        yield


def kernels_lowered(fn, *args) -> int:
    """How many Triton kernels the `cuda` lowering of `fn(*args)` contains."""
    return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text().count(TRITON_CALL)


# (dtype, group, Dk, Dv, block size, slots, window): every head-dim class, odd and wide groups.
CASES = [
    ("bfloat16", 1, 64, 64, 64, 16, 512),
    ("float16", 3, 40, 24, 16, 5, 7),
    ("float32", 16, 128, 128, 32, 1, 64),
    ("bfloat16", 32, 192, 128, 128, 8, 1),
    ("float32", 4, 256, 256, 64, 16, 128),
]


@pytest.mark.parametrize("dtype, group, head_dim, value_dim, block_size, slots, window", CASES,
                         ids=[f"{c[0]}-g{c[1]}-d{c[2]}x{c[3]}-bs{c[4]}-s{c[5]}" for c in CASES])
def test_every_kernel_lowers_for_an_h100(dtype, group, head_dim, value_dim, block_size, slots, window):
    from ejkernel_nsa.backends.pallas_triton import (
        compressed_attention,
        compression,
        selected_attention,
        selection,
        sliding_window,
    )

    T, H = 300, 2
    q = jnp.zeros((1, T, H * group, head_dim), dtype)
    k = jnp.zeros((1, T, H, head_dim), dtype)
    v = jnp.zeros((1, T, H, value_dim), dtype)
    cu_seqlens = jnp.array([0, 45, T], jnp.int32)
    counts = jnp.zeros((1, T, H), jnp.int32)

    def branches(q, k, v, cu_seqlens, counts):
        segments = Segments(cu_seqlens)
        common = dict(block_size=block_size, segments=segments)
        k_cmp, v_cmp = compression.run(k, v, **common)
        o_cmp, lse = compressed_attention.run(q, k_cmp, v_cmp, scale=0.1, **common)
        indices = selection.run(jax.lax.stop_gradient(q), jax.lax.stop_gradient(k_cmp), jax.lax.stop_gradient(lse),
                                block_counts=counts, num_slots=slots, scale=0.1, **common)
        o_slc = selected_attention.run(q, k, v, indices, counts, scale=0.1, **common)
        o_swa = sliding_window.run(q, k, v, window_size=window, scale=0.1, segments=segments)
        total = o_cmp.astype(jnp.float32) + o_slc.astype(jnp.float32) + o_swa.astype(jnp.float32)
        return jnp.sum(total) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0))

    # Forward: 2 mean pools, compressed attention, selection, selected attention, window (6).
    # Backward adds 2 pool backwards, and dq + dk/dv for each of the three attentions (8).
    assert kernels_lowered(branches, q, k, v, cu_seqlens, counts) == 6
    assert kernels_lowered(jax.grad(branches, argnums=(0, 1, 2)), q, k, v, cu_seqlens, counts) == 14
