"""What `kernel_times.py` (ours) and `peer_kernels.py` (flash_nsa) print and record, in one form,
so that the two read side by side."""

from __future__ import annotations

import json

SMALL_MS = 0.05  # kernels below this are summed in one line


def print_kernels(title: str, rows: list[dict]) -> float:
    """Print a call's kernels (dicts with `kernel`, `ms`, optionally `launches`) under `title`;
    returns their total ms."""
    total = sum(r["ms"] for r in rows)
    print(f"\n== {title}: {len(rows)} kernels, {total:.2f} ms of kernel time per call")
    for r in rows:
        if r["ms"] >= SMALL_MS:
            launches = f"x{r['launches']:<4g} " if "launches" in r else ""
            print(f"  {r['ms']:8.3f}  {launches}{r['kernel'][:110]}")
    print(f"  (kernels under {SMALL_MS} ms: {sum(r['ms'] for r in rows if r['ms'] < SMALL_MS):.3f} ms in all)")
    return total


def record(records: list[dict], path: str | None, **fields) -> None:
    """Append a record and rewrite `path` (if any): a run cut short keeps what it measured."""
    records.append(fields)
    if path:
        with open(path, "w") as f:
            json.dump(records, f, indent=1)
