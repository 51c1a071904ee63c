"""Where our time goes: every GPU kernel one call of ours launches, through JAX's profiler.

`nsa_bench.py` times pieces alone; inside a whole call (and inside a piece's backward, which
the harness times only as fwd+bwd) the kernels it launches share the time. This traces
`--calls` calls after warm-up with `jax.profiler`, reads the device planes back
(`jax.profiler.ProfileData`) and prints each kernel's GPU time per call, in launch order:
Triton kernels by name, XLA's own by their HLO op. `peer_kernels.py` does the same for
flash_nsa.

  python benchmarks/kernel_times.py --shapes paper,g1 --seq-len 65536 --modes fwd_bwd --json $OUT/kernels.json
"""

from __future__ import annotations

import argparse
import collections
import glob
import sys
import tempfile

import jax

import bench_impls  # noqa: E402 (benchmarks/ is the script's folder)
from kernel_report import print_kernels, record  # noqa: E402


def _event_name(event) -> str:
    stats = dict(event.stats)
    # XLA's fusions are named after their HLO op; a custom call (Triton) after its kernel.
    op = stats.get("hlo_op")
    return event.name if not op or op == event.name else f"{event.name} [{op}]"


def device_events(trace_dir: str) -> list[tuple[int, str, float]]:
    """(start ns, name, ms) of every kernel on the GPU planes of a trace."""
    from jax.profiler import ProfileData

    events = []
    for path in glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True):
        for plane in ProfileData.from_file(path).planes:
            if not plane.name.startswith("/device:GPU"):
                continue
            for line in plane.lines:
                # Kernels sit on the stream lines; other lines summarise them again.
                if not line.name.startswith("Stream"):
                    continue
                events.extend((e.start_ns, _event_name(e), e.duration_ns / 1e6) for e in line.events)
    return sorted(events)


def kernel_table(run, calls: int) -> list[dict]:
    trace_dir = tempfile.mkdtemp(prefix="kernel_times_")
    jax.block_until_ready(run(0))
    jax.profiler.start_trace(trace_dir)
    for i in range(calls):
        jax.block_until_ready(run(i))
    jax.profiler.stop_trace()
    events = device_events(trace_dir)
    if not events:
        raise RuntimeError("the trace holds no GPU kernel (is this a GPU?)")
    return per_call(events, calls)


def per_call(events: list[tuple[int, str, float]], calls: int) -> list[dict]:
    """Kernel time per call, by kernel name, in order of first launch."""
    total = collections.defaultdict(float)
    count = collections.Counter()
    first = {}
    for start, name, ms in events:
        total[name] += ms
        count[name] += 1
        first.setdefault(name, start)
    return [dict(kernel=name, ms=total[name] / calls, launches=count[name] / calls)
            for name in sorted(total, key=first.get)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="paper", help="comma-separated names of bench_impls.SHAPES")
    parser.add_argument("--seq-len", type=int, default=65536)
    parser.add_argument("--modes", default="fwd,fwd_bwd")
    parser.add_argument("--window", type=int, default=None, help="override the shape's window (0: none)")
    parser.add_argument("--calls", type=int, default=5)
    parser.add_argument("--json", help="write the records here")
    args = parser.parse_args(argv)
    ours = bench_impls.Ours(window=args.window != 0)
    records = []
    for name in args.shapes.split(","):
        shape = bench_impls.SHAPES[name]
        for mode in args.modes.split(","):
            case = bench_impls.Case(ours, shape, args.seq_len, mode)
            rows = kernel_table(ours.build(case, seed=0), args.calls)
            total = print_kernels(f"ours {shape.describe()} T={args.seq_len} W={case.W} {mode}, "
                                  f"{jax.devices()[0].device_kind}", rows)
            record(records, args.json, shape=name, T=args.seq_len, W=case.W, mode=mode, kernels=rows,
                   total_ms=total)
    return 0


if __name__ == "__main__":
    sys.exit(main())
