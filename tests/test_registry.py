"""Resolution and forcing: the three mechanisms, their precedence, priorities, declines with
reasons, interpret-mode backends, and no silent fallback."""

import jax
import numpy as np
import pytest
from fake_backend import install_fake_triton

import ejkernel_nsa as nsa
from ejkernel_nsa import registry
from ejkernel_nsa.config import BACKEND_ENV
from ejkernel_nsa.problem import Piece
from ejkernel_nsa.registry import core

rng = np.random.default_rng(3)
q, k, v = (rng.standard_normal(s).astype(np.float32) for s in ((1, 48, 4, 16), (1, 48, 2, 16), (1, 48, 2, 16)))
g = rng.uniform(size=(1, 48, 4)).astype(np.float32)
CALL = dict(query=q, key=k, value=v, g_cmp=g, block_counts=2, block_size=16)


@pytest.fixture(autouse=True)
def no_env_force(monkeypatch):
    monkeypatch.delenv(BACKEND_ENV, raising=False)


def test_automatic_choice_on_cpu_is_xla():
    if jax.default_backend() != "cpu":
        pytest.skip(f"kernel backends compete on {jax.default_backend()}; this checks a CPU-only machine")
    plan = nsa.explain(**CALL)
    assert plan.forced is None
    assert {impl.backend for impl in plan.chosen.values()} == {"xla"}
    assert set(plan.chosen) == {Piece.COMPRESSION, Piece.COMPRESSED_ATTENTION, Piece.SELECTION, Piece.SELECTED_ATTENTION}


def test_each_mechanism_forces(monkeypatch):
    assert nsa.explain(**CALL, backend="xla").forced_by == "the backend= argument"
    with nsa.use_backend("xla"):
        assert nsa.explain(**CALL).forced_by == "ejkernel_nsa.use_backend(...)"
    monkeypatch.setenv(BACKEND_ENV, "xla")
    plan = nsa.explain(**CALL)
    assert plan.forced == "xla" and BACKEND_ENV in plan.forced_by


def forced_by_of(**call):
    """Which backend a call is forced onto, and by what; read off the plan, or off the error when
    that backend cannot run here."""
    try:
        plan = nsa.explain(**call)
    except nsa.BackendError as error:
        return error.forced, error.forced_by
    return plan.forced, plan.forced_by


def test_precedence_argument_then_context_then_environment(monkeypatch):
    monkeypatch.setenv(BACKEND_ENV, "triton")
    with nsa.use_backend("pallas_triton"):
        assert forced_by_of(**CALL) == ("pallas_triton", "ejkernel_nsa.use_backend(...)")
        assert forced_by_of(**CALL, backend="xla") == ("xla", "the backend= argument")
        with nsa.use_backend(None):
            assert forced_by_of(**CALL) == ("triton", f"the environment variable {BACKEND_ENV}")
    assert forced_by_of(**CALL) == ("triton", f"the environment variable {BACKEND_ENV}")


@pytest.mark.parametrize("mechanism", ["argument", "context", "environment"])
def test_forcing_a_backend_that_cannot_run_raises_with_its_reason(mechanism, monkeypatch):
    status = nsa.backend_status()
    unavailable = [name for name in registry.KNOWN_BACKENDS if status[name] is not None]
    if not unavailable:
        pytest.skip("every backend is available here")
    name = unavailable[0]
    with pytest.raises(nsa.BackendError, match=name) as error:
        if mechanism == "argument":
            nsa.native_sparse_attention(**CALL, backend=name)
        elif mechanism == "context":
            with nsa.use_backend(name):
                nsa.native_sparse_attention(**CALL)
        else:
            monkeypatch.setenv(BACKEND_ENV, name)
            nsa.native_sparse_attention(**CALL)
    assert status[name] in str(error.value)


def test_forcing_applies_to_the_pieces_too():
    with nsa.use_backend("no-such-backend"), pytest.raises(nsa.BackendError, match="known backends"):
        nsa.mean_pool(k, v, 16)


@pytest.fixture
def fake_kernel(monkeypatch):
    """A high-priority 'triton' compressed-attention kernel that declines Dk > 16, on a table that
    pretends triton is available here; the real table is restored afterwards."""
    return install_fake_triton(
        monkeypatch, supports=lambda problem: None if problem.head_dim <= 16 else f"head_dim {problem.head_dim} > 16"
    )


def test_higher_priority_is_chosen_per_piece(fake_kernel):
    plan = nsa.explain(**CALL)
    assert plan.chosen[Piece.COMPRESSED_ATTENTION].backend == "triton"
    assert plan.chosen[Piece.SELECTED_ATTENTION].backend == "xla"
    assert ("xla", "lower priority") in plan.rejected[Piece.COMPRESSED_ATTENTION]
    nsa.native_sparse_attention(**CALL)
    assert fake_kernel, "the chosen implementation must be the one that runs"


def test_a_declined_case_falls_to_the_next_and_says_why(fake_kernel):
    wide = dict(CALL, query=np.tile(q, 2), key=np.tile(k, 2))
    plan = nsa.explain(**wide)
    assert plan.chosen[Piece.COMPRESSED_ATTENTION].backend == "xla"
    assert ("triton", "head_dim 32 > 16") in plan.rejected[Piece.COMPRESSED_ATTENTION]
    assert "head_dim 32 > 16" in str(plan)


def test_forced_backend_never_falls_back(fake_kernel):
    k_cmp, v_cmp = nsa.mean_pool(np.tile(k, 2), v, 16)
    with pytest.raises(nsa.BackendError, match="head_dim 32 > 16"):
        nsa.compressed_attention(np.tile(q, 2), k_cmp, v_cmp, 16, backend="triton")
    # Forcing triton also needs its other pieces, which this fake does not have.
    with pytest.raises(nsa.BackendError, match="has no implementation of compression"):
        nsa.native_sparse_attention(**CALL, backend="triton")


def test_interpret_mode_backends_are_never_picked_automatically(fake_kernel, monkeypatch):
    core.register_backend(core.Backend("triton", "fake", lambda: None, interpret=lambda: True))
    plan = nsa.explain(**CALL)
    assert plan.chosen[Piece.COMPRESSED_ATTENTION].backend == "xla"
    assert ("triton", "interpret mode is used only when forced") in plan.rejected[Piece.COMPRESSED_ATTENTION]
