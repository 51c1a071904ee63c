"""NSA problems drawn by hypothesis, their random inputs, and the SPEC's comparison rules."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
from hypothesis import strategies as st

# SPEC section 8's tolerances and error, shared with the installed check (`ejkernel-nsa check`).
from ejkernel_nsa.testing import TOLERANCES, oracle, rel_l2


@dataclasses.dataclass(frozen=True)
class Case:
    batch: int
    seq_len: int
    group: int
    kv_heads: int
    head_dim: int
    value_dim: int
    block_size: int
    num_slots: int
    window_size: int
    dtype: str
    cu_seqlens: tuple[int, ...] | None
    g_cmp: bool
    g_slc: bool
    per_token_counts: bool
    given_indices: bool
    seed: int
    # SPEC section 9 (None: the defaults l = d = block_size); `supplied`: random key_cmp/value_cmp.
    compress_block_size: int | None = None
    compress_stride: int | None = None
    supplied: bool = False

    @property
    def num_q_heads(self) -> int:
        return self.group * self.kv_heads

    @property
    def g_swa(self) -> bool:
        return self.window_size > 0


@st.composite
def cases(draw, dtypes=("float32", "bfloat16"), groups=(1, 2, 3, 4, 8, 16), max_blocks=4) -> Case:
    """One NSA problem: every option of the contract, at sizes the float64 oracle runs quickly."""
    block_size = draw(st.sampled_from((16, 32, 64)))
    group = draw(st.sampled_from(groups))
    kv_heads = draw(st.sampled_from((1, 2) if group <= 8 else (1,)))
    varlen = draw(st.booleans())
    seq_len = draw(st.integers(1, max_blocks * block_size + block_size // 2))
    cu_seqlens = None
    if varlen:
        cuts = draw(st.lists(st.integers(0, seq_len), max_size=3))
        cu_seqlens = tuple([0, *sorted(cuts), seq_len])
    given = draw(st.booleans())
    window = draw(st.sampled_from((0, 0, 1, 7, block_size, 3 * block_size)))
    return Case(
        batch=1 if varlen else draw(st.integers(1, 2)),
        seq_len=seq_len,
        group=group,
        kv_heads=kv_heads,
        head_dim=draw(st.sampled_from((16, 32))),
        value_dim=draw(st.sampled_from((16, 24, 32))),
        block_size=block_size,
        num_slots=draw(st.integers(1, 5)),
        window_size=window,
        dtype=draw(st.sampled_from(dtypes)),
        cu_seqlens=cu_seqlens,
        g_cmp=draw(st.booleans()) if given else True,
        g_slc=draw(st.booleans()),
        per_token_counts=draw(st.booleans()),
        given_indices=given,
        seed=draw(st.integers(0, 2**31 - 1)),
    )


# SPEC section 9 geometries (l, d, l'): the paper's, its half, overlap without a coarser selection
# block, a coarser selection block without overlap, and l longer than l'.
GEOMETRIES = ((32, 16, 64), (16, 8, 32), (16, 16, 32), (8, 8, 32), (32, 8, 16))


@st.composite
def geometry_cases(draw, dtypes=("float32", "bfloat16"), groups=(1, 2, 3, 4, 8, 16)) -> Case:
    """A `cases` problem with SPEC 9's geometry, possibly with supplied compressed blocks, over at
    most three selection blocks (the oracle's transfer loops stay quick)."""
    base = draw(cases(dtypes, groups))
    length, stride, block_size = draw(st.sampled_from(GEOMETRIES))
    seq_len = draw(st.integers(1, 3 * block_size + block_size // 2))
    cu_seqlens = None
    if base.cu_seqlens is not None:
        cuts = draw(st.lists(st.integers(0, seq_len), max_size=3))
        cu_seqlens = tuple([0, *sorted(cuts), seq_len])
    window = draw(st.sampled_from((0, 0, 5, block_size)))
    supplied = draw(st.booleans())
    return dataclasses.replace(
        base, seq_len=seq_len, cu_seqlens=cu_seqlens, block_size=block_size, window_size=window,
        compress_block_size=length, compress_stride=stride, supplied=supplied,
        g_cmp=True if supplied else base.g_cmp,
    )


def make_inputs(case: Case) -> dict:
    """Fresh random inputs in the case's dtype (NumPy arrays, already rounded to that dtype, so the
    oracle sees exactly what the backend sees)."""
    rng = np.random.default_rng(case.seed)
    B, T, HQ, H = case.batch, case.seq_len, case.num_q_heads, case.kv_heads

    def normal(*shape):
        return np.asarray(jnp.asarray(rng.standard_normal(shape), case.dtype))

    def gate():
        return np.asarray(jnp.asarray(1 / (1 + np.exp(-rng.standard_normal((B, T, HQ)))), case.dtype))

    args = dict(
        query=normal(B, T, HQ, case.head_dim),
        key=normal(B, T, H, case.head_dim),
        value=normal(B, T, H, case.value_dim),
        g_cmp=gate() if case.g_cmp else None,
        g_slc=gate() if case.g_slc else None,
        g_swa=gate() if case.g_swa else None,
        block_size=case.block_size,
        window_size=case.window_size,
        cu_seqlens=None if case.cu_seqlens is None else np.asarray(case.cu_seqlens, np.int32),
    )
    if case.per_token_counts:
        args["block_counts"] = rng.integers(0, case.num_slots + 1, (B, T, H)).astype(np.int32)
        args["max_block_counts"] = case.num_slots
    else:
        args["block_counts"] = case.num_slots
    if case.given_indices:
        # Empty slots, duplicates and blocks in the future: all must be ignored as SPEC section 4 says.
        max_block = -(-T // case.block_size)
        args["block_indices"] = rng.integers(-1, max_block + 2, (B, T, H, case.num_slots)).astype(np.int32)
    if case.compress_block_size is not None:
        args.update(compress_block_size=case.compress_block_size, compress_stride=case.compress_stride)
    if case.supplied:
        num_seqs = None if case.cu_seqlens is None else len(case.cu_seqlens) - 1
        rows = -(-T // case.compress_stride) if num_seqs is None else T // case.compress_stride + num_seqs
        args.update(key_cmp=normal(B, rows, H, case.head_dim), value_cmp=normal(B, rows, H, case.value_dim))
    return args


def oracle_kwargs(args: dict) -> dict:
    """The library's keyword names mapped onto the oracle's."""
    kwargs = dict(args)
    kwargs["scale"] = kwargs.pop("softmax_scale", None)
    return kwargs


def assert_close(name: str, actual, expected, tolerance: float) -> None:
    error = rel_l2(actual, expected)
    assert error < tolerance, f"{name}: relative L2 error {error:.3g} >= {tolerance:g}"


def well_separated_heads(forward: dict, args: dict, case: Case) -> np.ndarray:
    """`[B, T, HQ]`: query heads whose group's computed selection is not a near tie (SPEC 8)."""
    separated = oracle.near_tie_mask(forward["scores"], args["block_counts"], forward["num_slots"], case.group)
    return np.repeat(separated, case.group, axis=2)


def same_slot_sets(actual, expected, where) -> np.ndarray:
    """`[B, T, H]` True where the two selections hold the same set of blocks (order and the -1
    padding aside), or where `where` excludes the pair."""
    actual = np.sort(np.asarray(actual), axis=-1)
    expected = np.sort(np.asarray(expected), axis=-1)
    return np.all(actual == expected, axis=-1) | ~where
