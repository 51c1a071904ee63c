"""What every Pallas (Triton lowering) piece shares: the launch, tile loads and stores, the dot
precision, and the two steps of a flash-attention loop (online softmax forward, softmax backward).

Every kernel sees its arrays whole, flattened to 2-D `[rows, dim]` (no `BlockSpec` tiling): a
program gathers its own rows with integer-array indexers, which both the Triton lowering (pointer
arithmetic, masked `tt.load`) and the Pallas interpreter (an XLA gather) understand. Rows of a
tile are (token, query head) pairs, so tiles pack heads and tokens freely, varlen rows included.

Interpret-mode rules the helpers keep (the interpreter discharges loads and stores to XLA
gathers and scatters on the whole array):
- a load or store mixes no `pl.ds` slice with array indexers (not implemented by the interpreter);
- a masked-off row of a store is sent past the end of the array, so the scatter drops it instead
  of writing a stale value over a row that another part of the same store writes;
- masked atomics are not interpreted, so partial sums go to separate buffers, added in XLA.
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

# Shared with the other Triton-family backends; the pieces read them as `common.*`.
from ejkernel_nsa.backends.common.host import LN2, LOG2E, cdiv, next_pow2, padded_dim  # noqa: F401
from ejkernel_nsa.backends.pallas_triton import interpreted
from ejkernel_nsa.registry.toolchain import triton_kernel_decline

# jax 0.11 deprecates the Pallas Triton lowering (it still works); the warning is raised while
# lowering, inside the user's jit, so it is filtered once here, by its exact text.
warnings.filterwarnings("ignore", message="The Pallas Triton backend is deprecated", category=DeprecationWarning)


def divmod_static(x, n: int):
    """`(x // n, x % n)` for a non-negative traced int and a static `n`, as `lax.div` / `lax.rem`
    on int32. jnp's `//` and `%` add sign fix-ups whose `select`s the Triton lowering of jax 0.11
    mistypes as booleans for weakly typed operands (a loop index, a literal); truncating division
    is exact for non-negative operands and needs none."""
    x = jnp.asarray(x, jnp.int32)
    if n == 1:
        return x, jnp.zeros_like(x)
    divisor = jnp.int32(n)
    return jax.lax.div(x, divisor), jax.lax.rem(x, divisor)


# What none of the kernels do; each piece adds its own limits.
common_decline = triton_kernel_decline


def pallas_call(kernel, *, grid, out_shape, num_warps: int, num_stages: int, name: str, **static):
    """`pl.pallas_call` over whole arrays, compiled by Triton, or interpreted when
    `interpreted()` (decided at trace time, so `config.interpret_mode()` applies)."""
    return pl.pallas_call(
        functools.partial(kernel, **static) if static else kernel,
        grid=grid,
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpreted(),
        name=name,
    )


# ---- loads, stores, dots inside kernels ------------------------------------------------------


def load_rows(ref, rows, row_ok, width: int, dim: int, other=0.0):
    """`[len(rows), width]` from a 2-D ref `[N, dim]`: the given rows, columns `[0, width)`,
    zero (or `other`) where a row is masked off or a column is padding."""
    cols = jnp.arange(width, dtype=jnp.int32)
    mask = row_ok[:, None] & (cols < dim)[None, :]
    return plgpu.load(ref.at[rows[:, None], cols[None, :]], mask=mask, other=other)


def store_rows(ref, rows, row_ok, value, dim: int):
    """Store `value` `[len(rows), width]` into the 2-D ref `[N, dim]`, skipping masked rows and
    padding columns. Masked rows are sent past the end (see the module docstring)."""
    cols = jnp.arange(value.shape[1], dtype=jnp.int32)
    rows = jnp.where(row_ok, rows, ref.shape[0])
    mask = row_ok[:, None] & (cols < dim)[None, :]
    plgpu.store(ref.at[rows[:, None], cols[None, :]], value.astype(ref.dtype), mask=mask)


def load_vector(ref, index, ok, other=0):
    """`ref[index]` for a 1-D ref and an index vector, `other` where not `ok`."""
    return plgpu.load(ref.at[index], mask=ok, other=other)


def store_vector(ref, index, ok, value):
    index = jnp.where(ok, index, ref.shape[0])
    plgpu.store(ref.at[index], value.astype(ref.dtype), mask=ok)


def dot_precision(problem_dtype, operand_dtype):
    """`tt.dot` input precision. Float32 problems: three tf32 passes (within the float32
    tolerance); 16-bit problems with float32 operands (the float32 compressed blocks): one tf32
    pass; 16-bit operands: native. The interpreter computes every dot in full float32."""
    if interpreted():
        return None
    if jnp.dtype(problem_dtype) == jnp.float32:
        return jax.lax.DotAlgorithmPreset.TF32_TF32_F32_X3
    if jnp.dtype(operand_dtype) == jnp.float32:
        return jax.lax.DotAlgorithmPreset.TF32_TF32_F32
    return None


def dot(a, b, precision, *, trans_a: bool = False, trans_b: bool = False):
    """`a @ b` (either transposed) with float32 accumulation."""
    contract_a = 0 if trans_a else 1
    contract_b = 1 if trans_b else 0
    return jax.lax.dot_general(a, b, (((contract_a,), (contract_b,)), ((), ())), precision=precision,
                               preferred_element_type=jnp.float32)


# ---- flash-attention steps ----------------------------------------------------------------------


def softmax_init(rows: int, value_width: int):
    """The running (max, sum, accumulator) of an online softmax in base 2."""
    return (jnp.full((rows,), -jnp.inf, jnp.float32), jnp.zeros((rows,), jnp.float32),
            jnp.zeros((rows, value_width), jnp.float32))


def softmax_step(state, s2, visible, v, precision):
    """Fold one key tile into the running softmax: `s2` are base-2 scores `[rows, keys]`, `v`
    the tile's values `[keys, Dv]`, zeroed where non-finite (SPEC 8: a masked `p = 0` must not
    meet a NaN; `nonfinite_in` poisons the rows that saw one after the loop). A row that has seen
    nothing keeps max -inf and is shifted by 0, so no `-inf - -inf` appears."""
    m, l, acc = state
    s2 = jnp.where(visible, s2, -jnp.inf)
    m_new = jnp.maximum(m, jnp.max(s2, axis=1))
    shift = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    p = jnp.exp2(s2 - shift[:, None])
    alpha = jnp.exp2(m - shift)
    l = l * alpha + jnp.sum(p, axis=1)
    acc = acc * alpha[:, None] + dot(p.astype(v.dtype), v, precision)
    return m_new, l, acc


def softmax_finish(state):
    """The normalized output and the natural-log lse (-inf for a row that saw no key)."""
    m, l, acc = state
    seen = l > 0.0
    safe = jnp.where(seen, l, 1.0)
    return acc / safe[:, None], jnp.where(seen, (m + jnp.log2(safe)) * LN2, -jnp.inf)


def nonfinite_in(prefix_ref, b, h, lo, hi, ok, *, N: int, H: int):
    """SPEC 8 (backends/common/containment.py), read once after a forward loop: per row, whether
    value rows `[lo, hi)` of batch row `b`, kv head `h` held a NaN or Inf. `prefix_ref` is the
    flattened `nonfinite_prefix` `[B, N + 1, H]` of the values (which the kernel read zeroed)."""
    base = (b * (N + 1)) * H + h
    count_hi = load_vector(prefix_ref, base + hi * H, ok)
    count_lo = load_vector(prefix_ref, base + lo * H, ok)
    return ok & (hi > lo) & (count_hi > count_lo)


def poisoned(out, bad):
    """`out` `[rows, width]` with NaN on the rows `bad` (those that saw a non-finite value)."""
    return jnp.where(bad[:, None], jnp.nan, out)


def base2_lse(lse):
    """lse in base 2 for the backward pass; rows without a key (-inf) get 0, their p is masked.
    A NaN lse (a row that saw a non-finite value, `finite_backward_operands`) stays NaN."""
    return jnp.where(lse == -jnp.inf, 0.0, lse * LOG2E)


def scores2(q, k, scale: float, precision):
    """Base-2 scores `[rows, keys]`: `scale * q . k` times log2(e) (the softmax runs on exp2)."""
    return dot(q, k, precision, trans_b=True) * (scale * LOG2E)


def key_grads(grads, q, do, lse2, delta, k, v, visible, scale: float, precision):
    """One query tile's contribution to a key tile's `(dk, dv)` (dk not yet scaled): the
    softmax backward with the key tile fixed and the query rows moving."""
    dk, dv = grads
    p, ds = softmax_grads(scores2(q, k, scale, precision), lse2, visible, do, v, delta, precision)
    return (dk + dot(ds.astype(q.dtype), q, precision, trans_a=True),
            dv + dot(p.astype(do.dtype), do, precision, trans_a=True))


def softmax_grads(s2, lse2, visible, do, v, delta, precision):
    """Probabilities and the score gradient of one key tile: `p = exp2(s2 - lse2)` where visible,
    `ds = p * (do . v - delta)` (the softmax scale not yet applied)."""
    p = jnp.where(visible, jnp.exp2(s2 - lse2[:, None]), 0.0)
    dp = dot(do, v, precision, trans_b=True)
    return p, p * (dp - delta[:, None])



def query_tile(b, h, t0, head0, *, T: int, H: int, G: int, HP: int, BT: int, end=None):
    """Rows of a query tile: `BT` tokens from `t0` times `HP` query heads from `head0` of kv
    head `h`'s group (`G` padded to a power of two, or split in chunks of `HP`), token-major.
    Returns each row's token, whether it is a real (token, head) pair (a token before `end`,
    default `T`), and its row on the flattened `[B * T * H * G, D]` query axis."""
    rows = jnp.arange(BT * HP, dtype=jnp.int32)
    token_offset, head_offset = divmod_static(rows, HP)
    token = t0 + token_offset
    head = head0 + head_offset
    row_ok = (token < (T if end is None else end)) & (head < G)
    return token, row_ok, (b * T + token) * (H * G) + h * G + head


def group_tile(program, *, G: int, HP: int, H: int):
    """A query-tile program's batch row, kv head and first query head, from its grid index over
    `B * H * cdiv(G, HP)` (head chunks innermost)."""
    bh, head_tile = divmod_static(program, cdiv(G, HP))
    b, h = divmod_static(bh, H)
    return b, h, head_tile * HP


def row_grad_inputs(q_ref, do_ref, lse_ref, delta_ref, q_row, row_ok, dk: int, dv: int, dtype=None):
    """What a backward tile needs of its query rows: q, do (cast to `dtype` if given), the
    base-2 lse and delta."""
    q = load_rows(q_ref, q_row, row_ok, padded_dim(dk), dk)
    do = load_rows(do_ref, q_row, row_ok, padded_dim(dv), dv)
    if dtype is not None:
        q, do = q.astype(dtype), do.astype(dtype)
    lse2 = base2_lse(load_vector(lse_ref, q_row, row_ok, -jnp.inf))
    return q, do, lse2, load_vector(delta_ref, q_row, row_ok, 0.0)
