"""One `jax.custom_vjp` wiring for flash-style attention kernels.

Every attention kernel's backward needs the same two quantities besides its own saved inputs:
the forward's log-sum-exp and `delta = rowsum(dO * O)`, the softmax backward's correction term
(`dS = P * (dO . V^T - delta)`). A piece that also returns its lse (compressed attention, whose
lse feeds the selection) receives an lse cotangent too; since `d lse / d s = p`, it enters the
softmax backward as a shift of delta: `delta = rowsum(dO * O) - d_lse`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp


def attention_delta(d_out, out, d_lse=None):
    """`rowsum(d_out * out)` over the last axis in float32, minus the lse cotangent if given.
    `out` should be the output as the caller saw it (rounded to its dtype)."""
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
    return delta if d_lse is None else delta - d_lse


def attention_vjp(forward: Callable, backward: Callable, *, nondiff_argnums: Sequence[int] = (),
                  returns_lse: bool = False) -> Callable:
    """A differentiable attention call from a kernel's forward and backward.

    - `forward(*args) -> (out, lse, saved)`: the output, its natural-log lse and whatever else the
      backward reads (the inputs it needs, in whatever layout the forward already made).
    - `backward(*nondiff_args, saved, d_out, lse, delta) -> cotangents`: one per differentiable
      argument, in order (None for index arrays). `d_out` arrives in the output's dtype.

    The returned function takes `forward`'s arguments and returns `out`, or `(out, lse)` with
    `returns_lse` (then the lse cotangent is folded into delta). Arguments at `nondiff_argnums`
    are static (hashable: sizes, the scale, configs)."""
    nondiff_argnums = tuple(nondiff_argnums)
    num_static = len(nondiff_argnums)

    @functools.partial(jax.custom_vjp, nondiff_argnums=nondiff_argnums)
    def attend(*args):
        out, lse, _ = forward(*args)
        return (out, lse) if returns_lse else out

    def attend_fwd(*args):
        out, lse, saved = forward(*args)
        return ((out, lse) if returns_lse else out), (saved, out, lse)

    def attend_bwd(*rest):
        static, (saved, out, lse), cotangents = rest[:num_static], rest[num_static], rest[num_static + 1]
        d_out, d_lse = cotangents if returns_lse else (cotangents, None)
        d_out = d_out.astype(out.dtype)
        return backward(*static, saved, d_out, lse, attention_delta(d_out, out, d_lse))

    attend.defvjp(attend_fwd, attend_bwd)
    return attend
