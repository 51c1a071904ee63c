"""The printed tables (what did not run and why; each piece per backend; each implementation
against T with valid TFLOP/s; our ratio to each peer, live and the issue's reference measurement;
the issue's targets) and the PNG plot, all from the JSON records."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import bench_flops as flops
import bench_reference as reference

PEER_ORDER = ("flash_nsa", "fla", "ejkernel", "cudnn_dense")
OURS = "ejkernel_nsa"


def column_order(record: dict) -> tuple:
    name = record["implementation"]
    if name in PEER_ORDER:
        return (2, PEER_ORDER.index(name), 0)
    return (0 if name == OURS else 1, name, -record["W"])


def column_label(record: dict, shape_window: int) -> str:
    name = record["implementation"]
    return name + (f" W={record['W']}" if name.startswith(OURS) and record["W"] != shape_window else "")


def print_report(records: list[dict], device_kind: str) -> None:
    whole = [r for r in records if not r.get("piece")]
    print_not_measured(records)
    print_pieces([r for r in records if r.get("piece")])
    shapes = list(dict.fromkeys(r["shape"] for r in whole))
    for shape in shapes:
        for mode in ("fwd", "fwd_bwd"):
            rows = [r for r in whole if r["shape"] == shape and r["mode"] == mode]
            if rows:
                print_times(rows, device_kind)
                print_ratios(rows, device_kind)
    print_targets(records, device_kind)


def print_not_measured(records: list[dict]) -> None:
    reasons: dict[tuple, list[str]] = defaultdict(list)
    for r in records:
        if r["status"] != "ok":
            what = r["implementation"] + (f" {r['piece']}" if r.get("piece") else "")
            error = r["error"] if r["error"].startswith(r["status"]) else f"{r['status']}: {r['error']}"
            reasons[(what, error)].append(f"{r['shape']}/{r['T']}/{r['mode']}")
    if not reasons:
        return
    print("\n== not measured (why; cases shape/T/mode)")
    for (what, error), cases in reasons.items():
        shown = ", ".join(cases[:6]) + (f" (+{len(cases) - 6})" if len(cases) > 6 else "")
        print(f"  {what}: {error} [{shown}]")


def print_pieces(records: list[dict]) -> None:
    if not records:
        return
    print("\n== our pieces alone, median ms per backend (valid TFLOP/s); inputs made by the automatic choice")
    groups: dict[tuple, dict[str, dict]] = defaultdict(dict)
    backends = sorted({piece_backend(r) for r in records}, key=lambda b: (b != "auto", b))
    for r in records:
        groups[(r["shape"], r["T"], r["mode"], r["piece"])][piece_backend(r)] = r
    print(f"  {'shape':<6} {'T':>6} {'mode':<7} {'piece':<21} " + " ".join(f"{b:>20}" for b in backends))
    for (shape, T, mode, piece), by_backend in sorted(groups.items(), key=lambda item: (item[0][0], item[0][1],
                                                                                        item[0][2], item[0][3])):
        cells = [cell(by_backend.get(b)) for b in backends]
        print(f"  {shape:<6} {T:>6} {mode:<7} {piece:<21} " + " ".join(f"{c:>20}" for c in cells))


def piece_backend(record: dict) -> str:
    """The forced backend a piece was timed on, or "auto" for the automatic choice."""
    _, _, backend = record["implementation"].partition(":")
    return backend or "auto"


def cell(record: dict | None, with_rate: bool = True) -> str:
    if record is None:
        return "-"
    if record["status"] != "ok":
        return {"not installed": "not installed", "unsupported": "unsupported", "skipped": "skipped",
                "unavailable": "unavailable"}.get(record["status"], "FAILED")
    if record.get("note", "").startswith("same plan"):
        return "= ejkernel_nsa"
    rate = f" ({record['tflops']:.3g})" if with_rate and record.get("tflops") else ""
    return f"{record['median_ms']:.3f}{rate}"


def print_times(rows: list[dict], device_kind: str) -> None:
    first = rows[0]
    shape_window = max(r["W"] for r in rows if r["implementation"] == OURS) if any(
        r["implementation"] == OURS for r in rows) else 0
    columns: dict[str, dict] = {}
    for r in sorted(rows, key=column_order):
        columns.setdefault(column_label(r, shape_window), r)
    print(f"\n== {first['shape']} (B={first['B']} HQ={first['HQ']} H={first['H']} G={first['G']} D={first['D']} "
          f"S={first['S']} BS={first['BS']}{_geometry(first)} {first['dtype']}), {first['mode']}: median ms (valid TFLOP/s), "
          f"{device_kind}")
    width = max(16, *(len(label) for label in columns)) + 1
    print(f"  {'T':>7} " + "".join(f"{label:>{width}}" for label in columns))
    by_cell = {(column_label(r, shape_window), r["T"]): r for r in rows}
    for T in sorted({r["T"] for r in rows}):
        print(f"  {T:>7} " + "".join(f"{cell(by_cell.get((label, T))):>{width}}" for label in columns))
    print("  computes: " + "; ".join(f"{label}: {r['computes']}" for label, r in columns.items()))


def ours_main(rows: list[dict]) -> dict[int, dict]:
    """Our automatic choice with the shape's own window (the widest ours ran), per T."""
    ours = [r for r in rows if r["implementation"] == OURS]
    if not ours:
        return {}
    window = max(r["W"] for r in ours)
    return {r["T"]: r for r in ours if r["W"] == window}


def speedup(other_ms: float | None, ours_ms: float | None) -> str:
    if not other_ms or not ours_ms:
        return "-"
    return f"{other_ms / ours_ms:.2f}x"


def print_ratios(rows: list[dict], device_kind: str) -> None:
    main = ours_main(rows)
    if not main:
        return
    ours_by_window = {(r["T"], r["W"]): r for r in rows if r["implementation"] == OURS and r["status"] == "ok"}
    peers = {(r["implementation"], r["T"]): r for r in rows if r["implementation"] in PEER_ORDER}
    first = rows[0]
    peak = flops.peak_flops(device_kind, first["dtype"])
    print("  ejkernel_nsa (automatic choice) is N x faster than (>1: ours faster); vs an NSA peer, ours without "
          "the window where that was timed (=), else ours with it (+swa: ours does more work)")
    header = (f"  {'T':>7} {'ours ms':>9} {'GFLOP':>8} {'floor ms':>9} {'of peak':>8} "
              + "".join(f"{'vs ' + p:>16}" for p in PEER_ORDER)
              + "   | " + "".join(f"{'ref ' + p:>17}" for p in PEER_ORDER))
    print(header)
    for T in sorted(main):
        ours = main[T]
        ok = ours["status"] == "ok"
        floor = f"{ours['flops'] / peak * 1e3:.2f}" if peak else "-"
        fraction = f"{ours['peak_fraction']:.1%}" if ok and ours.get("peak_fraction") else "-"
        cells = []
        for peer in PEER_ORDER:
            other = peers.get((peer, T))
            if other is None or other["status"] != "ok" or not ok:
                cells.append("-" if other is None else cell(other, with_rate=False) if other["status"] != "ok" else "-")
                continue
            if peer == "cudnn_dense":
                cells.append(speedup(other["median_ms"], ours["median_ms"]))
                continue
            like = ours_by_window.get((T, other["W"]))
            if like is not None:
                cells.append(speedup(other["median_ms"], like["median_ms"]) + " =")
            else:
                cells.append(speedup(other["median_ms"], ours["median_ms"]) + " +swa")
        refs = []
        for peer in PEER_ORDER:
            ref = reference.reference_ms(peer, first["shape"], T, first["mode"])
            failed = reference.reference_failed(peer, first["shape"], T, first["mode"])
            refs.append("failed there" if failed else speedup(ref, ours["median_ms"]) if ok and ref else "-")
        ours_ms = f"{ours['median_ms']:.3f}" if ok else cell(ours)
        print(f"  {T:>7} {ours_ms:>9} {ours['flops'] / 1e9:>8.4g} {floor:>9} {fraction:>8} "
              + "".join(f"{c:>16}" for c in cells) + "   | " + "".join(f"{c:>17}" for c in refs))
    if peak:
        print(f"  floor: valid FLOPs at the datasheet {peak / 1e12:.0f} TFLOP/s; "
              f"ref: {reference.LABEL}")
    else:
        print(f"  ref: {reference.LABEL}")


def print_targets(records: list[dict], device_kind: str) -> None:
    """The speed issue's targets (issue 10), judged on what this run measured: live peers only."""
    whole = [r for r in records if not r.get("piece")]
    shapes = list(dict.fromkeys(r["shape"] for r in whole if r["shape"] != "tiny")) or \
        list(dict.fromkeys(r["shape"] for r in whole))
    if not shapes:
        return
    print(f"\n== targets ({device_kind}; ours = automatic choice; '=' like for like, ours W=0)")

    def ok_by_T(rows: list[dict], **match) -> dict[int, dict]:
        return {r["T"]: r for r in rows if r["status"] == "ok" and all(r[k] == v for k, v in match.items())}

    def verdict(failures: list) -> str:
        return "met" if not failures else f"NOT met at {failures}"

    for shape in shapes:
        rows = [r for r in whole if r["shape"] == shape]
        G = rows[0]["G"]
        for mode in ("fwd", "fwd_bwd"):
            in_mode = [r for r in rows if r["mode"] == mode]
            ours = ours_main(in_mode)
            ours = {T: r for T, r in ours.items() if r["status"] == "ok"}
            bare = ok_by_T(in_mode, implementation=OURS, W=0)
            dense = ok_by_T(in_mode, implementation="cudnn_dense")
            flash = ok_by_T(in_mode, implementation="flash_nsa")
            fla = ok_by_T(in_mode, implementation="fla")
            label = f"  {shape} (G={G}) {mode}:"
            compared = sorted(T for T in ours if T in dense and T >= 16384)
            if compared:
                behind = [T for T in compared if dense[T]["median_ms"] <= ours[T]["median_ms"]]
                print(f"{label} faster than cuDNN dense from T=16k (T in {compared}): {verdict(behind)}")
            if mode == "fwd_bwd" and 65536 in ours and 65536 in dense:
                ratio = dense[65536]["median_ms"] / ours[65536]["median_ms"]
                print(f"{label} >= 4x faster than cuDNN dense at 64k: {ratio:.2f}x: "
                      f"{'met' if ratio >= 4 else 'NOT met'}")
            compared = sorted(T for T in bare if T in flash)
            if compared:
                behind = [T for T in compared if flash[T]["median_ms"] <= bare[T]["median_ms"]]
                print(f"{label} faster than flash_nsa '=' (T in {compared}): {verdict(behind)}")
            if 65536 in bare and 65536 in flash and G in (1, 4, 16):
                ratio = flash[65536]["median_ms"] / bare[65536]["median_ms"]
                print(f"{label} >= 1.5x faster than flash_nsa '=' at 64k: {ratio:.2f}x: "
                      f"{'met' if ratio >= 1.5 else 'NOT met'}")
            if G == 16 and 65536 in bare and 65536 in fla:
                ratio = fla[65536]["median_ms"] / bare[65536]["median_ms"]
                print(f"{label} >= 3x faster than fla '=' at 64k: {ratio:.2f}x: {'met' if ratio >= 3 else 'NOT met'}")
            if G in (1, 4, 16) and 65536 in ours:
                limit = 12.0 if mode == "fwd" else 40.0
                ms = ours[65536]["median_ms"]
                print(f"{label} <= {limit:g} ms at 64k: {ms:.2f} ms: {'met' if ms <= limit else 'NOT met'}")
    selected = {(r["G"], r["T"]): r for r in records if r.get("piece") == "selected_attention"
                and r["implementation"] == OURS and r["mode"] == "fwd" and r["status"] == "ok" and r.get("tflops")}
    for T in sorted({T for _, T in selected}):
        if (1, T) in selected and (16, T) in selected:
            ratio = selected[(16, T)]["tflops"] / selected[(1, T)]["tflops"]
            print(f"  selected attention fwd at T={T}: G=1 {selected[(1, T)]['tflops']:.3g} TFLOP/s, G=16 "
                  f"{selected[(16, T)]['tflops']:.3g}: G=16/G=1 = {ratio:.2f} (target <= 1.5): "
                  f"{'met' if ratio <= 1.5 else 'NOT met'}")
    memory = [r for r in whole if r["mode"] == "fwd_bwd" and r["implementation"] == OURS and r["status"] == "ok"
              and r.get("peak_bytes") and r["T"] > 65536]
    for r in memory:
        print(f"  peak device memory, ours fwd+bwd {r['shape']} W={r['W']} T={r['T']}: {r['peak_bytes'] / 2**30:.2f} GiB")


def shape_label(record: dict, window: int) -> str:
    """A panel's problem in the paper's terms, not the harness's internal shape name."""
    return (f"{record['shape']}: B={record['B']} HQ={record['HQ']} H={record['H']} (G={record['G']}) "
            f"D={record['D']} S={record['S']} BS={record['BS']} W={window} {record['dtype']}")


def plot(records: list[dict], path: Path) -> str | None:
    """Time against T, log-log, one line per implementation, a panel per shape set and mode; the
    issue's reference measurement dotted. Returns None, or why no plot was written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install -e '.[bench]')"
    # A forced backend that ran the automatic choice's plan was measured once: one line is enough.
    whole = [r for r in records if not r.get("piece") and r["status"] == "ok" and not r.get("note")]
    shapes = sorted({r["shape"] for r in whole}, key=lambda name: (name != reference.SHAPE, name))
    modes = [m for m in ("fwd", "fwd_bwd") if any(r["mode"] == m for r in whole)]
    if not whole:
        return "no successful measurement to plot"
    figure, axes = plt.subplots(len(shapes), len(modes), figsize=(6.5 * len(modes), 4.5 * len(shapes)),
                                squeeze=False)
    # One colour per implementation in every panel; the reference measurement of a peer is
    # drawn dotted in that peer's colour.
    colours = {peer: f"C{i}" for i, peer in enumerate(PEER_ORDER)}
    for row, shape in enumerate(shapes):
        for col, mode in enumerate(modes):
            axis = axes[row][col]
            rows = [r for r in whole if r["shape"] == shape and r["mode"] == mode]
            shape_window = max((r["W"] for r in rows if r["implementation"] == OURS), default=0)
            lines: dict[str, list[tuple[int, float]]] = defaultdict(list)
            for r in sorted(rows, key=column_order):
                lines[column_label(r, shape_window)].append((r["T"], r["median_ms"]))
            for label, points in lines.items():
                points.sort()
                colour = colours.setdefault(label, f"C{len(colours) % 10}")
                axis.plot(*zip(*points), marker="o", label=label, color=colour)
            if shape == reference.SHAPE:
                for peer in PEER_ORDER:
                    points = sorted((T, ms) for (name, T, m), ms in reference.MEDIAN_MS.items()
                                    if name == peer and m == mode and isinstance(ms, float))
                    if points:
                        axis.plot(*zip(*points), linestyle=":", marker="x", color=colours[peer],
                                  label=f"{peer} (issue's reference)")
            axis.set_xscale("log", base=2)
            axis.set_yscale("log")
            axis.set_xlabel("T (tokens)")
            axis.set_ylabel("median ms")
            axis.set_title(f"{shape_label(rows[0] if rows else whole[0], shape_window)}, {mode}", fontsize=9)
            axis.grid(True, which="both", alpha=0.3)
            axis.legend(fontsize=7)
    kind = whole[0]["device_kind"]
    figure.suptitle(f"NSA, {kind} ({whole[0].get('platform', '?')}, jax {whole[0].get('jax_version', '?')}); "
                    "median ms")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return None


def _geometry(record: dict) -> str:
    """SPEC section 9's compression block and stride, for shapes that set them."""
    return f" l={record['L']} d={record['stride']}" if record.get("L") else ""
