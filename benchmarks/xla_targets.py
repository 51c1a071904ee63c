"""The XLA backend's targets: peak memory and time in the paper's setting.

Targets (issue 2): at T = 65536, HQ = 64, H = 4, D = 128, S = 16, BS = 64, bf16, forward +
backward fits in an 80 GB GPU; at T = 8192 the forward runs on a 2-core CPU in under a minute.

    python benchmarks/xla_targets.py --seq-len 8192 --mode fwd            # CPU target
    python benchmarks/xla_targets.py --seq-len 65536 --mode fwd_bwd      # GPU memory target

Times one backend at one length (the side-by-side harness with the peers is `nsa_bench.py`,
`ejkernel-nsa bench`). Prints the FLOP count of the causally valid work, the median time of
several runs after a warm-up (each timed run synchronised), and on a GPU the peak device memory.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import ejkernel_nsa as nsa
from bench_flops import nsa_flops  # beside this file: `python benchmarks/xla_targets.py` puts it on the path


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-len", type=int, default=8192)
    parser.add_argument("--heads", type=int, default=64)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--block-counts", type=int, default=16)
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--mode", choices=("fwd", "fwd_bwd"), default="fwd")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--backend", default="xla")
    args = parser.parse_args(argv)

    T, HQ, H, D = args.seq_len, args.heads, args.kv_heads, args.head_dim
    rng = np.random.default_rng(0)
    dtype = jnp.dtype(args.dtype)
    q = jnp.asarray(rng.standard_normal((1, T, HQ, D)), dtype)
    k, v = (jnp.asarray(rng.standard_normal((1, T, H, D)), dtype) for _ in range(2))
    gates = [jnp.asarray(rng.uniform(size=(1, T, HQ)), dtype) for _ in range(3)]

    def forward(q, k, v, g_cmp, g_slc, g_swa):
        return nsa.native_sparse_attention(
            q, k, v, g_cmp, g_slc, block_counts=args.block_counts, block_size=args.block_size,
            g_swa=g_swa, window_size=args.window, backend=args.backend,
        )

    if args.mode == "fwd":
        step = jax.jit(forward)
    else:
        d_out = jnp.asarray(rng.standard_normal((1, T, HQ, D)), dtype)
        step = jax.jit(jax.grad(lambda *xs: jnp.vdot(forward(*xs).astype(jnp.float32), d_out.astype(jnp.float32)),
                                argnums=(0, 1, 2, 3, 4, 5)))

    start = time.perf_counter()
    jax.block_until_ready(step(q, k, v, *gates))
    first = time.perf_counter() - start
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        jax.block_until_ready(step(q, k, v, *gates))
        times.append(time.perf_counter() - start)

    flops = nsa_flops(T, HQ, D, args.block_counts, args.block_size, args.window)
    if args.mode == "fwd_bwd":
        flops *= 3.5  # backward: dq, dk, dv, and the recomputed scores
    median = statistics.median(times)
    device = jax.devices()[0]
    peak = (device.memory_stats() or {}).get("peak_bytes_in_use") if device.platform == "gpu" else None
    print(f"device: {device.device_kind} ({device.platform})")
    print(f"T={T} HQ={HQ} H={H} D={D} S={args.block_counts} BS={args.block_size} W={args.window} "
          f"{args.dtype} {args.mode} backend={args.backend}")
    print(f"first call (compile + run): {first:.2f} s; median of {args.repeats}: {median * 1e3:.2f} ms; "
          f"{flops / 1e9:.1f} GFLOP valid work, {flops / median / 1e12:.3f} TFLOP/s")
    if peak is not None:
        print(f"peak device memory: {peak / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
