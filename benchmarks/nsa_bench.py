"""NSA side by side with its peers, on one GPU, in one process (also `ejkernel-nsa bench`).

Runs ours (the automatic choice, and each available backend forced), flash-linear-attention's
`parallel_nsa` and ejkernel's Triton `native_sparse_attention` when installed (else "not
installed"), and dense causal cuDNN attention; forward and forward+backward; then each of our
pieces alone per backend. Every case: fresh random inputs, a short warm-up, the median of timed
runs synchronised with the device. Every failure is recorded (status and error) and the run goes
on; a time budget skips what would not fit; a watchdog ends a case that hangs (exit code 3; rerun
with --resume to carry on). Records go to a JSON list after every case; a table is printed last
and a PNG plot (time against T) is written beside the JSON.

    python benchmarks/nsa_bench.py                                       # the default plan (GPU)
    python benchmarks/nsa_bench.py --shapes paper --seq-lens 4096,16384 --impls auto,fla --modes fwd
    python benchmarks/nsa_bench.py --shapes tiny --seq-lens 256 --impls auto,xla,fla    # CPU check
    python benchmarks/nsa_bench.py --pieces-at 16384,65536 --write-tuning               # tune
    # the paper's compression (l=32, d=16, l'=64; SPEC section 9) beside today's disjoint pooling, W=0
    # rows included (flash_nsa is compared with those), and its pieces at 64k:
    python benchmarks/nsa_bench.py --shapes paper_overlap,paper --seq-lens 16384,65536 --impls auto,flash_nsa
    python benchmarks/nsa_bench.py --shapes tiny_overlap --seq-lens 256 --impls auto,xla        # CPU check
"""

from __future__ import annotations

import os

# Before JAX is imported: JAX would otherwise take 75% of the GPU's memory at start, and the
# PyTorch peer in this same process would not fit beside it.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

import bench_flops as flops  # noqa: E402
import bench_impls as impls  # noqa: E402
import bench_report as report  # noqa: E402
import bench_timing as timing  # noqa: E402
import bench_tuning  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"
# Exit code when the process must end for the run to go on: a case hung (the watchdog), or an
# error left the GPU context unusable. `--resume` in a fresh process carries on.
RESTART_EXIT = 3
# Errors after which CUDA refuses every later launch in this process.
FATAL_CONTEXT_ERRORS = ("illegal memory access", "ILLEGAL_ADDRESS", "unspecified launch failure",
                        "LAUNCH_FAILED", "misaligned address", "device-side assert")


def parse_args(argv=None) -> argparse.Namespace:
    ints = lambda text: [int(x) for x in text.split(",") if x]  # noqa: E731
    names = lambda text: [x.strip() for x in text.split(",") if x.strip()]  # noqa: E731
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", type=names, default=["g1", "g2", "g4", "g8", "paper"],
                        help=f"shape sets, of {sorted(impls.SHAPES)} (default g1,g2,g4,g8,paper)")
    parser.add_argument("--seq-lens", type=ints, default=[8192, 16384, 65536], help="T for every shape set")
    parser.add_argument("--long-seq-lens", type=ints, default=[131072],
                        help="T for the --long-shapes, run after everything else (default 131072)")
    parser.add_argument("--long-shapes", type=names, default=["paper"])
    parser.add_argument("--modes", type=names, default=["fwd", "fwd_bwd"])
    parser.add_argument("--impls", type=names, default=["auto", "fla", "flash_nsa", "cudnn"],
                        help="auto (our automatic choice), backends (each of ours that is available, forced), "
                             "a backend name (xla, triton, ...), fla, flash_nsa, ejkernel, cudnn")
    parser.add_argument("--like-peers", action=argparse.BooleanOptionalAction, default=True,
                        help="also time our automatic choice without the window (cmp+slc, what the NSA peers "
                             "compute) beside the rest (default on)")
    parser.add_argument("--pieces-at", type=ints, default=[65536],
                        help="T at which each of our pieces is timed alone: the automatic choice for every shape "
                             "set (where the time goes); with --write-tuning, also each backend forced")
    parser.add_argument("--max-seq-len", action="append", default=[], metavar="IMPL=T",
                        help="skip IMPL above T, e.g. ejkernel_nsa:xla=16384 (repeatable)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--repeats-long", type=int, default=5, help="timed runs from T=65536 up")
    parser.add_argument("--max-timed-s", type=float, default=4.0, help="fewer timed runs (>= 3) past this")
    parser.add_argument("--budget-s", type=float, default=420.0,
                        help="wall-clock budget of the whole run; a case predicted not to fit is skipped")
    parser.add_argument("--max-case-s", type=float, default=90.0, help="skip a case predicted to take longer")
    parser.add_argument("--case-timeout-s", type=float, default=240.0,
                        help="watchdog: a case running longer ends the process (exit 3; --resume carries on)")
    parser.add_argument("--json", type=Path, default=None,
                        help="records file (default benchmarks/results/<device>_<date>.json)")
    parser.add_argument("--resume", action="store_true", help="keep the records in --json and skip their cases")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--report-only", action="store_true",
                        help="time nothing: print the tables (and plot, and --write-tuning) from the records in --json")
    parser.add_argument("--write-tuning", nargs="?", const="registry", default=None, metavar="PATH",
                        help="rank our backends per piece from the piece timings and update the tuning table "
                             "(default registry/tuning.json)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    unknown = set(args.shapes) - set(impls.SHAPES)
    if unknown:
        parser.error(f"unknown shape sets {sorted(unknown)}; known: {sorted(impls.SHAPES)}")
    if set(args.modes) - {"fwd", "fwd_bwd"}:
        parser.error("--modes takes fwd and fwd_bwd")
    try:
        args.max_seq_len = {name: int(t) for name, t in (item.split("=") for item in args.max_seq_len)}
    except ValueError:
        parser.error("--max-seq-len takes IMPL=T")
    return args


# ---- what to run ---------------------------------------------------------------------------


def our_backends() -> tuple[list[str], dict[str, str]]:
    """Our backends that can run here and have pieces; the others with the reason."""
    from ejkernel_nsa import registry

    usable, skipped = [], {}
    for name, reason in registry.backend_status().items():
        if reason is not None:
            skipped[name] = reason
        elif not registry.implementations(backend=name):
            skipped[name] = "registers no piece yet"
        elif registry.is_interpreted(name):
            skipped[name] = "runs interpreted here (far too slow to time)"
        else:
            usable.append(name)
    return usable, skipped


def implementations(names: list[str]) -> tuple[list[impls.Implementation], list[str], dict[str, str]]:
    """The implementations asked for (whole NSA), the backends whose pieces to time, and notes."""
    usable, skipped = our_backends()
    chosen: list[impls.Implementation] = []
    backends: list[str] = []
    for name in names:
        if name == "auto":
            chosen.append(impls.Ours())
        elif name == "backends":
            backends += [b for b in usable if b not in backends]
        elif name in impls.PEERS:
            chosen.append(impls.PEERS[name]())
        else:
            backends.append(name)  # a named backend: forced even if unusable, so its reason is recorded
    chosen += [impls.Ours(backend) for backend in backends]
    return chosen, backends, skipped


def plan_cases(args, whole: list[impls.Implementation], backends: list[str]) -> list[impls.Case]:
    """Cases in the order they run: what matters most first, so that a budget cut drops the rest.
    1. every shape set at --seq-lens, fwd then fwd+bwd: every implementation, and ours without the
       window (what the NSA peers compute);  2. each piece alone, automatic choice, at --pieces-at;
    3. the --long-seq-lens of the --long-shapes;  4. each piece per backend (with --write-tuning);
    5. the modes an implementation is reported to fail in (`risky_modes`)."""
    sections: list[tuple[int, int, impls.Case]] = []

    def add(section: int, case: impls.Case) -> None:
        sections.append((section, len(sections), case))

    ours_too = args.like_peers and any(i.name == "ejkernel_nsa" for i in whole)
    for shape_name in args.shapes:
        shape = impls.SHAPES[shape_name]
        long = args.long_seq_lens if shape_name in args.long_shapes else []
        for T in [*args.seq_lens, *long]:
            section = 3 if T in long and T not in args.seq_lens else 1
            for mode in args.modes:
                for impl in whole:
                    add(5 if mode in impl.risky_modes else section, impls.Case(impl, shape, T, mode))
                if ours_too:
                    add(section, impls.Case(impls.Ours(window=False), shape, T, mode))
    for shape_name in args.shapes:
        for T in args.pieces_at:
            for mode in args.modes:
                for piece in impls.PIECES:
                    if mode not in impls.PIECE_MODES[piece]:
                        continue
                    add(2, impls.Case(impls.Ours(), impls.SHAPES[shape_name], T, mode, piece))
                    if args.write_tuning:
                        for backend in backends:
                            add(4, impls.Case(impls.Ours(backend), impls.SHAPES[shape_name], T, mode, piece))
    return [case for _, _, case in sorted(sections, key=lambda item: (item[0], item[1]))]


# ---- running -------------------------------------------------------------------------------


class Recorder:
    """The records, written to the JSON file after every change (atomically: a kill never leaves a
    torn file)."""

    def __init__(self, path: Path, records: list[dict]):
        self.path, self.records = path, records
        self.lock = threading.Lock()
        self.done = {tuple(r["key"]) for r in records if "key" in r}

    def add(self, record: dict) -> None:
        with self.lock:
            self.records.append(record)
            self.done.add(tuple(record["key"]))
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(self.records, indent=1))
            os.replace(tmp, self.path)


class Progress:
    def __init__(self, total: int):
        self.start, self.total, self.index = time.perf_counter(), total, 0

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def line(self, text: str) -> None:
        print(f"[{self.elapsed:7.1f}s] ({self.index}/{self.total}) {text}", file=sys.stderr, flush=True)


def run_all(args, cases: list[impls.Case], recorder: Recorder, context: dict) -> None:
    progress = Progress(len(cases))
    missing_cache: dict[str, str | None] = {}
    last_framework = None
    for case in cases:
        progress.index += 1
        record = base_record(case, context)
        if tuple(record["key"]) in recorder.done:
            progress.line(f"{case.label()}: already recorded (--resume)")
            continue
        impl = case.impl
        if impl.name not in missing_cache:
            missing_cache[impl.name] = impl.missing()
        reason = missing_cache[impl.name] or impl.declines(case)
        limit = args.max_seq_len.get(impl.name)
        if reason is None and limit is not None and case.T > limit:
            reason = f"skipped: T > {limit} (--max-seq-len)"
        if reason is None:
            reason = budget_reason(args, case, recorder.records, progress.elapsed)
        if reason is not None:
            record["status"] = status_of(reason)
            record["error"] = reason
            recorder.add(record)
            progress.line(f"{case.label()}: {reason}")
            continue
        progress.line(f"{case.label()} ...")
        if impl.framework != last_framework and last_framework is not None:
            timing.release_memory(last_framework)
        last_framework = impl.framework
        measure(args, case, record, recorder, progress)
        recorder.add(record)
        if record.get("context_lost"):
            progress.line(f"{case.label()}: {record['error']}; the GPU context is unusable now: "
                          f"ending the process (exit {RESTART_EXIT}); rerun with --resume to carry on")
            os._exit(RESTART_EXIT)
        timing.release_memory(impl.framework)
        if record.get("note"):
            progress.line(f"{case.label()}: {record['note']}")
        elif record["status"] == "ok":
            extra = f", {record['tflops']:.3g} TFLOP/s" if record.get("tflops") else ""
            progress.line(f"{case.label()}: {record['median_ms']:.3f} ms{extra} "
                          f"(first call {record['first_call_s']:.1f} s, {record['repeats']} runs)")
        else:
            progress.line(f"{case.label()}: {record['status']}: {record['error']}")


def status_of(reason: str) -> str:
    for status in ("not installed", "unavailable", "skipped"):
        if reason.startswith(status):
            return status
    return "unsupported"


def measure(args, case: impls.Case, record: dict, recorder: Recorder, progress: Progress) -> None:
    """Time one case into `record`; any exception becomes the record's error."""
    watchdog = threading.Timer(args.case_timeout_s, on_hang, (args, case, dict(record), recorder, progress))
    watchdog.daemon = True
    watchdog.start()
    try:
        try:
            record["plan"] = case.impl.plan(case)
        except impls.Unsupported as reason:
            record.update(status="unsupported", error=str(reason))
            return
        same = same_plan_as_automatic(case, record, recorder.records)
        if same is not None:
            for field in ("median_ms", "min_ms", "max_ms", "times_ms", "repeats", "first_call_s", "peak_bytes",
                          "tflops", "peak_fraction"):
                record[field] = same.get(field)
            record.update(status="ok", note="same plan as the automatic choice: measured once, as ejkernel_nsa")
            return
        run = case.impl.build(case, args.seed + 7919 * progress.index)
        repeats = args.repeats_long if case.T >= 65536 else args.repeats
        timer = timing.time_torch if case.impl.framework == "torch" else timing.time_jax
        result = timer(run, warmup=args.warmup, repeats=repeats, max_timed_s=args.max_timed_s)
        del run
        median = result.median_ms
        record.update(
            status="ok", median_ms=median, min_ms=min(result.times_ms), max_ms=max(result.times_ms),
            times_ms=[round(t, 4) for t in result.times_ms], repeats=len(result.times_ms),
            first_call_s=round(result.first_call_s, 3), peak_bytes=result.peak_bytes,
            tflops=record["flops"] / median / 1e9 if median > 0 else None,
        )
        if result.host_times_ms is not None:
            record["host_median_ms"] = sorted(result.host_times_ms)[len(result.host_times_ms) // 2]
        peak = flops.peak_flops(record["device_kind"], record["dtype"])
        record["peak_fraction"] = record["tflops"] * 1e12 / peak if peak and record["tflops"] else None
    except Exception as error:  # noqa: BLE001  (every failure is a result: record it and go on)
        record.update(status="error", error=f"{type(error).__name__}: {first_lines(str(error))}")
        if any(text in f"{error!r} {error}" for text in FATAL_CONTEXT_ERRORS):
            record["context_lost"] = True
        traceback.print_exc(file=sys.stderr)
    finally:
        watchdog.cancel()


def first_lines(text: str, limit: int = 600) -> str:
    text = " ".join(line.strip() for line in text.strip().splitlines()[:6])
    return text[:limit] + ("..." if len(text) > limit else "")


def on_hang(args, case: impls.Case, record: dict, recorder: Recorder, progress: Progress) -> None:
    record.update(status="error", error=f"timed out: still running after {args.case_timeout_s:.0f} s "
                                        "(--case-timeout-s); the process ended here")
    recorder.add(record)
    progress.line(f"{case.label()}: {record['error']}; rerun with --resume to carry on")
    os._exit(RESTART_EXIT)


def same_plan_as_automatic(case: impls.Case, record: dict, records: list[dict]) -> dict | None:
    """The automatic choice's record of this case when a forced backend would run exactly its plan."""
    if case.piece or not case.implementation.startswith("ejkernel_nsa:"):
        return None
    for other in records:
        if (other["implementation"] == "ejkernel_nsa" and other["status"] == "ok" and other.get("plan") == record["plan"]
                and tuple(other["key"][1:]) == tuple(record["key"][1:])):
            return other
    return None


def budget_reason(args, case: impls.Case, records: list[dict], elapsed: float) -> str | None:
    """Skip a case whose predicted cost (first call + runs) does not fit the budget or the case cap.
    The prediction scales the same implementation's time at the largest smaller T (T^2 for dense
    attention, T^1.5 for NSA, whose compressed branch grows faster than linearly)."""
    left = args.budget_s - elapsed
    if left <= 0:
        return f"skipped: the budget of {args.budget_s:.0f} s is spent (--budget-s)"
    same = [r for r in records if r["status"] == "ok" and r["implementation"] == case.implementation
            and r["shape"] == case.shape.name and r["mode"] == case.mode and r["piece"] == case.piece]
    smaller = [r for r in same if r["T"] < case.T]
    if not smaller:
        return None
    base = max(smaller, key=lambda r: r["T"])
    exponent = 2.0 if case.implementation == "cudnn_dense" else 1.5
    run_s = base["median_ms"] / 1e3 * (case.T / base["T"]) ** exponent
    repeats = timing.repeats_within(run_s * 1e3, args.repeats_long if case.T >= 65536 else args.repeats,
                                    args.max_timed_s)
    predicted = (base.get("first_call_s") or 0.0) + run_s * (args.warmup + repeats)
    if predicted > args.max_case_s:
        return f"skipped: predicted {predicted:.0f} s > {args.max_case_s:.0f} s (--max-case-s)"
    if predicted > left:
        return f"skipped: predicted {predicted:.0f} s, {max(left, 0):.0f} s of the budget left (--budget-s)"
    return None


def base_record(case: impls.Case, context: dict) -> dict:
    impl, shape = case.impl, case.shape
    forward = impl.forward_flops(case)
    return {
        "implementation": case.implementation, "framework": impl.framework,
        "computes": case.piece or impl.computes(shape), "piece": case.piece, **shape.fields(), "W": case.W,
        "T": case.T, "mode": case.mode, "status": None, "error": None, "median_ms": None,
        "flops": flops.mode_flops(forward, case.mode), "key": list(case.key), **context,
        "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def device_context() -> dict:
    import jax

    device = jax.devices()[0]
    context = {"device_kind": device.device_kind, "platform": device.platform, "jax_version": jax.__version__}
    return context


def default_json_path(device_kind: str) -> Path:
    slug = re.sub(r"[^a-z0-9]+", "-", device_kind.lower()).strip("-") or "device"
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H%MZ")
    return RESULTS_DIR / f"{slug}_{stamp}.json"


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.report_only:
        if args.json is None or not args.json.exists():
            print("--report-only needs --json naming an existing records file", file=sys.stderr)
            return 2
        records = json.loads(args.json.read_text())
        return finish(args, args.json, records, records[0]["device_kind"] if records else "unknown device")
    context = device_context()  # JAX makes its GPU client here, before any peer is imported
    whole, backends, skipped = implementations(args.impls)
    path = args.json or default_json_path(context["device_kind"])
    records = json.loads(path.read_text()) if args.resume and path.exists() else []
    # Resuming retries what the budget skipped last time; everything else recorded stays done.
    records = [r for r in records if r["status"] != "skipped"]
    recorder = Recorder(path, records)
    cases = plan_cases(args, whole, backends)
    print(f"device: {context['device_kind']} ({context['platform']}), jax {context['jax_version']}; "
          f"{len(cases)} cases, budget {args.budget_s:.0f} s; records: {path}", file=sys.stderr)
    for name, reason in skipped.items():
        print(f"  our backend {name}: not timed ({reason})", file=sys.stderr)
    run_all(args, cases, recorder, context)
    return finish(args, path, recorder.records, context["device_kind"])


def finish(args, path: Path, records: list[dict], device_kind: str) -> int:
    """The tuning table (if asked), the plot, and the tables, printed last."""
    # A failure here must not cost the table: each step reports its own error and the rest go on.
    if args.write_tuning:
        target = bench_tuning.table_file(args.write_tuning)
        try:
            changes = bench_tuning.update_table(target, records, source=str(path.name))
            print(f"tuning: {len(changes)} piece orders written to {target}", file=sys.stderr)
            for line in changes:
                print(f"  {line}", file=sys.stderr)
        except Exception:  # noqa: BLE001
            traceback.print_exc(file=sys.stderr)
    if not args.no_plot:
        png = path.with_suffix(".png")
        try:
            reason = report.plot(records, png)
        except Exception as error:  # noqa: BLE001
            reason = f"{type(error).__name__}: {error}"
        print(f"plot: {png if reason is None else 'not written: ' + reason}", file=sys.stderr)
    report.print_report(records, device_kind)
    print(f"\nrecords: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
