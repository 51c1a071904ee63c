"""The table of NSA implementations, and how one is chosen for a call.

Backends register per piece (`Piece`): a backend name, the platforms it runs on, a priority and a
`supports(problem) -> reason or None`. For a call, each needed piece gets the implementation of the
forced backend (which must support the problem, or the call raises with its reason), or else,
among the implementations that run on the inputs' platform and support the problem, the fastest
one measured on this device kind for this shape class (`tuning`, `registry/tuning.json`), or the
highest-priority one where nothing was measured.
A force is a backend name (every piece) or a mapping `{Piece: name}` (those pieces; the others are
chosen automatically). Nothing falls back silently: every rejection is kept with its reason, for errors and `explain`.
"""

from __future__ import annotations

import dataclasses
import importlib
import threading
from collections.abc import Callable, Mapping

from ejkernel_nsa.problem import NSAProblem, Piece
from ejkernel_nsa.registry import tuning

# The backends the registry knows, in the order that breaks ties between equal priorities. Each is a subpackage of
# `ejkernel_nsa.backends` that registers itself on import; one whose toolchain is missing is
# listed as unavailable with the import error as its reason.
KNOWN_BACKENDS = ("triton", "pallas_mosaic", "pallas_triton", "xla")

SupportsFn = Callable[[NSAProblem], "str | None"]


class BackendError(ValueError):
    """No implementation can run a call: the forced one declined, or every one did.

    `forced` / `forced_by` say which backend was forced and how (None for automatic choice);
    `reasons` lists (backend, why not) for the piece that could not be placed.
    """

    def __init__(self, message: str, forced: str | None = None, forced_by: str = "",
                 reasons: tuple[tuple[str, str], ...] = ()):
        super().__init__(message)
        self.forced, self.forced_by, self.reasons = forced, forced_by, reasons


@dataclasses.dataclass(frozen=True)
class Backend:
    name: str
    description: str
    # Returns None when the backend can run here, else why not (toolchain, platform, ...).
    availability: Callable[[], str | None]
    # Interpret-mode backends run only when forced: automatic resolution never picks them.
    interpret: Callable[[], bool] = lambda: False


@dataclasses.dataclass(frozen=True)
class Implementation:
    backend: str
    piece: Piece
    fn: Callable
    platforms: frozenset[str]
    priority: int
    supports: SupportsFn
    # Whether it computes SPEC section 9's geometry (compression block l and stride d other than
    # the selection block). Implementations opt in; the others decline such calls here, so that
    # none silently computes the disjoint mean-pool geometry instead.
    compression_geometry: bool = False
    # Whether it computes SPEC section 10 (queries shorter than the keys, per-row kv_lengths).
    longer_keys: bool = False

    def decline_reason(self, problem: NSAProblem) -> str | None:
        if problem.against_longer_keys and not self.longer_keys:
            return ("computes only queries as long as the keys without kv_lengths (SPEC section 10: "
                    f"TQ={problem.query_len or problem.seq_len}, TK={problem.seq_len}, "
                    f"kv_lengths {'given' if problem.kv_lengths else 'not given'})")
        if problem.platform not in self.platforms:
            return f"runs on {sorted(self.platforms)}, the inputs are on {problem.platform}"
        if self.piece in GEOMETRY_PIECES and not problem.default_geometry and not self.compression_geometry:
            return (f"supports only compression blocks equal to the selection block (l = d = l' = block_size), "
                    f"got l={problem.compress_block_size or problem.block_size}, "
                    f"d={problem.compress_stride or problem.compress_block_size or problem.block_size}, "
                    f"l'={problem.block_size} (SPEC section 9)")
        return self.supports(problem)


# The pieces whose result depends on SPEC section 9's compression geometry.
GEOMETRY_PIECES = frozenset({Piece.COMPRESSION, Piece.COMPRESSED_ATTENTION, Piece.SELECTION})


@dataclasses.dataclass(frozen=True)
class Plan:
    """The implementation chosen for each piece of one call, and why the others were not."""

    problem: NSAProblem
    # The force as given: a backend name, `{Piece: name}`, or None (see `forced_for`).
    forced: str | Mapping[Piece, str] | None
    forced_by: str
    chosen: dict[Piece, Implementation]
    rejected: dict[Piece, list[tuple[str, str]]]
    # Why each chosen implementation won: its priority, or the measurement that ranked it first.
    why: dict[Piece, str] = dataclasses.field(default_factory=dict)

    def __getitem__(self, piece: Piece) -> Callable:
        return self.chosen[piece].fn

    def __str__(self) -> str:
        lines = [f"NSA plan ({self.forced_by}" + (f": {_force_words(self.forced)})" if self.forced else ")")]
        for piece, impl in self.chosen.items():
            lines.append(f"  {piece.value:<21} -> {impl.backend} ({self.why.get(piece, f'priority {impl.priority}')})")
            for backend, reason in self.rejected.get(piece, []):
                lines.append(f"  {'':<21}    not {backend}: {reason}")
        return "\n".join(lines)


_lock = threading.Lock()
_backends: dict[str, Backend] = {}
_import_errors: dict[str, str] = {}
_implementations: list[Implementation] = []
_loaded = False


def register_backend(backend: Backend) -> None:
    with _lock:
        _backends[backend.name] = backend


def register(
    piece: Piece,
    *,
    backend: str,
    platforms: tuple[str, ...],
    priority: int,
    supports: SupportsFn = lambda problem: None,
    compression_geometry: bool = False,
    longer_keys: bool = False,
) -> Callable[[Callable], Callable]:
    """Decorator: add `fn` to the table as `backend`'s implementation of `piece`.

    `compression_geometry=True` declares that `fn` computes SPEC section 9's geometry: it is then
    called with `compress_block_size=` and `compress_stride=` whenever they differ from the
    defaults (never otherwise). With `longer_keys`, `fn` also takes `kv_lengths=` and computes
    SPEC section 10's calls."""

    def add(fn: Callable) -> Callable:
        with _lock:
            _implementations.append(
                Implementation(backend, Piece(piece), fn, frozenset(platforms), priority, supports,
                               compression_geometry, longer_keys)
            )
        return fn

    return add


def load_backends() -> None:
    """Import every known backend once; a failed import becomes that backend's reason."""
    global _loaded
    if _loaded:
        return
    for name in KNOWN_BACKENDS:
        try:
            importlib.import_module(f"ejkernel_nsa.backends.{name}")
        except ImportError as error:
            _import_errors[name] = f"cannot be imported: {type(error).__name__}: {error}"
    _loaded = True


def backend_status() -> dict[str, str | None]:
    """Every known backend mapped to None when it can run here, else the reason it cannot."""
    load_backends()
    status = {}
    for name in KNOWN_BACKENDS:
        if name in _import_errors:
            status[name] = _import_errors[name]
        elif name not in _backends:
            status[name] = "not registered"
        else:
            status[name] = _backends[name].availability()
    return status


def is_interpreted(name: str) -> bool:
    """Whether `name` runs through an interpreter here (slow; used only when forced)."""
    load_backends()
    return name in _backends and _backends[name].interpret()


def backend_description(name: str) -> str:
    load_backends()
    return _backends[name].description if name in _backends else ""


def implementations(piece: Piece | None = None, backend: str | None = None) -> list[Implementation]:
    load_backends()
    return [
        impl
        for impl in _implementations
        if (piece is None or impl.piece == piece) and (backend is None or impl.backend == backend)
    ]


def forced_for(forced: str | Mapping[Piece, str] | None, piece: Piece) -> str | None:
    """The backend `piece` is forced onto by `forced` (a name forces every piece), or None."""
    if isinstance(forced, Mapping):
        return forced.get(piece)
    return forced


def resolve(
    problem: NSAProblem, forced: str | Mapping[Piece, str] | None = None, forced_by: str = "",
    pieces: tuple[Piece, ...] | None = None,
) -> Plan:
    """Choose one implementation per piece (by default, those the problem needs); raise
    `BackendError` with every reason if a piece has none (or the backend it is forced onto cannot
    run it). `forced` is one backend for every piece or `{Piece: name}` for some of them."""
    status = backend_status()
    for name in (forced.values() if isinstance(forced, Mapping) else [forced]):
        if name is not None and name not in status:
            raise BackendError(
                f"backend: unknown backend {name!r} (set by {forced_by}); "
                f"known backends: {', '.join(KNOWN_BACKENDS)}",
                name, forced_by,
            )
    chosen: dict[Piece, Implementation] = {}
    rejected: dict[Piece, list[tuple[str, str]]] = {}
    why: dict[Piece, str] = {}
    for piece in problem.needed_pieces if pieces is None else pieces:
        piece_forced = forced_for(forced, piece)  # this piece's forced backend, or None
        candidates = sorted(implementations(piece), key=lambda i: (-i.priority, KNOWN_BACKENDS.index(i.backend)))
        accepted, reasons = [], []
        for impl in candidates:
            reason = _reason_to_skip(impl, problem, status, piece_forced)
            if reason is None:
                accepted.append(impl)
            else:
                reasons.append((impl.backend, reason))
        for name in KNOWN_BACKENDS:
            if (piece_forced is None or name == piece_forced) and not any(i.backend == name for i in candidates):
                reasons.append((name, status[name] or f"has no implementation of {piece.value}"))
        if not accepted:
            raise BackendError(
                _no_implementation_message(piece, problem, piece_forced, forced_by, reasons), piece_forced, forced_by,
                tuple(reasons),
            )
        tuned = tuning.lookup(problem, piece) if piece_forced is None and len(accepted) > 1 else None
        if tuned is None:
            chosen[piece] = accepted[0]
            why[piece] = f"priority {accepted[0].priority}"
            rejected[piece] = reasons + [(i.backend, "lower priority") for i in accepted[1:]]
        else:
            accepted = tuning.rank(accepted, tuned.order)
            chosen[piece] = accepted[0]
            why[piece] = tuned.reason_chosen(accepted[0].backend)
            rejected[piece] = reasons + [
                (i.backend, tuned.reason_not_chosen(i.backend, accepted[0].backend)) for i in accepted[1:]
            ]
    return Plan(problem, forced, forced_by, chosen, rejected, why)


def _reason_to_skip(
    impl: Implementation, problem: NSAProblem, status: dict[str, str | None], forced: str | None
) -> str | None:
    if forced is not None and impl.backend != forced:
        return f"not the forced backend ({forced})"
    if status.get(impl.backend) is not None:
        return status[impl.backend]
    if forced is None and _backends[impl.backend].interpret():
        return "interpret mode is used only when forced"
    return impl.decline_reason(problem)


def _no_implementation_message(piece, problem, forced, forced_by, reasons) -> str:
    who = f"the forced backend {forced!r} (set by {forced_by})" if forced else "no backend"
    details = "; ".join(f"{backend}: {reason}" for backend, reason in reasons if backend == forced or not forced)
    return (
        f"{who} cannot run the {piece.value} piece of this NSA call "
        f"(T={problem.seq_len}, HQ={problem.num_q_heads}, H={problem.num_kv_heads}, "
        f"Dk={problem.head_dim}, Dv={problem.value_dim}, dtype={problem.dtype}, "
        f"block_size={problem.block_size}{_geometry_words(problem)}, platform={problem.platform}): "
        f"{details or 'no implementation registered'}"
    )


def _force_words(forced: str | Mapping[Piece, str]) -> str:
    if isinstance(forced, Mapping):
        return ", ".join(f"{piece.value} on {name}" for piece, name in forced.items())
    return forced


def _geometry_words(problem: NSAProblem) -> str:
    words = ""
    if not problem.default_geometry:
        words += f", compress_block_size={problem.compress_block_size}, compress_stride={problem.compress_stride}"
    if problem.supplied_compression:
        words += ", supplied key_cmp/value_cmp"
    return words
