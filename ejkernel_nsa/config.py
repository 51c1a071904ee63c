"""How a user forces a backend, and the interpret-mode switch of the Pallas backends.

A forced backend is read at trace time, by precedence: the `backend=` argument of a call, then the
innermost `use_backend(...)` block, then the environment variable `EJKERNEL_NSA_BACKEND`.

The argument and the block take a backend name (every piece of the call on it) or a mapping from
pieces to names, e.g. `{"sliding_window": "xla", "selected_attention": "pallas_mosaic"}`: each
named piece is forced onto its backend (a forced piece that cannot run raises `BackendError`, as
a whole-call force does), pieces the mapping leaves out are chosen automatically, and pieces the
call does not need are ignored.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Iterator, Mapping

from ejkernel_nsa.problem import Piece

BACKEND_ENV = "EJKERNEL_NSA_BACKEND"
INTERPRET_ENV = "EJKERNEL_NSA_INTERPRET"

# What a caller forces: one backend name, or `{piece: name}` (pieces as `Piece` or their names).
Backend = str | Mapping[str, str]
# The same after `_forced`: a name, or `{Piece: name}`.
BackendChoice = str | Mapping[Piece, str]

_forced_backend: contextvars.ContextVar[BackendChoice | None] = contextvars.ContextVar(
    "ejkernel_nsa_backend", default=None
)
_interpret_override: contextvars.ContextVar[bool | None] = contextvars.ContextVar(
    "ejkernel_nsa_interpret", default=None
)


@contextlib.contextmanager
def use_backend(name: Backend | None) -> Iterator[None]:
    """Force every NSA call traced inside this block onto backend `name`, or each piece a mapping
    names onto its backend (None lifts the force)."""
    token = _forced_backend.set(None if name is None else _forced(name, "use_backend"))
    try:
        yield
    finally:
        _forced_backend.reset(token)


def forced_backend(argument: Backend | None = None) -> tuple[BackendChoice | None, str]:
    """The backend the user forces (a name, or `{Piece: name}` for a per-piece force), if any, and
    which mechanism forced it."""
    if argument is not None:
        return _forced(argument, "backend"), "the backend= argument"
    name = _forced_backend.get()
    if name is not None:
        return name, "ejkernel_nsa.use_backend(...)"
    name = os.environ.get(BACKEND_ENV, "").strip()
    if name:
        return name, f"the environment variable {BACKEND_ENV}"
    return None, "automatic choice"


def _forced(value: object, argument: str) -> BackendChoice:
    """A backend name as given, or a per-piece mapping with its keys made `Piece`s; else raise
    naming `argument`. An empty mapping is refused: it would read as a force that forces nothing."""
    if isinstance(value, str):
        return value
    if not isinstance(value, Mapping):
        raise TypeError(f"{argument}: expected a backend name (str), a mapping {{piece: backend name}} or None, "
                        f"got {value!r}")
    if not value:
        raise ValueError(f"{argument}: the mapping {{piece: backend name}} is empty; pass None to force nothing")
    pieces = {}
    for piece, name in value.items():
        if piece not in set(Piece):
            raise ValueError(f"{argument}: unknown piece {piece!r}; pieces: {', '.join(p.value for p in Piece)}")
        if not isinstance(name, str):
            raise TypeError(f"{argument}: expected a backend name (str) for piece {piece!r}, got {name!r}")
        pieces[Piece(piece)] = name
    return pieces


@contextlib.contextmanager
def interpret_mode(enabled: bool = True) -> Iterator[None]:
    """Make the Pallas backends available on CPU through their interpreters, inside this block."""
    token = _interpret_override.set(bool(enabled))
    try:
        yield
    finally:
        _interpret_override.reset(token)


def interpret_enabled() -> bool:
    """Interpret mode now: the innermost `interpret_mode(...)` block, else the environment. The one
    place that decides it; backends read it per call, never store it, so leaving a block undoes it."""
    override = _interpret_override.get()
    if override is not None:
        return override
    return interpret_requested_by_environment()


def interpret_requested_by_environment() -> bool:
    """`EJKERNEL_NSA_INTERPRET` alone. For what must be decided once per process: Triton's kernels
    are compiled or interpreted from the moment they are defined (`backends/triton`)."""
    return os.environ.get(INTERPRET_ENV, "").strip().lower() in ("1", "true", "yes", "on")
