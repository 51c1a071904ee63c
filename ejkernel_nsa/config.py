"""How a user forces a backend, and the interpret-mode switch of the Pallas backends.

A forced backend is read at trace time, by precedence: the `backend=` argument of a call, then the
innermost `use_backend(...)` block, then the environment variable `EJKERNEL_NSA_BACKEND`.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Iterator

BACKEND_ENV = "EJKERNEL_NSA_BACKEND"
INTERPRET_ENV = "EJKERNEL_NSA_INTERPRET"

_forced_backend: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "ejkernel_nsa_backend", default=None
)
_interpret_override: contextvars.ContextVar[bool | None] = contextvars.ContextVar(
    "ejkernel_nsa_interpret", default=None
)


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Force every NSA call traced inside this block onto backend `name` (None lifts the force)."""
    if name is not None and not isinstance(name, str):
        raise TypeError(f"use_backend: expected a backend name (str) or None, got {name!r}")
    token = _forced_backend.set(name)
    try:
        yield
    finally:
        _forced_backend.reset(token)


def forced_backend(argument: str | None = None) -> tuple[str | None, str]:
    """The backend the user forces, if any, and which mechanism forced it."""
    if argument is not None:
        if not isinstance(argument, str):
            raise TypeError(f"backend: expected a backend name (str) or None, got {argument!r}")
        return argument, "the backend= argument"
    name = _forced_backend.get()
    if name is not None:
        return name, "ejkernel_nsa.use_backend(...)"
    name = os.environ.get(BACKEND_ENV, "").strip()
    if name:
        return name, f"the environment variable {BACKEND_ENV}"
    return None, "automatic choice"


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
