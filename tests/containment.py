"""SPEC section 8, containment: a NaN or Inf planted in `key` / `value` at a position must not
reach any query that cannot see that position (a later position of its own sequence, or another
sequence of a packed row). Run by the shared suite (tests/backend_suite.py) for every backend on
its own kernels; `backend` is what the call forces (a name, or a per-piece dict).

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


def _label(backend) -> str:
    return backend if isinstance(backend, str) else "+".join(sorted(set(backend.values())))


def check_containment(backend, poisons=(np.nan, np.inf), plantings=PLANTINGS, tensors=("key", "value"),
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
                where = f"{_label(backend)}: {poison} in {tensor} at {position} ({name})"
                assert np.all(np.isfinite(seen)), f"{where} reached tokens {np.unique(np.nonzero(~np.isfinite(seen))[0])}"
                np.testing.assert_allclose(seen, clean[key][0, blind], rtol=1e-5, atol=1e-6, err_msg=where)
                # Its own arithmetic is non-finite for a NaN anywhere or an Inf value (an Inf key may
                # score -inf, a legitimate zero weight).
                if tensor == "value" or np.isnan(poison):
                    assert not np.all(np.isfinite(out[0, position])), f"{where}: the planted token's output is finite"


def check_gradient_containment(backend, poisons=(np.nan, np.inf), plantings=PLANTINGS, tensors=("key", "value"),
                               seed: int = 0, planted_gradient_nan: bool = True) -> None:
    """SPEC 8 for the gradients. A backward kernel meets masked keys too: a masked `p = 0` times a
    NaN `do . v` (or a NaN key in `ds @ k`), or a masked row's NaN delta (its output saw the
    poison) times a key it cannot see, would carry the poison to gradients it cannot reach.

    loss = sum(out * a fixed random cotangent), through the whole call with computed selection
    (as `check_containment`: the selection carries no gradient, and the blind tokens' selection
    is already checked equal to the clean one, so this adds the backward of every branch, the
    compressed lse's path into the selection included). Checked: the gradients of query and gates
    at the blind tokens, and of key and value at the positions only blind tokens can see (the
    other sequence of a packed row; in one sequence the last token sees every key through the
    compressed branch, so there are none), finite and equal to the clean run's; and (with
    `planted_gradient_nan`) the planted token's query gradient is not finite where its output is
    not: its result is undefined, and so is its gradient."""
    import jax

    args = _inputs(seed)
    names = list(args)
    cotangent = np.random.default_rng(seed + 1).standard_normal((1, T, HQ, DV)).astype(np.float32)
    call = dict(block_counts=2, block_size=BS, window_size=W, backend=backend)

    def gradients(inputs, cu_seqlens):
        def loss(*arrays):
            out = nsa.native_sparse_attention(**dict(zip(names, arrays)), **call, cu_seqlens=cu_seqlens)
            return (out * cotangent).sum()

        grads = jax.grad(loss, argnums=tuple(range(len(names))))(*(inputs[n] for n in names))
        return {n: np.asarray(g) for n, g in zip(names, grads)}

    clean = {}
    for name, position, cu_seqlens, blind in plantings:
        key = "packed" if cu_seqlens is not None else "row"
        if key not in clean:
            clean[key] = gradients(args, cu_seqlens)
        kv_blind = blind if cu_seqlens is not None else blind[:0]
        for poison in poisons:
            for tensor in tensors:
                planted = dict(args)
                planted[tensor] = args[tensor].copy()
                planted[tensor][0, position, 0, 0] = poison
                grads = gradients(planted, cu_seqlens)
                for arg, rows in [(n, kv_blind if n in ("key", "value") else blind) for n in names]:
                    seen = grads[arg][0, rows]
                    where = f"{_label(backend)}: {poison} in {tensor} at {position} ({name}), d/d{arg}"
                    assert np.all(np.isfinite(seen)), \
                        f"{where} reached tokens {rows[np.unique(np.nonzero(~np.isfinite(seen))[0])]}"
                    np.testing.assert_allclose(seen, clean[key][arg][0, rows], rtol=1e-5, atol=1e-6, err_msg=where)
                if planted_gradient_nan and (tensor == "value" or np.isnan(poison)):
                    assert not np.all(np.isfinite(grads["query"][0, position])), \
                        f"{_label(backend)}: {poison} in {tensor} at {position}: the planted token's query " \
                        "gradient is finite"
