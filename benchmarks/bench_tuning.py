"""From the per-piece timings to the tuning table that `resolve()` reads (registry/tuning.py).

For each device kind, shape class (dtype, G bucket, T bucket) and piece, the backends are ranked by
their median time summed over the sequence lengths measured in that class, forward+backward where
it was timed (training is where the time goes), else forward (the selection has no backward). A
backend that failed or was not timed at one of those lengths is left out of the order, so it ranks
after the measured ones.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from ejkernel_nsa.registry import tuning


def table_file(argument: str) -> Path:
    return tuning.DEFAULT_TABLE if argument == "registry" else Path(argument)


def piece_orders(records: list[dict]) -> dict[tuple, dict]:
    """{(device_kind, shape class, piece): {"median_ms": {backend: summed ms}, "mode", "seq_lens"}}."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in records:
        if r.get("piece") and r["status"] == "ok" and r["implementation"].startswith("ejkernel_nsa:"):
            shape_class = tuning.shape_class_of(r["dtype"], r["G"], r["T"])
            groups[(r["device_kind"], shape_class, r["piece"])].append(r)
    orders = {}
    for key, group in groups.items():
        mode = "fwd_bwd" if any(r["mode"] == "fwd_bwd" for r in group) else "fwd"
        group = [r for r in group if r["mode"] == mode]
        seq_lens = sorted({r["T"] for r in group})
        by_backend: dict[str, dict[int, float]] = defaultdict(dict)
        for r in group:
            by_backend[r["implementation"].split(":", 1)[1]][r["T"]] = r["median_ms"]
        summed = {b: sum(times.values()) for b, times in by_backend.items() if sorted(times) == seq_lens}
        if summed:
            orders[key] = {"median_ms": summed, "mode": mode, "seq_lens": seq_lens}
    return orders


def with_measurements(table: dict, *, device_kind: str, shape_class: tuning.ShapeClass, piece: str,
                      median_ms: dict[str, float], mode: str, seq_lens: list[int], source: str) -> dict:
    """A copy of `table` whose entry for (`device_kind`, `shape_class`) ranks `piece`'s backends by
    `median_ms` (the time each took, summed over the `seq_lens` measured, in `mode`); other pieces
    and entries are kept. Backends missing from `median_ms` (failed, or not measured) are left out
    of the order and so rank after the measured ones."""
    table = json.loads(json.dumps(table))
    key = {"device_kind": device_kind, "dtype": shape_class.dtype, "group": shape_class.group,
           "seq_len": shape_class.seq_len}
    entry = next((e for e in table["entries"] if all(e.get(k) == v for k, v in key.items())), None)
    if entry is None:
        entry = dict(key, pieces={})
        table["entries"].append(entry)
    entry["pieces"][str(piece)] = {
        "order": sorted(median_ms, key=median_ms.get),
        "median_ms": {name: round(ms, 4) for name, ms in sorted(median_ms.items(), key=lambda item: item[1])},
        "mode": mode,
        "seq_lens": sorted(seq_lens),
        "source": source,
    }
    table["entries"].sort(key=lambda e: (e["device_kind"], e["dtype"], e["group"], e["seq_len"]))
    return table


def update_table(path: Path, records: list[dict], source: str) -> list[str]:
    """Write the orders measured in `records` into the table at `path`; return one line per order."""
    table = tuning.load_table(path) if path.exists() else tuning.empty_table()
    lines = []
    for (device_kind, shape_class, piece), measured in sorted(piece_orders(records).items(), key=str):
        table = with_measurements(table, device_kind=device_kind, shape_class=shape_class, piece=piece,
                                  source=source, **measured)
        order = sorted(measured["median_ms"], key=measured["median_ms"].get)
        lines.append(f"{device_kind} | {shape_class} | {piece}: " +
                     " < ".join(f"{b} {measured['median_ms'][b]:.3g} ms" for b in order))
    path.write_text(json.dumps(table, indent=1) + "\n")
    return lines
