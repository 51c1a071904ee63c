"""Run each Triton piece once, for a profiler (ncu) to read its kernels' counters.

  ncu --clock-control none --kernel-name regex:'block_selection|selected_attention' \\
      python benchmarks/profile_pieces.py --group 1

Inputs as in `variants.py` (random, the selection our own); every piece is compiled and run
twice; the first launch of
each kernel is a warm-up: give ncu `--launch-skip` to profile the second).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from ejkernel_nsa.backends.triton import selected_attention as slc
from ejkernel_nsa.backends.triton import selection as sel_kernel

import variants  # noqa: E402  (benchmarks/ is the script's folder)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--group", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=65536)
    parser.add_argument("--pieces", default="selection,forward,backward")
    args = parser.parse_args(argv)
    x = variants.inputs(args.group, args.seq_len, 128, 64, 16, "bfloat16")
    scale = 128**-0.5
    pieces = args.pieces.split(",")
    plan = []
    if "selection" in pieces:
        plan.append((jax.jit(lambda q, kc, lse: sel_kernel.run(q, kc, lse, block_counts=16, num_slots=16,
                                                               block_size=64, scale=scale, segments=None)),
                     (x["q"], x["k_cmp"], x["lse"])))
    if "forward" in pieces:
        for order in ("block", "token"):
            plan.append((jax.jit(lambda q, k, v, i, t=slc.Tiles(loop_order=order): slc.run(
                q, k, v, i, 16, block_size=64, scale=scale, segments=None, tiles=t)),
                (x["q"], x["k"], x["v"], x["indices"])))
    if "backward" in pieces:
        for order in ("fused", "split"):
            def loss(q, k, v, i, do, t=slc.Tiles(loop_order="block", backward_order=order)):
                out = slc.run(q, k, v, i, 16, block_size=64, scale=scale, segments=None, tiles=t)
                return jnp.sum(out.astype(jnp.float32) * do.astype(jnp.float32))
            plan.append((jax.jit(jax.grad(loss, argnums=(0, 1, 2))), (x["q"], x["k"], x["v"], x["indices"],
                                                                     x["d_out"])))
    for fn, operands in plan:  # warm-up: compile and run once
        jax.block_until_ready(fn(*operands))
    for fn, operands in plan:  # the profiled launches
        jax.block_until_ready(fn(*operands))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
