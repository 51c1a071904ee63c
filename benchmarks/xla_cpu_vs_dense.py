"""The XLA backend against dense causal XLA attention, on the CPU (issue 11, "the portable path").

CPU and TPU users get only the XLA backend, so it must beat the dense attention they would
otherwise run: `jax.nn.dot_product_attention(implementation="xla", is_causal=True)` on the same
machine, same float32 inputs. Times are the median of `--repeats` jitted calls (forward; add
`--backward` for forward + backward), after one warm-up call that compiles.

Rows: `nsa` is the whole call without the window (compressed + selected, S=16, BS=64, computed
selection); `nsa+swa` adds the sliding window (W=512, the paper's); `swa W=32` is the
sliding-window piece alone, whose cost must grow with W, not T.

    nice -n 10 python benchmarks/xla_cpu_vs_dense.py --seq-lens 1024 2048 4096 8192 16384
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp
import numpy as np

import ejkernel_nsa as nsa

from bench_timing import median_ms  # noqa: E402 (benchmarks/ is the script's folder)


def with_backward(fn):
    """fn -> a function returning the gradients of sum(out * cotangent) w.r.t. q, k, v."""
    def loss(q, k, v, *rest):
        return jnp.sum(fn(q, k, v, *rest).astype(jnp.float32))
    return jax.grad(loss, argnums=(0, 1, 2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--q-heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--block-counts", type=int, default=16)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--small-window", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--backward", action="store_true")
    args = parser.parse_args()

    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; float32, HQ={args.q_heads}, H={args.kv_heads}, "
          f"D={args.head_dim}, S={args.block_counts}, BS={args.block_size}; "
          f"{'forward + backward' if args.backward else 'forward'}; median of {args.repeats}, ms")
    print(f"| T | dense causal | nsa | nsa+swa W={args.window} | swa W={args.small_window} alone "
          f"| dense / nsa | dense / nsa+swa |")
    print("|---|---|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    for seq_len in args.seq_lens:
        q = jnp.asarray(rng.standard_normal((1, seq_len, args.q_heads, args.head_dim), np.float32))
        k = jnp.asarray(rng.standard_normal((1, seq_len, args.kv_heads, args.head_dim), np.float32))
        v = jnp.asarray(rng.standard_normal((1, seq_len, args.kv_heads, args.head_dim), np.float32))
        g = [jnp.asarray(rng.uniform(size=(1, seq_len, args.q_heads)).astype(np.float32)) for _ in range(3)]

        def dense(q, k, v):
            return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")

        def ours(q, k, v, g_cmp, g_slc, g_swa, window):
            return nsa.native_sparse_attention(
                q, k, v, g_cmp, g_slc, block_counts=args.block_counts, block_size=args.block_size,
                g_swa=g_swa if window else None, window_size=window, backend="xla")

        def window_only(q, k, v):
            return nsa.sliding_window_attention(q, k, v, args.small_window, backend="xla")

        wrap = with_backward if args.backward else (lambda f: f)
        row = [
            median_ms(jax.jit(wrap(dense)), q, k, v, repeats=args.repeats, warmup=1),
            median_ms(jax.jit(wrap(functools.partial(ours, window=0))), q, k, v, g[0], g[1], g[2],
                      repeats=args.repeats, warmup=1),
            median_ms(jax.jit(wrap(functools.partial(ours, window=args.window))), q, k, v, *g, repeats=args.repeats,
                      warmup=1),
            median_ms(jax.jit(wrap(window_only)), q, k, v, repeats=args.repeats, warmup=1),
        ]
        print(f"| {seq_len} | {row[0]:.1f} | {row[1]:.1f} | {row[2]:.1f} | {row[3]:.1f} "
              f"| {row[0] / row[1]:.2f}x | {row[0] / row[2]:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
