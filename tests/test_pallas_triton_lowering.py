"""Every Pallas Triton kernel lowers to Triton IR for an H100, and that IR compiles for sm_90, on a
machine without a GPU.

JAX lowers each `pallas_call` (forward and backward) for the `cuda` platform, which runs the
Pallas-to-Triton lowering rules: unsupported primitives, non-power-of-two tensors and operand type
mismatches fail there. The Triton IR of each kernel is then compiled to a cubin for sm_90 by the
`triton` package (the test extra, the one the Triton backend's compile test uses), with the
kernel's warps and stages, and its shared memory checked against Hopper's. On a GPU, XLA compiles
the same IR with the Triton it bundles, a different build: this is a strong proxy, not the same
compiler.

JAX asks the GPU for its compute capability while lowering; without one, the (private) query is
pointed at an H100's description, and the IR is taken where the lowering produces it. A JAX that
moves these makes the test skip, not fail.
"""

import sys

import jax
import jax.numpy as jnp
import pytest
from conftest import has_gpu

from ejkernel_nsa import config
from ejkernel_nsa.problem import Segments

pytestmark = pytest.mark.skipif(has_gpu(), reason="on a GPU the kernels are compiled and run by the suite")
# Hopper's largest shared memory per block (227 KiB).
H100_SHARED_BYTES = 232448


@pytest.fixture
def lowered_kernels(monkeypatch):
    """A list that fills with (name, Triton IR text, warps, stages) for every kernel lowered."""
    try:
        from jax._src.pallas.triton import gpu_info, lowering
    except ImportError as error:
        pytest.skip(f"JAX's Pallas Triton internals moved: {error}")
    if not hasattr(gpu_info, "get_gpu_info_from_version") or not hasattr(lowering, "lower_jaxpr_to_triton_module"):
        pytest.skip("JAX's Pallas Triton lowering moved")
    monkeypatch.setattr(gpu_info, "get_gpu_info", lambda: gpu_info.get_gpu_info_from_version(gpu_info.GpuVersion.H100))
    kernels = []
    lower_module = lowering.lower_jaxpr_to_triton_module

    def capture(jaxpr, *args, **kwargs):
        result = lower_module(jaxpr, *args, **kwargs)
        # The caller (the pallas_call lowering rule) has settled the launch options by now.
        launch = sys._getframe(1).f_locals
        kernels.append((jaxpr.debug_info.func_name, result.module.operation.get_asm(enable_debug_info=False),
                        launch.get("num_warps", 4), launch.get("num_stages", 3)))
        return result

    monkeypatch.setattr(lowering, "lower_jaxpr_to_triton_module", capture)
    with config.interpret_mode(False):
        yield kernels


def compile_for_sm90(name: str, ir: str, num_warps: int, num_stages: int, tmp_path):
    import triton
    from triton.backends.compiler import GPUTarget

    path = tmp_path / f"{name}.ttir"
    path.write_text(ir)
    return triton.compile(str(path), target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


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
def test_every_kernel_lowers_and_compiles_for_an_h100(lowered_kernels, tmp_path, dtype, group, head_dim, value_dim,
                                                       block_size, slots, window):
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

    jax.jit(jax.grad(branches, argnums=(0, 1, 2))).trace(q, k, v, cu_seqlens, counts).lower(
        lowering_platforms=("cuda",))
    # Forward: 2 mean pools, compressed attention, selection, selected attention, window (6).
    # Backward: 2 pool backwards, and dq + dk/dv for each of the three attentions (8).
    names = sorted(name for name, *_ in lowered_kernels)
    assert len(names) == 14, names
    for name, ir, num_warps, num_stages in lowered_kernels:
        kernel = compile_for_sm90(name, ir, num_warps, num_stages, tmp_path)
        assert kernel.asm.get("cubin"), f"{name}: no cubin"
        assert kernel.metadata.shared <= H100_SHARED_BYTES, f"{name}: {kernel.metadata.shared} bytes of shared memory"
