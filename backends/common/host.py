"""Host-side plumbing the Triton-family backends (triton, pallas_triton, pallas_mosaic) share.

Constants of the base-2 online softmax, power-of-two sizes, the selection's slot sizing and
declines, and the loop that registers a backend's pieces. Kernel bodies stay in their backends:
Triton and Pallas write the same step differently; only what is the same to the letter is here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
from collections.abc import Callable, Sequence

import jax.numpy as jnp

from ejkernel_nsa import config
from ejkernel_nsa.problem import NSAProblem, num_compressed_blocks
from ejkernel_nsa.registry import register
from ejkernel_nsa.registry.toolchain import gpu_failure

# The kernels run their softmax on exp2: scores are scaled by log2(e), and the lse goes back to
# natural units through ln(2).
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

# An unused selection slot (SPEC: block indices are padded with -1).
NO_BLOCK = -1

# Selected attention compares every pair of a token's slots in registers (the de-duplication,
# [SP, SP]) or lays them out as one TMA box (Mosaic, at most 256 rows); beyond 128 slots the
# kernels spill or no longer fit.
MAX_SLOTS = 128


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def padded_dim(dim: int) -> int:
    """A head dim padded to a power of two of at least 16 (the smallest `tt.dot` operand)."""
    return max(16, next_pow2(dim))


def too_many_slots(problem: NSAProblem, limit: int = MAX_SLOTS) -> str | None:
    """Selected attention's decline past `limit` slots per token."""
    if problem.num_slots > limit:
        return f"at most {limit} selected-block slots (S), got {problem.num_slots}"
    return None


# ---- compressed attention's dk/dv pass -----------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class CompressedTile:
    """One compressed-attention kernel's tiles (fwd, dq or dkv; Triton and Pallas Triton): `rows`
    query rows per program (consecutive tokens x the padded query heads of one kv head, the group
    split in chunks when it is wider), `block_tile` compressed blocks per step (per program in the
    dk/dv pass), and the launch options. A tile only reorders float32 sums, never what is computed:
    the tuned tables and `benchmarks/tile_sweep.py` pass these to the kernels' launches."""

    rows: int
    block_tile: int
    num_warps: int
    num_stages: int = 2


def head_dim_class(head_dim: int, value_dim: int) -> int:
    """The padded head-dim class (64, 128, 256, ...) the compressed-attention tile tables key on."""
    return max(64, padded_dim(head_dim), padded_dim(value_dim))


# One program per block tile; when those are too few to fill a GPU, the query tokens are split
# across programs (float32 partial sums, added in XLA) until about this many run.
DKV_TARGET_PROGRAMS = 512
DKV_MIN_SPLIT_TOKENS = 256


def dkv_split_tokens(num_tokens: int, block_programs: int) -> int:
    """Query tokens per dk/dv program: all of them, unless the block tiles alone (`block_programs`
    programs) are too few to fill the GPU."""
    splits = max(1, min(DKV_TARGET_PROGRAMS // max(block_programs, 1), cdiv(num_tokens, DKV_MIN_SPLIT_TOKENS)))
    return cdiv(num_tokens, splits)


# ---- selected attention's token-major tiles ----------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TokenConfig:
    """Token-major selected attention (forward, dq): one program per (token, kv head, chunk of
    query heads), the same tiles for the Triton and the Pallas Triton kernels."""

    rows: int  # query heads per program, padded for the dot
    head_chunks: int
    block_tile: int  # keys per inner step (a selected block is `subs` steps)
    subs: int
    num_warps: int
    num_stages: int = 2


def token_config(group: int, block_size: int, head_dim: int, value_dim: int, itemsize: int = 2) -> TokenConfig:
    rows = min(max(16, next_pow2(group)), 64)
    dkp, dvp = padded_dim(head_dim), padded_dim(value_dim)
    block_padded = max(16, next_pow2(block_size))
    # K and V tiles [tile, D] are held whole; float32 tiles take twice the registers.
    block_tile = min(block_padded, (64 if max(dkp, dvp) <= 128 else 32) * 2 // itemsize)
    big = rows * max(dkp, dvp) * itemsize >= 64 * 128 * 2
    # A 16-row tile is one small dot per key tile: two warps keep more programs resident per SM.
    # Measured on an H200 (Triton, G=16, D=128, bf16, 64k; benchmarks/NOTES.md): forward 16.6 ->
    # 15.3 ms, forward+backward 61.9 -> 59.2 ms against four warps (one warp: 15.1 / 67.5).
    num_warps = 8 if big else 2 if rows <= 16 and max(dkp, dvp) <= 128 else 4
    return TokenConfig(rows=rows, head_chunks=cdiv(group, rows), block_tile=block_tile,
                       subs=block_padded // block_tile, num_warps=num_warps)


# ---- selection: how many slots a kernel fills, and the rest ------------------------------------


def selection_outputs(num_slots: int, num_blocks: int) -> int:
    """The slots a selection kernel fills: a token never has more candidates than the packed axis
    has blocks, so slots past that stay NO_BLOCK."""
    return min(num_slots, num_blocks)


def too_many_candidates(problem: NSAProblem, limit: int, why: str) -> str | None:
    """A selection kernel's decline when the slots it fills (its running top-k) exceed `limit`."""
    num_blocks = num_compressed_blocks(problem.seq_len, problem.block_size, problem.num_seqs)
    if selection_outputs(problem.num_slots, num_blocks) > limit:
        return f"at most {limit} selected blocks ({why}), got {problem.num_slots}"
    return None


def block_counts_array(block_counts, batch: int, num_tokens: int, num_kv_heads: int):
    """`block_counts` (an int or `[B, T, H]`) as an int32 `[B, T, H]` array."""
    if isinstance(block_counts, int):
        return jnp.full((batch, num_tokens, num_kv_heads), block_counts, jnp.int32)
    return jnp.asarray(block_counts).astype(jnp.int32)


def pad_slots(chosen, num_slots: int):
    """Widen a selection's `[B, T, H, filled]` to `num_slots` with NO_BLOCK."""
    missing = num_slots - chosen.shape[-1]
    if missing <= 0:
        return chosen
    return jnp.pad(chosen, ((0, 0), (0, 0), (0, 0), (0, missing)), constant_values=NO_BLOCK)


# ---- the backend's registration ----------------------------------------------------------------


def interpreted_without_gpu(min_compute_capability: tuple[int, int] | None = None) -> bool:
    """A Pallas backend's kernels run in their interpreter: interpret mode asked for, and no GPU
    (of that capability) here. Read at trace time, so `config.interpret_mode()` applies."""
    return config.interpret_enabled() and gpu_failure(min_compute_capability) is not None


def cpu_only_interpreted(problem: NSAProblem, interpreted: Callable[[], bool], how: str) -> str | None:
    """The decline of CPU inputs by a backend whose kernels run on the CPU only when interpreted;
    `how` says how interpret mode is had."""
    if problem.platform == "cpu" and not interpreted():
        return f"inputs on the CPU run only in interpret mode ({how})"
    return None


def register_pieces(backend: str, module_names: Sequence[str], *, platforms: tuple[str, ...], priority: int,
                    decline_first: Callable[[NSAProblem], str | None] | None = None,
                    importing: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> None:
    """Import `ejkernel_nsa.backends.<backend>.<name>` for each name (inside `importing()`, e.g.
    Triton's interpreter environment, since kernels are defined on import) and register its `run`
    for its `PIECE`, declined by `decline_first` (if given), then by its own `supports`. A module
    declares what the registry should know of it by `COMPRESSION_GEOMETRY` (SPEC 9) and
    `LONGER_KEYS` (SPEC 10), both False when absent."""
    for name in module_names:
        with importing():
            module = importlib.import_module(f"ejkernel_nsa.backends.{backend}.{name}")
        supports = module.supports
        if decline_first is not None:
            supports = lambda problem, module=module: decline_first(problem) or module.supports(problem)  # noqa: E731
        register(module.PIECE, backend=backend, platforms=platforms, priority=priority, supports=supports,
                 compression_geometry=getattr(module, "COMPRESSION_GEOMETRY", False),
                 longer_keys=getattr(module, "LONGER_KEYS", False))(module.run)
