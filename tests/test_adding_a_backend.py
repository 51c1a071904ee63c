"""docs/registry.md's "Adding a backend", followed end to end with the toy backend of
tests/toy_backend.py: loaded as a known backend, chosen and explained, forced (and declining
loudly), and checked against the float64 oracle by `ejkernel_nsa.testing.check_backends`."""

import importlib
import sys

import numpy as np
import pytest

import ejkernel_nsa as nsa
from ejkernel_nsa import testing
from ejkernel_nsa.config import BACKEND_ENV
from ejkernel_nsa.problem import Piece
from ejkernel_nsa.registry import core


@pytest.fixture
def toy(monkeypatch):
    """Step 1 of the page: `toy` is a known backend, and the registry imports it. On copies of the
    registry's tables that keep only the XLA implementations beside it (monkeypatch restores the
    real ones), so the choice is between the two wherever the tests run."""
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    core.load_backends()
    monkeypatch.setattr(core, "KNOWN_BACKENDS", core.KNOWN_BACKENDS + ("toy",))
    monkeypatch.setattr(core, "_implementations", [i for i in core._implementations if i.backend == "xla"])
    monkeypatch.setattr(core, "_backends", dict(core._backends))
    monkeypatch.setattr(core, "_import_errors", dict(core._import_errors))
    monkeypatch.delitem(sys.modules, "toy_backend", raising=False)
    return importlib.import_module("toy_backend")  # registers itself on import, as a backend does


rng = np.random.default_rng(12)
B, T, H, G, D, BS = 1, 64, 2, 2, 16, 16
q = rng.standard_normal((B, T, H * G, D)).astype(np.float32)
k, v = (rng.standard_normal((B, T, H, D)).astype(np.float32) for _ in range(2))
gate = rng.uniform(size=(B, T, H * G)).astype(np.float32)
indices = rng.integers(-1, T // BS, (B, T, H, 3)).astype(np.int32)
# The caller's selection and a window: selected attention and the sliding window, the toy's pieces.
CALL = dict(query=q, key=k, value=v, g_slc=gate, g_swa=gate, block_indices=indices, block_counts=2,
            block_size=BS, window_size=24)


def test_the_toy_backend_is_known_and_available(toy):
    assert nsa.backend_status()["toy"] is None
    assert {impl.piece for impl in core.implementations(backend="toy")} == {Piece.SELECTED_ATTENTION,
                                                                            Piece.SLIDING_WINDOW}


def test_explain_says_the_toy_is_chosen_by_priority(toy):
    plan = nsa.explain(**CALL)
    for piece in (Piece.SELECTED_ATTENTION, Piece.SLIDING_WINDOW):
        assert plan.chosen[piece].backend == "toy"
        assert plan.why[piece] == f"priority {toy.PRIORITY}"
        assert ("xla", "lower priority") in plan.rejected[piece]


def test_forcing_the_toy_runs_it_and_matches_the_oracle(toy):
    out = nsa.native_sparse_attention(**CALL, backend="toy")
    expected = testing.oracle.nsa_forward(**CALL)["o"]
    assert testing.rel_l2(out, expected) < testing.TOLERANCES["float32"][0]


def test_a_forced_toy_declines_loudly(toy):
    # Packed sequences: the toy's `supports` declines, with its reason; nothing falls back to XLA.
    with pytest.raises(nsa.BackendError, match="packed sequences"):
        nsa.native_sparse_attention(**CALL, cu_seqlens=np.array([0, 40, 64], np.int32), backend="toy")
    # A compressed branch needs pieces the toy does not have.
    compressed_call = {k: v for k, v in CALL.items() if k != "block_indices"}
    with pytest.raises(nsa.BackendError, match="toy"):
        nsa.native_sparse_attention(**compressed_call, g_cmp=gate, backend="toy")
    # Forcing only the toy's pieces leaves the others to the automatic choice.
    plan = nsa.explain(**compressed_call, g_cmp=gate, backend={"selected_attention": "toy", "sliding_window": "toy"})
    assert plan.chosen[Piece.SELECTED_ATTENTION].backend == "toy"
    assert plan.chosen[Piece.COMPRESSION].backend == "xla"


def test_check_backends_passes_the_toy_where_it_has_the_pieces(toy):
    given = next(p for p in testing.PROBLEMS if p.name == "given-indices")
    gqa = next(p for p in testing.PROBLEMS if p.name == "gqa")
    outcomes = testing.check_backends(["toy"], ["float32", "bfloat16"], [given, gqa])
    by_case = {(o.problem, o.dtype): o for o in outcomes}
    for dtype in ("float32", "bfloat16"):
        assert by_case["given-indices", dtype].passed, by_case["given-indices", dtype]
        assert by_case["gqa", dtype].status == "declined"  # no compression piece
    assert "dquery" in by_case["given-indices", "float32"].errors  # gradients were compared too
