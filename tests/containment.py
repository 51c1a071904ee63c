"""SPEC section 8, containment: a NaN or Inf planted in `key` / `value` at a position must not
reach any query that cannot see that position (a later position of its own sequence, or another
sequence of a packed row). Shared by every backend's test file, so each checks its own kernels.

The check: the whole call (all three branches, computed selection) on fresh random inputs, once
clean and once with the poison planted; the outputs of the queries that cannot see the planted
position must be finite and equal to the clean ones, and the planted token itself (which sees its
own key and value through the window) must not come out finite where its own arithmetic would not
(a NaN, or an Inf value): containment must not turn an undefined result into a number.
"""

from __future__ import annotations

import numpy as np

import ejkernel_nsa as nsa

# Tiny: the kernel backends run this in their interpreters on CI.
T, HQ, H, D, DV, BS, W = 64, 2, 1, 16, 16, 16, 8
CU_SEQLENS = np.array([0, 40, T], np.int32)


def _inputs(seed: int):
    rng = np.random.default_rng(seed)

    def normal(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    return dict(query=normal(1, T, HQ, D), key=normal(1, T, H, D), value=normal(1, T, H, DV),
                g_cmp=normal(1, T, HQ), g_slc=normal(1, T, HQ), g_swa=normal(1, T, HQ))


# (what is planted, where, with cu_seqlens?, the tokens that cannot see it)
PLANTINGS = [
    # The last token of one sequence: every earlier token, in every branch (its compressed block is
    # the current, incomplete one; its selected block is loaded by the tokens of that block).
    ("future position", T - 1, None, np.arange(T - 1)),
    ("future position, mid-block", 37, None, np.arange(37)),
    ("later packed sequence", 41, CU_SEQLENS, np.arange(40)),
    ("earlier packed sequence", 5, CU_SEQLENS, np.arange(40, T)),
]


def check_containment(backend: str, poisons=(np.nan, np.inf), plantings=PLANTINGS, tensors=("key", "value"),
                      seed: int = 0) -> None:
    args = _inputs(seed)
    call = dict(block_counts=2, block_size=BS, window_size=W, backend=backend)
    clean = {}
    for name, position, cu_seqlens, blind in plantings:
        key = "packed" if cu_seqlens is not None else "row"
        if key not in clean:
            clean[key] = np.asarray(nsa.native_sparse_attention(**args, **call, cu_seqlens=cu_seqlens))
        for poison in poisons:
            for tensor in tensors:
                planted = dict(args)
                planted[tensor] = args[tensor].copy()
                planted[tensor][0, position, 0, 0] = poison
                out = np.asarray(nsa.native_sparse_attention(**planted, **call, cu_seqlens=cu_seqlens))
                seen = out[0, blind]
                where = f"{backend}: {poison} in {tensor} at {position} ({name})"
                assert np.all(np.isfinite(seen)), f"{where} reached tokens {np.unique(np.nonzero(~np.isfinite(seen))[0])}"
                np.testing.assert_allclose(seen, clean[key][0, blind], rtol=1e-5, atol=1e-6, err_msg=where)
                # Its own arithmetic is non-finite for a NaN anywhere or an Inf value (an Inf key may
                # score -inf, a legitimate zero weight).
                if tensor == "value" or np.isnan(poison):
                    assert not np.all(np.isfinite(out[0, position])), f"{where}: the planted token's output is finite"
