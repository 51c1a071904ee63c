"""Where a peer's time goes: mdy666's flash_nsa, kernel by kernel, through the PyTorch profiler.

`nsa_bench.py` times the peer's whole call; our pieces it times one by one. To know which of our
pieces is behind, this prints the GPU time of each kernel one flash_nsa call launches, in launch
order (median over `--calls` profiled calls, after warm-up calls that compile), for the same
shapes as the harness (`bench_impls.SHAPES`). GPU only; the peer is never a dependency.

  python benchmarks/peer_kernels.py --shapes paper,g1 --seq-len 65536 --json $OUT/peer_kernels.json
"""

from __future__ import annotations

import argparse
import statistics
import sys

import bench_impls  # noqa: E402 (benchmarks/ is the script's folder)
from kernel_report import print_kernels, record  # noqa: E402


def kernel_sequence(prof) -> list[tuple[str, float]]:
    """The profiled GPU kernels in launch order: (name, ms)."""
    kernels = [e for e in prof.events() if e.device_type.name == "CUDA" and e.device_time_total > 0]
    kernels.sort(key=lambda e: e.time_range.start)
    return [(e.name, e.device_time_total / 1e3) for e in kernels]


def profile(run, calls: int) -> list[dict]:
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    sequences = []
    for i in range(calls):
        torch.cuda.synchronize()
        with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
            run(i)
            torch.cuda.synchronize()
        sequences.append(kernel_sequence(prof))
    lengths = {len(s) for s in sequences}
    if len(lengths) != 1:
        raise RuntimeError(f"the calls launched different numbers of kernels: {sorted(lengths)}")
    rows = []
    for position in range(lengths.pop()):
        names = {s[position][0] for s in sequences}
        rows.append(dict(kernel=" | ".join(sorted(names)),
                         ms=statistics.median(s[position][1] for s in sequences)))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="paper", help="comma-separated names of bench_impls.SHAPES")
    parser.add_argument("--seq-len", type=int, default=65536)
    parser.add_argument("--modes", default="fwd,fwd_bwd")
    parser.add_argument("--calls", type=int, default=5)
    parser.add_argument("--json", help="write the records here")
    args = parser.parse_args(argv)
    peer = bench_impls.FlashNSA()
    reason = peer.missing()
    if reason:
        print(f"flash_nsa: {reason}", file=sys.stderr)
        return 2
    records = []
    for name in args.shapes.split(","):
        shape = bench_impls.SHAPES[name]
        for mode in args.modes.split(","):
            case = bench_impls.Case(peer, shape, args.seq_len, mode)
            declined = peer.declines(case)
            if declined:
                print(f"{case.label()}: {declined}")
                continue
            run = peer.build(case, seed=0)
            for i in range(3):  # compile and warm up
                run(i)
            rows = profile(run, args.calls)
            total = print_kernels(f"flash_nsa {shape.describe()} T={args.seq_len} {mode}", rows)
            record(records, args.json, shape=name, T=args.seq_len, mode=mode, kernels=rows, total_ms=total)
    return 0


if __name__ == "__main__":
    sys.exit(main())
