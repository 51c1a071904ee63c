"""The Pallas (Triton lowering) backend against the oracle: the shared suite, on a GPU (compiled
kernels) or, with EJKERNEL_NSA_INTERPRET=1 on a machine without one, through the Pallas
interpreter. Group sizes go up to 32."""

import pytest
from backend_suite import BackendSuite

import ejkernel_nsa as nsa
from ejkernel_nsa.problem import Piece
from ejkernel_nsa.registry import implementations


class TestPallasTriton(BackendSuite):
    backend = "pallas_triton"
    groups = (1, 2, 3, 4, 8, 16, 32)


def test_every_piece_has_a_pallas_triton_kernel():
    pieces = {impl.piece for impl in implementations(backend="pallas_triton")}
    if not pieces and nsa.backend_status()["pallas_triton"] is not None:
        pytest.skip("the pallas_triton backend is not importable here")
    assert pieces == set(Piece)
