"""The Pallas (Triton lowering) backend against the oracle: the shared suite, on a GPU (compiled
kernels) or, with EJKERNEL_NSA_INTERPRET=1 on a machine without one, through the Pallas
interpreter. Group sizes go up to 32."""

import numpy as np
import pytest
from backend_suite import MODEL_HEAD_DIMS, BackendSuite, check_model_sized_heads
from conftest import has_gpu

import ejkernel_nsa as nsa
from ejkernel_nsa import config
from ejkernel_nsa.problem import Piece
from ejkernel_nsa.registry import implementations

BACKEND = "pallas_triton"


class TestPallasTriton(BackendSuite):
    backend = BACKEND
    groups = (1, 2, 3, 4, 8, 16, 32)


def test_every_piece_has_a_pallas_triton_kernel():
    pieces = {impl.piece for impl in implementations(backend=BACKEND)}
    if not pieces and nsa.backend_status()[BACKEND] is not None:
        pytest.skip("the pallas_triton backend is not importable here")
    assert pieces == set(Piece)


def _small_call():
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal(s).astype(np.float32) for s in ((1, 64, 4, 16), (1, 64, 2, 16), (1, 64, 2, 16)))
    g = rng.uniform(size=(1, 64, 4)).astype(np.float32)
    return dict(query=q, key=k, value=v, g_cmp=g, g_slc=g, g_swa=g, block_counts=2, block_size=16, window_size=16)


@pytest.mark.skipif(has_gpu(), reason="interpret mode is for machines without a GPU")
def test_interpreter_runs_only_when_forced():
    """With interpret mode on and no GPU, automatic choice never picks the interpreter, and a
    forced call runs it (the kernels, not a fallback)."""
    call = _small_call()
    with config.interpret_mode(True):
        plan = nsa.explain(**call)
        assert all(impl.backend != BACKEND for impl in plan.chosen.values())
        assert any(backend == BACKEND and "interpret mode" in reason
                   for reasons in plan.rejected.values() for backend, reason in reasons)
        forced = nsa.explain(**call, backend=BACKEND)
        assert all(impl.backend == BACKEND for impl in forced.chosen.values())
        out = nsa.native_sparse_attention(**call, backend=BACKEND)
    expected = nsa.native_sparse_attention(**call, backend="xla")
    np.testing.assert_allclose(np.asarray(out), np.asarray(expected), rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(has_gpu(), reason="checks the CPU-only machine")
def test_without_interpret_mode_cpu_inputs_are_declined_with_a_reason():
    with config.interpret_mode(False):
        with pytest.raises(nsa.BackendError, match="needs an NVIDIA GPU"):
            nsa.native_sparse_attention(**_small_call(), backend=BACKEND)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("head_dim, value_dim", MODEL_HEAD_DIMS, ids=[f"{k}-{v}" for k, v in MODEL_HEAD_DIMS])
@pytest.mark.parametrize("group", [1, 2, 3, 4, 8, 16, 32])
def test_model_sized_heads_match_oracle_and_xla(group, head_dim, value_dim, dtype):
    check_model_sized_heads(BACKEND, group, head_dim, value_dim, dtype)
