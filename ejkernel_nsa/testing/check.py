"""The cross-backend check an installed ejkernel_nsa runs on itself (`ejkernel-nsa check`).

Every backend that can run here is forced, in turn, on a few fixed NSA problems with fresh
random inputs (one per SPEC feature: GQA with all three branches, packed sequences, a caller's
selection, compression geometry, keys longer than queries), under jit, and its output and
gradients are compared with the float64 oracle at SPEC section 8's tolerances. It is the test
suite's `BackendSuite` (tests/backend_suite.py) cut down to what runs in seconds without pytest or
hypothesis, by the same rules:
  * a computed selection is compared only on the heads whose top-k is not a near tie, then the
    whole output again with the oracle's selection given, so near ties cannot hide an error;
  * gradients are taken with the oracle's selection given (selection carries no gradient);
  * a forced backend that declines a problem (say, a piece it has no kernel for) is reported
    as declined, with its reason: never replaced by another backend.
"""

from __future__ import annotations

import dataclasses
import functools
import zlib
from collections.abc import Callable, Iterable

import numpy as np

from ejkernel_nsa.testing import oracle

# SPEC section 8: (output, gradient) relative L2 tolerances by input dtype.
TOLERANCES = {"float32": (1e-4, 1e-3), "bfloat16": (2e-2, 5e-2), "float16": (2e-2, 5e-2)}
GRADIENT_INPUTS = ("query", "key", "value", "g_cmp", "g_slc", "g_swa")


def rel_l2(actual, expected) -> float:
    """SPEC section 8's error: ||actual - expected|| / ||expected|| (the absolute error when the
    reference is zero), inf when `actual` is not finite."""
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    if not np.all(np.isfinite(actual)):
        return float("inf")
    error = np.linalg.norm(actual - expected)
    scale = np.linalg.norm(expected)
    return float(error / scale) if scale > 0 else float(error)


@dataclasses.dataclass(frozen=True)
class Problem:
    """One NSA call of the check, small enough for the float64 oracle to run in about a second."""

    name: str  # what `ejkernel-nsa check --problem` takes
    seq_len: int
    kv_heads: int
    group: int
    block_size: int
    block_counts: int
    batch: int = 1
    head_dim: int = 32
    value_dim: int = 16
    window_size: int = 0
    cu_seqlens: tuple[int, ...] | None = None
    # The caller's selection: random block_indices (empty slots, duplicates, future blocks) and
    # per-token block counts, and no compressed branch.
    given_indices: bool = False
    compress_block_size: int | None = None
    compress_stride: int | None = None
    # SPEC section 10: keys longer than the queries, each row its own key length.
    kv_lengths: tuple[int, ...] | None = None
    key_len: int | None = None

    @property
    def num_q_heads(self) -> int:
        return self.group * self.kv_heads


# One problem per SPEC feature: GQA with all three branches (6), packed sequences (cu_seqlens), the
# caller's selection with per-token counts (4), compression geometry (9), keys longer than queries (10).
PROBLEMS = (
    Problem("gqa", batch=2, seq_len=96, kv_heads=2, group=2, block_size=16, block_counts=3,
            window_size=24),
    Problem("packed", seq_len=112, kv_heads=1, group=4, block_size=32, block_counts=2,
            value_dim=32, cu_seqlens=(0, 45, 112)),
    Problem("given-indices", seq_len=80, kv_heads=1, group=2, block_size=16, block_counts=3,
            window_size=7, given_indices=True),
    Problem("geometry", seq_len=96, kv_heads=1, group=2, block_size=32, block_counts=2,
            compress_block_size=32, compress_stride=16),
    Problem("longer-keys", batch=2, seq_len=5, key_len=70, kv_lengths=(70, 41), kv_heads=1,
            group=2, block_size=16, block_counts=2, window_size=9),
)


@dataclasses.dataclass(frozen=True)
class Outcome:
    """One (backend, problem, dtype) of the check: `status` is "pass", "fail" or "declined";
    `errors` maps each compared quantity to its relative L2 error; `detail` says why, in words."""

    backend: str
    problem: str
    dtype: str
    status: str
    errors: dict[str, float]
    detail: str

    @property
    def passed(self) -> bool:
        return self.status == "pass"

    def __str__(self) -> str:
        return f"{self.backend:<14} {self.dtype:<9} {self.problem:<14} {self.status.upper():<8} {self.detail}"


def check_backends(
    backends: Iterable[str] | None = None,
    dtypes: Iterable[str] = ("float32", "bfloat16"),
    problems: Iterable[Problem] = PROBLEMS,
    *,
    gradients: bool = True,
    seed: int = 0,
    on_outcome: Callable[[Outcome], None] | None = None,
) -> list[Outcome]:
    """Force each backend on each problem and dtype and compare it with the float64 oracle.

    Args:
      backends: backend names (default: every backend that can run here, per `backend_status()`).
        A named backend that cannot run here is reported as declined, with the reason.
      dtypes: input dtypes, each a key of `TOLERANCES`.
      problems: the `Problem`s to run (default `PROBLEMS`).
      gradients: also compare the gradients of every input and gate.
      seed: seeds the random inputs (each problem draws its own from it).
      on_outcome: called with each `Outcome` as soon as it is known (the CLI prints them live).

    Returns:
      Every `Outcome`, in the order backends x problems x dtypes.
    """
    import ejkernel_nsa as nsa

    status = nsa.backend_status()
    if backends is None:
        backends = [name for name, reason in status.items() if reason is None]
    backends, dtypes, problems = list(backends), list(dtypes), list(problems)
    for name in backends:
        if name not in status:
            raise ValueError(f"backends: unknown backend {name!r}; known backends: {', '.join(status)}")
    for dtype in dtypes:
        if dtype not in TOLERANCES:
            raise ValueError(f"dtypes: expected some of {', '.join(TOLERANCES)}, got {dtype!r}")
    references: dict[tuple[int, str], tuple] = {}

    def reference(index: int, problem: Problem, dtype: str) -> tuple:
        """One draw and one oracle run per (problem, dtype), shared by every backend."""
        if (index, dtype) not in references:
            rng = np.random.default_rng([seed, zlib.crc32(problem.name.encode()), zlib.crc32(dtype.encode())])
            args = _inputs(problem, dtype, rng)
            expected = _oracle_forward(problem, args)
            d_out = rng.standard_normal(expected["o"].shape)
            # Gradients hold the oracle's selection (the caller's, when given) fixed.
            given = args if problem.given_indices else dict(args, block_indices=expected["block_indices"])
            references[index, dtype] = args, expected, d_out, _oracle_vjp(problem, given, d_out) if gradients else None
        return references[index, dtype]

    outcomes = []
    for backend in backends:
        for index, problem in enumerate(problems):
            for dtype in dtypes:
                if status[backend] is not None:
                    reason = f"cannot run here: {status[backend]}"
                    outcome = Outcome(backend, problem.name, dtype, "declined", {}, reason)
                else:
                    outcome = _check_one(backend, problem, dtype, *reference(index, problem, dtype))
                outcomes.append(outcome)
                if on_outcome is not None:
                    on_outcome(outcome)
    return outcomes


def _check_one(backend, problem, dtype, args, expected, d_out, expected_grads) -> Outcome:
    import jax
    import jax.numpy as jnp

    import ejkernel_nsa as nsa

    out_tol, grad_tol = TOLERANCES[dtype]
    errors: dict[str, float] = {}
    try:
        fn, arrays = _jitted(args, backend)
        out = fn(**arrays)
        if out.dtype != jnp.dtype(dtype):
            return Outcome(backend, problem.name, dtype, "fail", {}, f"output dtype {out.dtype}, expected {dtype}")
        if expected["scores"] is not None:
            # Near ties may legitimately pick other blocks: those heads are compared through the
            # oracle's selection below.
            separated = oracle.near_tie_mask(expected["scores"], args["block_counts"], expected["num_slots"],
                                             problem.group)
            keep = np.repeat(separated, problem.group, axis=2)
            errors["output (well-separated heads)"] = rel_l2(np.asarray(out, np.float64)[keep], expected["o"][keep])
            arrays = dict(arrays, block_indices=expected["block_indices"].astype(np.int32))
            out = fn(**arrays)
            errors["output (oracle's selection)"] = rel_l2(out, expected["o"])
        else:
            errors["output"] = rel_l2(out, expected["o"])
        if expected_grads is not None:
            wrt = [name for name in GRADIENT_INPUTS if arrays.get(name) is not None]
            d_out_cast = jnp.asarray(d_out, jnp.float32)

            def loss(*diff):
                result = fn(**dict(arrays, **dict(zip(wrt, diff, strict=True))))
                return jnp.sum(result.astype(jnp.float32) * d_out_cast)

            grads = jax.jit(jax.grad(loss, argnums=tuple(range(len(wrt)))))(*(arrays[name] for name in wrt))
            for name, grad in zip(wrt, grads, strict=True):
                errors[f"d{name}"] = rel_l2(grad, expected_grads[name])
    except nsa.BackendError as error:
        return Outcome(backend, problem.name, dtype, "declined", errors, str(error).splitlines()[0])
    except Exception as error:  # a crash is a failure to report, not a reason to stop the check
        return Outcome(backend, problem.name, dtype, "fail", errors, f"raised {type(error).__name__}: {error}")
    over = {name: e for name, e in errors.items() if not e < (grad_tol if name.startswith("d") else out_tol)}
    outputs = [e for name, e in errors.items() if not name.startswith("d")]
    grads = [e for name, e in errors.items() if name.startswith("d")]
    detail = f"output {max(outputs):.1e} (tol {out_tol:.0e})"
    if grads:
        detail += f", gradients {max(grads):.1e} (tol {grad_tol:.0e})"
    if over:
        detail += ": over tolerance: " + ", ".join(f"{name} {e:.2e}" for name, e in over.items())
    return Outcome(backend, problem.name, dtype, "fail" if over else "pass", errors, detail)


# Inputs that are arrays under jit (cu_seqlens and kv_lengths too: the library reads them traced).
_ARRAYS = ("query", "key", "value", "g_cmp", "g_slc", "g_swa", "block_indices", "block_counts", "cu_seqlens",
           "kv_lengths")


def _jitted(args: dict, backend: str):
    """`native_sparse_attention` forced to `backend` under jit: arrays traced, options static."""
    import jax

    import ejkernel_nsa as nsa

    arrays = {k: v for k, v in args.items() if k in _ARRAYS and v is not None and not isinstance(v, int)}
    options = {k: v for k, v in args.items() if k not in arrays and v is not None}
    return jax.jit(functools.partial(nsa.native_sparse_attention, backend=backend, **options)), arrays


def _inputs(problem: Problem, dtype: str, rng: np.random.Generator) -> dict:
    """Normal queries, keys and values and sigmoid gates, rounded to `dtype` (NumPy arrays, so the
    oracle sees exactly what the backend sees), in the library's keyword names."""
    import jax.numpy as jnp

    B, T, HQ, H = problem.batch, problem.seq_len, problem.num_q_heads, problem.kv_heads
    TK = problem.key_len or T

    def rounded(x):
        return np.asarray(jnp.asarray(x, dtype))

    def gate():
        return rounded(1 / (1 + np.exp(-rng.standard_normal((B, T, HQ)))))

    args = dict(
        query=rounded(rng.standard_normal((B, T, HQ, problem.head_dim))),
        key=rounded(rng.standard_normal((B, TK, H, problem.head_dim))),
        value=rounded(rng.standard_normal((B, TK, H, problem.value_dim))),
        g_cmp=None if problem.given_indices else gate(),
        g_slc=gate(),
        g_swa=gate() if problem.window_size else None,
        block_size=problem.block_size,
        block_counts=problem.block_counts,
        window_size=problem.window_size,
        cu_seqlens=None if problem.cu_seqlens is None else np.asarray(problem.cu_seqlens, np.int32),
        kv_lengths=None if problem.kv_lengths is None else np.asarray(problem.kv_lengths, np.int32),
        compress_block_size=problem.compress_block_size,
        compress_stride=problem.compress_stride,
    )
    if problem.given_indices:
        # Empty slots (-1), duplicates and blocks past the token: SPEC section 4 ignores them all.
        max_block = -(-T // problem.block_size)
        args["block_indices"] = rng.integers(-1, max_block + 2, (B, T, H, problem.block_counts)).astype(np.int32)
        args["block_counts"] = rng.integers(0, problem.block_counts + 1, (B, T, H)).astype(np.int32)
    return args


def _oracle_args(problem: Problem, args: dict) -> dict:
    """The library's keywords as the oracle's functions take them."""
    names = ["query", "key", "value", "g_cmp", "g_slc", "g_swa", "block_indices", "block_counts", "block_size",
             "window_size"]
    names += ["kv_lengths"] if problem.key_len else ["cu_seqlens", "compress_block_size", "compress_stride"]
    return {name: args.get(name) for name in names}


def _oracle_forward(problem: Problem, args: dict) -> dict:
    forward = oracle.nsa_forward_cached if problem.key_len else oracle.nsa_forward
    return forward(**_oracle_args(problem, args))


def _oracle_vjp(problem: Problem, args: dict, d_out) -> dict:
    vjp = oracle.nsa_vjp_cached if problem.key_len else oracle.nsa_vjp
    return vjp(d_out=d_out, **_oracle_args(problem, args))
