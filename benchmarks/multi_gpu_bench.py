"""NSA on several GPUs of one host: batch/head sharding and context parallelism, against one GPU.

Cases (the paper setting: HQ=64, H=4, D=128, S=16, BS=64, W=512, bf16; `--tiny` for a CPU check):
- `dp`: data parallel, one batch row per device (`sharded(..., batch_axis=)`), against one row on
  one device: the step time should not move (weak scaling, no communication).
- `hp`: the kv heads (with their query-head groups) over min(devices, H) devices, one row of
  `--hp-seq-len` tokens, against the same call on one device.
- `cp`: context parallelism over every device (`context_parallel_nsa`, contiguous and zigzag) at
  `--cp-seq-lens`, against one device at the same length (as far as it fits in memory).
Each case is timed forward (`fwd`) and forward + backward (`fwd_bwd`), with the collectives of the
compiled program recorded beside the time: count, and bytes of their per-device results (an
all-gather's gathered array, a reduce-scatter's scattered part).

Output: `results/multi_gpu_<device kind>_<n>dev.json` and a `.png` beside it (step time per case;
the device count is in the names). Runs on one GPU (a degenerate mesh of one device), and on CPU
host devices with `--tiny` (8 of them unless XLA_FLAGS already sets a count).

  python benchmarks/multi_gpu_bench.py                      # every GPU of the host
  python benchmarks/multi_gpu_bench.py --tiny               # CPU, 8 host devices, tiny shapes
  python benchmarks/multi_gpu_bench.py --comm-table         # docs/distributed.md's byte table, no devices
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PAPER = dict(q_heads=64, kv_heads=4, dim=128, block_counts=16, block_size=64, window_size=512, dtype="bfloat16")
TINY = dict(q_heads=4, kv_heads=2, dim=16, block_counts=2, block_size=16, window_size=16, dtype="float32")
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "collective-permute", "all-to-all")
ITEMSIZE = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "pred": 1}


def parse_args(argv=None) -> argparse.Namespace:
    ints = lambda text: [int(x) for x in text.split(",") if x]  # noqa: E731
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="CPU host devices, tiny shapes")
    parser.add_argument("--cases", default="dp,hp,cp", help="comma-separated: dp, hp, cp")
    parser.add_argument("--modes", default="fwd,fwd_bwd")
    parser.add_argument("--dp-seq-len", type=int, default=None, help="tokens per row for dp (default 65536)")
    parser.add_argument("--hp-seq-len", type=int, default=None, help="tokens for hp (default 131072)")
    parser.add_argument("--cp-seq-lens", type=ints, default=None, help="default 131072,262144,524288,1048576")
    parser.add_argument("--single-max-seq-len", type=int, default=524288,
                        help="the one-device baselines stop past this length (memory)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--budget-s", type=float, default=540.0, help="stop starting cases after this")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--comm-table", action="store_true", help="print the communication table and exit")
    parser.add_argument("--devices", type=int, default=8, help="device count of --comm-table")
    return parser.parse_args(argv)


# ---- communication, computed from the shapes (docs/distributed.md) ---------------------------------


def cp_bytes_per_device(seq_len: int, parts: int, *, kv_heads=4, dim=128, block_size=64, itemsize=2,
                        batch=1) -> dict[str, float]:
    """Bytes each device receives per NSA call under context parallelism over `parts` devices.

    Forward: all-gathers of K and V (`itemsize`) and of the compressed K/V (float32). Backward:
    the reduce-scatters of their gradients, the same sizes (a fwd+bwd step holds both).
    """
    share = (parts - 1) / parts
    kv = 2 * batch * seq_len * kv_heads * dim * itemsize
    compressed = 2 * batch * (seq_len // block_size) * kv_heads * dim * 4
    forward = (kv + compressed) * share
    return {"kv_gather": kv * share, "compressed_gather": compressed * share, "forward": forward,
            "backward_reduce_scatter": forward, "fwd_bwd": 2 * forward}


def comm_table(parts: int) -> str:
    lines = ["| T | K/V all-gather | compressed K/V all-gather | forward total | fwd + bwd total |",
             "| --- | --- | --- | --- | --- |"]
    for seq_len in (131072, 262144, 524288, 1048576):
        b = cp_bytes_per_device(seq_len, parts)
        mib = lambda x: f"{x / 2**20:,.0f} MiB"  # noqa: E731
        lines.append(f"| {seq_len // 1024}k | {mib(b['kv_gather'])} | {mib(b['compressed_gather'])} | "
                     f"{mib(b['forward'])} | {mib(b['fwd_bwd'])} |")
    return "\n".join(lines)


def hlo_collectives(hlo: str) -> dict[str, dict[str, int]]:
    pattern = re.compile(r"= (\w+)\[([\d,]*)\]\{[^}]*\} (" + "|".join(COLLECTIVES) + r")(?:-start)?\(")
    found = {op: {"count": 0, "bytes": 0} for op in COLLECTIVES}
    for dtype, dims, op in pattern.findall(hlo):
        size = ITEMSIZE.get(dtype, 4)
        for d in dims.split(","):
            size *= int(d) if d else 1
        found[op]["count"] += 1
        found[op]["bytes"] += size
    return {op: v for op, v in found.items() if v["count"]}


# ---- the cases ------------------------------------------------------------------------------


def make_inputs(jax, jnp, batch, seq_len, shape, seed=0):
    dtype = jnp.dtype(shape["dtype"])
    keys = jax.random.split(jax.random.key(seed), 7)
    q = jax.random.normal(keys[0], (batch, seq_len, shape["q_heads"], shape["dim"]), dtype)
    k = jax.random.normal(keys[1], (batch, seq_len, shape["kv_heads"], shape["dim"]), dtype)
    v = jax.random.normal(keys[2], (batch, seq_len, shape["kv_heads"], shape["dim"]), dtype)
    gates = [jax.random.uniform(keys[i], (batch, seq_len, shape["q_heads"]), dtype) for i in (3, 4, 5)]
    cotangent = jax.random.normal(keys[6], q.shape, dtype)
    return (q, k, v, *gates), cotangent


def step(jax, fn, mode, cotangent):
    """The timed function of one mode: the output, or the gradients of <out, cotangent>."""
    if mode == "fwd":
        return jax.jit(fn)

    def loss(*args):
        return (fn(*args).astype("float32") * cotangent.astype("float32")).sum()

    return jax.jit(jax.grad(loss, argnums=tuple(range(6))))


def time_step(jax, jitted, args, warmup, repeats) -> dict:
    start = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    compile_s = time.perf_counter() - start
    collectives = hlo_collectives(compiled.as_text())
    for _ in range(max(warmup, 1)):
        jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    return {"median_ms": times[len(times) // 2], "times_ms": times, "compile_s": compile_s,
            "collectives": collectives}


def run_cases(args) -> list[dict]:
    import jax
    import jax.numpy as jnp
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    import ejkernel_nsa
    from ejkernel_nsa.context_parallel import context_parallel_nsa, to_zigzag
    from ejkernel_nsa.sharding import sharded

    shape = TINY if args.tiny else PAPER
    devices = jax.devices()
    n = len(devices)
    options = dict(block_counts=shape["block_counts"], block_size=shape["block_size"],
                   window_size=shape["window_size"])
    dp_len = args.dp_seq_len or (64 if args.tiny else 65536)
    hp_len = args.hp_seq_len or (64 if args.tiny else 131072)
    cp_lens = args.cp_seq_lens or ([256, 512] if args.tiny else [131072, 262144, 524288, 1048576])
    modes = args.modes.split(",")
    cases = args.cases.split(",")
    started = time.perf_counter()
    records = []

    def nsa_call(fn):
        return lambda q, k, v, gc, gs, gw: fn(q, k, v, g_cmp=gc, g_slc=gs, g_swa=gw, **options)

    def record(case, mode, seq_len, batch, parts, layout, fn, inputs, cotangent, placement=None):
        if time.perf_counter() - started > args.budget_s:
            records.append({"case": case, "mode": mode, "seq_len": seq_len, "status": "skipped: budget"})
            return
        entry = {"case": case, "mode": mode, "seq_len": seq_len, "batch": batch, "devices": parts,
                 "layout": layout}
        try:
            placed = inputs if placement is None else [jax.device_put(x, placement) for x in inputs]
            entry.update(time_step(jax, step(jax, fn, mode, cotangent), placed, args.warmup, args.repeats))
            entry["status"] = "ok"
        except Exception as error:  # noqa: BLE001 - an out-of-memory or unsupported case is a result
            entry["status"] = f"error: {type(error).__name__}: {str(error)[:300]}"
        print(json.dumps({k: v for k, v in entry.items() if k != "times_ms"}), flush=True)
        records.append(entry)

    single = nsa_call(ejkernel_nsa.native_sparse_attention)
    auto = (AxisType.Auto,)
    for mode in modes:
        if "dp" in cases:
            inputs, cot = make_inputs(jax, jnp, 1, dp_len, shape)
            record("dp", mode, dp_len, 1, 1, "one device", single, inputs, cot)
            mesh = jax.make_mesh((n,), ("data",), axis_types=auto)
            inputs, cot = make_inputs(jax, jnp, n, dp_len, shape)
            fn = nsa_call(sharded(ejkernel_nsa.native_sparse_attention, mesh, batch_axis="data"))
            record("dp", mode, dp_len, n, n, "batch sharded", fn, inputs, cot, NamedSharding(mesh, P("data")))
        if "hp" in cases:
            parts = min(n, shape["kv_heads"])
            inputs, cot = make_inputs(jax, jnp, 1, hp_len, shape)
            record("hp", mode, hp_len, 1, 1, "one device", single, inputs, cot)
            mesh = jax.make_mesh((parts,), ("model",), axis_types=auto, devices=devices[:parts])
            fn = nsa_call(sharded(ejkernel_nsa.native_sparse_attention, mesh, head_axis="model"))
            record("hp", mode, hp_len, 1, parts, "heads sharded", fn, inputs, cot,
                   NamedSharding(mesh, P(None, None, "model")))
        if "cp" in cases:
            mesh = jax.make_mesh((n,), ("seq",), axis_types=auto)
            for seq_len in cp_lens:
                inputs, cot = make_inputs(jax, jnp, 1, seq_len, shape)
                if seq_len <= args.single_max_seq_len:
                    record("cp", mode, seq_len, 1, 1, "one device", single, inputs, cot)
                for layout in ("contiguous", "zigzag"):
                    fn = nsa_call(lambda *a, layout=layout, **kw: context_parallel_nsa(
                        *a, mesh=mesh, seq_axis="seq", load_balance=layout, **kw))
                    laid = [to_zigzag(x, n) for x in inputs] if layout == "zigzag" else inputs
                    cot_laid = to_zigzag(cot, n) if layout == "zigzag" else cot
                    record("cp", mode, seq_len, 1, n, layout, fn, laid, cot_laid, NamedSharding(mesh, P(None, "seq")))
                del inputs, cot
    return records


def plot(records: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in records if r.get("status") == "ok"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, mode in zip(axes, ("fwd", "fwd_bwd"), strict=True):
        for (case, layout) in sorted({(r["case"], r["layout"]) for r in ok if r["mode"] == mode}):
            points = sorted((r["seq_len"], r["median_ms"]) for r in ok
                            if r["mode"] == mode and r["case"] == case and r["layout"] == layout)
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=f"{case}: {layout}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("tokens (T)")
        ax.set_ylabel("median step time (ms)")
        ax.set_title(f"{title}, {mode}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.comm_table:
        print(comm_table(args.devices))
        return 0
    if args.tiny and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        flags = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
        os.environ["XLA_FLAGS"] = flags.strip()
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    sys.path.insert(0, str(HERE.parent))
    import jax

    kind = jax.devices()[0].device_kind.replace(" ", "_")
    n = len(jax.devices())
    path = args.json or HERE / "results" / f"multi_gpu_{kind}_{n}dev{'_tiny' if args.tiny else ''}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    records = run_cases(args)
    context = {"device_kind": jax.devices()[0].device_kind, "devices": n, "jax": jax.__version__,
               "shape": TINY if args.tiny else PAPER}
    path.write_text(json.dumps({"context": context, "records": records}, indent=1))
    print(f"wrote {path}")
    if not args.no_plot:
        try:
            plot(records, path.with_suffix(".png"), f"{context['device_kind']} x{n}")
            print(f"wrote {path.with_suffix('.png')}")
        except ImportError as error:
            print(f"no plot ({error})")
    return 0 if any(r.get("status") == "ok" for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
