"""A fake kernel backend for registry tests: pretends `triton` is available here with one piece."""

from ejkernel_nsa.problem import Piece
from ejkernel_nsa.registry import core


def install_fake_triton(monkeypatch, supports=lambda problem: None, piece=Piece.COMPRESSED_ATTENTION,
                        platforms=("cpu", "gpu", "tpu"), priority=10) -> list:
    """Register a 'triton' implementation of `piece` that delegates to the XLA one, on copies of
    the registry's tables (monkeypatch restores the real ones). Returns the list its calls go to.

    The copy keeps only the XLA implementations beside the fake, so the choice is between the two
    wherever the tests run (on a GPU the real kernel backends would otherwise compete)."""
    core.load_backends()
    monkeypatch.setattr(core, "_implementations", [i for i in core._implementations if i.backend == "xla"])
    monkeypatch.setattr(core, "_backends", dict(core._backends))
    monkeypatch.setattr(core, "_import_errors", {})
    core.register_backend(core.Backend("triton", "fake", lambda: None))
    calls = []

    def kernel(*args, **kwargs):
        calls.append(args)
        return core.implementations(piece, "xla")[0].fn(*args, **kwargs)

    core.register(piece, backend="triton", platforms=platforms, priority=priority, supports=supports)(kernel)
    return calls
