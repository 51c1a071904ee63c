"""Every Mosaic GPU kernel lowers for an H100, on a machine without a GPU.

JAX lowers each `plgpu.kernel` (forward and backward of each piece) for the `cuda` platform,
which runs all of Mosaic GPU's lowering that is Python: Pallas to the Mosaic GPU dialect,
layout inference (register layouts, the smem tiling every TMA copy and wgmma operand takes,
and the divisibility of every dynamic TMA index by that tiling), the dialect lowering to
NVVM/LLVM ops, the shared-memory total against Hopper's 227 KiB, and the module verifier. The
interpreter (`tests/test_backend_pallas_mosaic.py`) checks none of these; a failure here is a
kernel that would not compile on a GPU. What stays unchecked: the C++ passes that XLA's
compiler runs on the serialized module (LLVM to PTX, ptxas: register pressure, spills), and
anything at run time (barrier phases, TMA descriptors against the real buffers).

Without a GPU, Mosaic GPU assumes sm_90 (jax 0.11.2 `mosaic.gpu.utils._infer_arch`); each case is
lowered only where the piece's `supports` takes it, as the dispatcher would. JAX internals
this test reads (to name the kernels lowered, and to turn an assertion that jax 0.11.2 raises
while reporting an unprovable TMA index into that report) are private: if they move, the test
skips rather than fails.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from conftest import has_gpu

from ejkernel_nsa import config
from ejkernel_nsa.problem import NSAProblem, Segments

pytestmark = pytest.mark.skipif(has_gpu(), reason="on a GPU the kernels are compiled and run by the suite")

T, H, SLOTS = 300, 2, 16


@pytest.fixture
def lowered_kernels(monkeypatch):
    """A list that fills with the name of every Mosaic GPU kernel lowered."""
    try:
        from jax._src.pallas.mosaic_gpu import lowering
        from jax.experimental.mosaic.gpu import dialect as mgpu_dialect
        from jax.experimental.mosaic.gpu import layout_inference
    except ImportError as error:
        pytest.skip(f"JAX's Mosaic GPU internals moved: {error}")
    if not hasattr(lowering, "lower_jaxpr_to_module") or not hasattr(
            layout_inference, "_check_unsatisfiable_divisibility_constraints"):
        pytest.skip("JAX's Mosaic GPU lowering moved")
    kernels = []
    lower_module = lowering.lower_jaxpr_to_module

    def capture(*args, **kwargs):
        jaxpr = kwargs["jaxpr"] if "jaxpr" in kwargs else args[7]
        result = lower_module(*args, **kwargs)
        kernels.append(jaxpr.debug_info.func_name)
        return result

    check = layout_inference._check_unsatisfiable_divisibility_constraints

    def explain(ctx, system):
        # jax 0.11.2 asserts `len(op.indices) == len(multiple)` while building the message for a
        # TMA copy whose dynamic index is not provably a multiple of its smem tiling (squeezed
        # dims are in the indices, not in the multiple): name the copies instead.
        try:
            check(ctx, system)
        except AssertionError:
            copies = sorted({describe(op) for op in ctx_copies(ctx)})
            raise AssertionError("Mosaic GPU could not prove a TMA copy's dynamic index a multiple of its smem "
                                 "tiling (it asks for pl.multiple_of); the copies of the failing kernel, with "
                                 "the multiple each index is known to be (- for a squeezed dim):\n"
                                 + "\n".join(copies)) from None

    def describe(op):
        known = ["-" if size == -1 else str(layout_inference.dynamic_gcd(size, index))
                 for size, index in zip(op.slice_lengths, op.indices)]
        box = [size for size in op.slice_lengths if size != -1]
        return f"{type(op).__name__} box {box} index multiples [{', '.join(known)}] at {op.location}"

    def ctx_copies(ctx):
        for sites in ctx.value_sites_for_variable.values():
            for site in sites:
                op = getattr(site, "operation", None)
                if isinstance(op, (mgpu_dialect.AsyncLoadOp, mgpu_dialect.AsyncStoreOp)):
                    yield op

    monkeypatch.setattr(lowering, "lower_jaxpr_to_module", capture)
    monkeypatch.setattr(layout_inference, "_check_unsatisfiable_divisibility_constraints", explain)
    with config.interpret_mode(False):
        yield kernels


def lower(fn, *args):
    jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))


def total(*xs):
    return sum(jnp.sum(jnp.where(jnp.isfinite(x), x, 0).astype(jnp.float32)) for x in xs)


# (dtype, group, head dim, block size, varlen, pieces `supports` declines): the model-sized heads
# (G=1 D=64, G=16 D=128) in 16-bit and float32 (two-part operands; at D=128 only compression and
# selection fit in shared memory), block sizes 16..128, packed sequences, and an odd group and
# head dim (padded rows and columns, a 64-byte swizzle shared by every operand).
CASES = [
    ("bfloat16", 1, 64, 32, True, ()),  # the H100 failure: test_model_sized_heads_match_oracle[1-64]
    ("bfloat16", 16, 128, 64, False, ()),
    ("float32", 1, 64, 16, True, ()),
    ("float32", 16, 128, 32, False, ("compressed_attention", "selected_attention")),
    ("float16", 3, 40, 32, True, ()),
    ("bfloat16", 4, 128, 128, True, ("selected_attention",)),
]
IDS = [f"{c[0]}-g{c[1]}-d{c[2]}-bs{c[3]}{'-varlen' if c[4] else ''}" for c in CASES]
KERNELS = {
    "compression": {"mean_pool_fwd_kernel", "mean_pool_bwd_kernel"},
    "compressed_attention": {"compressed_attention_fwd_kernel", "compressed_attention_bwd_kernel_dq",
                             "compressed_attention_bwd_kernel_dkv"},
    "selected_attention": {"selected_attention_fwd_kernel", "selected_attention_bwd_kernel_dq",
                           "selected_attention_bwd_kernel_dkv"},
    "selection": {"block_selection_fwd_kernel"},
}


def inputs(dtype, group, head_dim, block_size, varlen):
    sds = jax.ShapeDtypeStruct
    num_blocks = T // block_size + 2 if varlen else -(-T // block_size)
    problem = NSAProblem(batch=1, seq_len=T, num_q_heads=H * group, num_kv_heads=H, head_dim=head_dim,
                         value_dim=head_dim, dtype=dtype, block_size=block_size, num_slots=SLOTS,
                         num_seqs=2 if varlen else None, platform="gpu")
    shapes = dict(q=sds((1, T, H * group, head_dim), dtype), k=sds((1, T, H, head_dim), dtype),
                  k_cmp=sds((1, num_blocks, H, head_dim), jnp.float32), lse=sds((1, T, H * group), jnp.float32),
                  indices=sds((1, T, H, SLOTS), jnp.int32), counts=sds((1, T, H), jnp.int32),
                  cu_seqlens=sds((3,), jnp.int32))
    segments = (lambda cu_seqlens: Segments(cu_seqlens)) if varlen else (lambda cu_seqlens: None)
    return problem, shapes, segments


def lower_piece(module, problem, fn, args, argnums):
    """Lower the piece's forward, then its gradient (when it has one), where `supports` takes it;
    returns the piece's name if it declined."""
    if module.supports(problem) is not None:
        return [module.__name__.rsplit(".", 1)[-1]]
    lower(fn, *args)
    if argnums:
        lower(jax.grad(fn, argnums=argnums), *args)
    return []


@pytest.mark.parametrize("dtype, group, head_dim, block_size, varlen, declines", CASES, ids=IDS)
def test_every_kernel_lowers_for_an_h100(lowered_kernels, dtype, group, head_dim, block_size, varlen, declines):
    from ejkernel_nsa.backends.pallas_mosaic import compressed_attention, compression, selected_attention, selection

    problem, s, segments = inputs(dtype, group, head_dim, block_size, varlen)
    common = dict(block_size=block_size)

    def pooled(k, v, cu_seqlens):
        return total(*compression.run(k, v, segments=segments(cu_seqlens), **common))

    def compressed(q, k_cmp, v_cmp, cu_seqlens):
        return total(*compressed_attention.run(q, k_cmp, v_cmp, scale=0.1, segments=segments(cu_seqlens), **common))

    def selected(q, k, v, indices, counts, cu_seqlens):
        return total(selected_attention.run(q, k, v, indices, counts, scale=0.1, segments=segments(cu_seqlens),
                                            **common))

    def select(q, k_cmp, lse, counts, cu_seqlens):
        return selection.run(q, k_cmp, lse, block_counts=counts, num_slots=SLOTS, scale=0.1,
                             segments=segments(cu_seqlens), **common)

    declined = []
    declined += lower_piece(compression, problem, pooled, (s["k"], s["k"], s["cu_seqlens"]), (0, 1))
    declined += lower_piece(compressed_attention, problem, compressed,
                            (s["q"], s["k_cmp"], s["k_cmp"], s["cu_seqlens"]), (0, 1, 2))
    declined += lower_piece(selected_attention, problem, selected,
                            (s["q"], s["k"], s["k"], s["indices"], s["counts"], s["cu_seqlens"]), (0, 1, 2))
    declined += lower_piece(selection, problem, select,
                            (s["q"], s["k_cmp"], s["lse"], s["counts"], s["cu_seqlens"]), None)
    assert tuple(declined) == declines
    expected = set().union(*(kernels for piece, kernels in KERNELS.items() if piece not in declines))
    assert set(lowered_kernels) == expected, sorted(lowered_kernels)
