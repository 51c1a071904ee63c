"""Forcing per piece: `backend={piece: name}` (and `use_backend` with a mapping) forces the named
pieces, leaves the others to automatic choice, never falls back for a forced piece, and refuses
malformed mappings naming the argument."""

import jax
import numpy as np
import pytest
from fake_backend import install_fake_triton

import ejkernel_nsa as nsa
from ejkernel_nsa.config import BACKEND_ENV
from ejkernel_nsa.problem import Piece

rng = np.random.default_rng(11)
q, k, v = (rng.standard_normal(s).astype(np.float32) for s in ((1, 48, 4, 16), (1, 48, 2, 16), (1, 48, 2, 16)))
g_cmp, g_swa = (rng.uniform(size=(1, 48, 4)).astype(np.float32) for _ in range(2))
CALL = dict(query=q, key=k, value=v, g_cmp=g_cmp, g_swa=g_swa, window_size=8, block_counts=2, block_size=16)


@pytest.fixture(autouse=True)
def no_env_force(monkeypatch):
    monkeypatch.delenv(BACKEND_ENV, raising=False)


@pytest.fixture
def fake_kernel(monkeypatch):
    """A fake 'triton' with compressed attention only, preferred over XLA when not forced."""
    return install_fake_triton(monkeypatch)


def test_named_pieces_are_forced_and_the_rest_chosen_automatically(fake_kernel):
    plan = nsa.explain(**CALL, backend={"compressed_attention": "xla", Piece.SLIDING_WINDOW: "xla"})
    assert plan.chosen[Piece.COMPRESSED_ATTENTION].backend == "xla"
    assert ("triton", "not the forced backend (xla)") in plan.rejected[Piece.COMPRESSED_ATTENTION]
    assert plan.forced == {Piece.COMPRESSED_ATTENTION: "xla", Piece.SLIDING_WINDOW: "xla"}
    assert "compressed_attention on xla, sliding_window on xla" in str(plan)
    # Not named: the automatic choice, which prefers the fake here.
    assert nsa.explain(**CALL, backend={"sliding_window": "xla"}).chosen[Piece.COMPRESSED_ATTENTION].backend == "triton"


def test_the_forced_piece_runs_where_it_is_forced(fake_kernel):
    # The gates are traced, the rest static: one compile per force instead of eager dispatch.
    options = {key: value for key, value in CALL.items() if key not in ("g_cmp", "g_swa")}

    def call(backend):
        return jax.jit(lambda g_cmp, g_swa: nsa.native_sparse_attention(
            g_cmp=g_cmp, g_swa=g_swa, backend=backend, **options))(g_cmp, g_swa)

    out = call({"compressed_attention": "triton", "sliding_window": "xla"})
    assert fake_kernel, "the piece forced onto the fake must run on it"
    expected = call("xla")
    assert np.allclose(out, expected, rtol=1e-6, atol=1e-6), "the fake delegates to XLA: same values"


def test_a_forced_piece_never_falls_back(fake_kernel):
    # The fake has no window kernel: forcing that piece onto it raises, naming the piece.
    with pytest.raises(nsa.BackendError, match="'triton'.*sliding_window.*has no implementation of sliding_window") as e:
        nsa.explain(**CALL, backend={"compressed_attention": "xla", "sliding_window": "triton"})
    assert e.value.forced == "triton" and e.value.forced_by == "the backend= argument"
    # The piece functions take the mapping too, each reading its own piece.
    k_cmp, v_cmp = nsa.mean_pool(k, v, 16, backend={"compression": "xla"})
    with pytest.raises(nsa.BackendError, match="has no implementation of selection"):
        nsa.select_blocks(q, k_cmp, np.zeros((1, 48, 4), np.float32), 2, 16, backend={"selection": "triton"})


def test_pieces_the_call_does_not_need_are_ignored():
    no_window = {key: value for key, value in CALL.items() if key not in ("g_swa", "window_size")}
    plan = nsa.explain(**no_window, backend={"sliding_window": "pallas_mosaic"})
    assert Piece.SLIDING_WINDOW not in plan.chosen


def test_use_backend_takes_a_mapping_and_the_argument_wins(fake_kernel):
    with nsa.use_backend({"compressed_attention": "xla"}):
        plan = nsa.explain(**CALL)
        assert plan.forced_by == "ejkernel_nsa.use_backend(...)"
        assert plan.chosen[Piece.COMPRESSED_ATTENTION].backend == "xla"
        assert nsa.explain(**CALL, backend={"sliding_window": "xla"}).chosen[Piece.COMPRESSED_ATTENTION].backend == (
            "triton")


@pytest.mark.parametrize(("backend", "error", "words"), [
    ({}, ValueError, "backend: the mapping .* is empty"),
    ({"window": "xla"}, ValueError, "backend: unknown piece 'window'; pieces: compression, "),
    ({"sliding_window": 3}, TypeError, "backend: expected a backend name .* for piece 'sliding_window', got 3"),
    (5, TypeError, "backend: expected a backend name .*, a mapping .* or None, got 5"),
    ({"sliding_window": "cuda"}, nsa.BackendError, "backend: unknown backend 'cuda'"),
])
def test_malformed_forces_are_refused(backend, error, words):
    with pytest.raises(error, match=words):
        nsa.explain(**CALL, backend=backend)


def test_use_backend_refuses_a_malformed_mapping():
    with pytest.raises(ValueError, match="use_backend: unknown piece 'window'"):
        with nsa.use_backend({"window": "xla"}):
            pass
