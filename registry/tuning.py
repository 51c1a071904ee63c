"""Measured backend order per piece, by device kind and shape class (`registry/tuning.json`).

Priorities say which backend is *meant* to be best; measurements say which one *is*, on a given
device. `resolve()` asks `lookup(problem, piece)` for a recorded order and, when there is one,
ranks the implementations it accepted (available, supporting the call, not interpreted) by it.
The table only reorders backends that all compute the contract, so it changes no result beyond
rounding (a near-tie in the top-k may fall the other way, as SPEC section 8 allows). Nothing is
recorded by hand: `benchmarks/nsa_bench.py --write-tuning` measures each piece per backend and
rewrites the entries of the shape classes it measured (the writing lives with it, in
`benchmarks/bench_tuning.py`; this module only reads).

The table read is `registry/tuning.json` beside this file, or the file named by the environment
variable `EJKERNEL_NSA_TUNING` (`off` disables tuning: priorities alone decide).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from pathlib import Path

import jax

TUNING_ENV = "EJKERNEL_NSA_TUNING"
DEFAULT_TABLE = Path(__file__).with_name("tuning.json")
TABLE_FORMAT = 1

# Shape classes. The group size decides how a kernel fills the matrix units (16 query heads of a
# group make one MMA tile row block); the sequence length decides whether launch overheads or
# arithmetic dominate. Bounds are inclusive upper limits; None closes the last bucket.
GROUP_BUCKETS: tuple[tuple[int | None, str], ...] = ((1, "G=1"), (15, "G=2-15"), (None, "G>=16"))
SEQ_LEN_BUCKETS: tuple[tuple[int | None, str], ...] = (
    (4096, "T<=4k"), (16384, "T<=16k"), (65536, "T<=64k"), (None, "T>64k"),
)


@dataclasses.dataclass(frozen=True)
class ShapeClass:
    dtype: str
    group: str
    seq_len: str

    def __str__(self) -> str:
        return f"{self.dtype}, {self.group}, {self.seq_len}"


@dataclasses.dataclass(frozen=True)
class TunedOrder:
    """One piece's recorded order for this device kind and shape class, fastest first."""

    order: tuple[str, ...]
    device_kind: str
    shape_class: ShapeClass
    source: str
    median_ms: dict[str, float]

    def reason_chosen(self, backend: str) -> str:
        return f"fastest on {self.device_kind} per {self.source} ({self.shape_class}{self._times(backend, '; ')})"

    def reason_not_chosen(self, backend: str, chosen: str) -> str:
        if backend not in self.order:
            return f"not measured on {self.device_kind} per {self.source}: ranked after the measured backends"
        return f"slower than {chosen} on {self.device_kind} per {self.source}{self._times((backend, chosen), ' (')}"

    def _times(self, backends, prefix: str) -> str:
        backends = (backends,) if isinstance(backends, str) else backends
        times = [f"{name} {self.median_ms[name]:.3g} ms" for name in backends if name in self.median_ms]
        if not times:
            return ""
        return prefix + " vs ".join(times) + (")" if prefix == " (" else "")


def bucket(value: int, buckets: tuple[tuple[int | None, str], ...]) -> str:
    for bound, label in buckets:
        if bound is None or value <= bound:
            return label
    raise ValueError(f"no bucket for {value}")


def shape_class_of(dtype: str, group_size: int, seq_len: int) -> ShapeClass:
    return ShapeClass(str(dtype), bucket(group_size, GROUP_BUCKETS), bucket(seq_len, SEQ_LEN_BUCKETS))


def device_kind(platform: str) -> str | None:
    """`device_kind` of the first device of `platform` (e.g. "NVIDIA H100 80GB HBM3"), or None."""
    return _device_kind(platform)


@functools.lru_cache(maxsize=None)
def _device_kind(platform: str) -> str | None:
    try:
        return jax.devices(platform)[0].device_kind
    except RuntimeError:
        return None


def table_path() -> Path | None:
    """The table in use: `EJKERNEL_NSA_TUNING` if set (None when it says `off`), else the packaged one."""
    setting = os.environ.get(TUNING_ENV, "").strip()
    if setting.lower() == "off":
        return None
    return Path(setting) if setting else DEFAULT_TABLE


def load_table(path: Path) -> dict:
    """The table at `path` (an empty one when the file does not exist); re-read when it changes."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return empty_table()
    return _load_table(str(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=8)
def _load_table(path: str, mtime_ns: int, size: int) -> dict:
    with open(path) as file:
        table = json.load(file)
    if not isinstance(table, dict) or table.get("format") != TABLE_FORMAT or not isinstance(table.get("entries"), list):
        raise ValueError(f"{path}: not a tuning table of format {TABLE_FORMAT} ({TUNING_ENV} names the table in use)")
    return table


def empty_table() -> dict:
    return {"format": TABLE_FORMAT, "entries": []}


def lookup(problem, piece: str) -> TunedOrder | None:
    """The recorded order for `piece` of `problem` on the problem's device kind, or None."""
    path = table_path()
    if path is None:
        return None
    kind = device_kind(problem.platform)
    if kind is None:
        return None
    wanted = shape_class_of(problem.dtype, problem.group_size, problem.seq_len)
    for entry in load_table(path)["entries"]:
        if (entry["device_kind"], entry["dtype"], entry["group"], entry["seq_len"]) != (
            kind, wanted.dtype, wanted.group, wanted.seq_len
        ):
            continue
        measured = entry["pieces"].get(str(piece))
        if measured and measured.get("order"):
            source = "registry/tuning.json" if path == DEFAULT_TABLE else str(path)
            return TunedOrder(tuple(measured["order"]), kind, wanted, source, dict(measured.get("median_ms", {})))
    return None


def rank(candidates: list, order: tuple[str, ...]) -> list:
    """`candidates` (implementations, best first by priority) with the measured backends first, in
    measured order; unmeasured ones keep their priority order after them."""
    position = {name: i for i, name in enumerate(order)}
    return sorted(candidates, key=lambda impl: position.get(impl.backend, len(order)))
