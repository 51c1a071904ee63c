"""Row tiles, shared-memory layouts and the kernel launch shared by the Mosaic GPU pieces.

A wgmma needs 64 rows (one warpgroup). NSA queries come as `[B, T, G*H, D]` with small groups
(G = 1..16 is common), so a tile's 64 rows are `BT = 64 // HP` consecutive tokens times `HP`
query heads of one kv head (`HP = min(G, 64)`; larger groups are split into `HEAD_CHUNKS` head
chunks). `pack_rows` lays the query (or its cotangent) out as `[B, H * HEAD_CHUNKS, NT * 64, D]`,
so one tile is one contiguous `[64, D]` TMA box; padding rows (the group padded to `BT * HP <= 64`,
and the last tile's missing tokens) have position -1 and see nothing.

Head dims are zero-padded to what a swizzled wgmma operand needs (16, 32, 64 or a multiple of
64 elements): zero columns change no dot product, and padded output columns are sliced off.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu

from ejkernel_nsa.backends.common import host
from ejkernel_nsa.backends.common.host import LOG2E, cdiv  # noqa: F401 (the pieces read them here)
from ejkernel_nsa.problem import NSAProblem, TokenLayout

try:
    # Mosaic GPU's interpreter imports the Pallas fuser's jaxpr fusion on its first run, and that
    # import registers a new trace-context setting: a jit traced before it would miss its cache
    # once (a second compile for new cu_seqlens values). Importing it up front keeps the trace
    # context fixed. A private module: if it moves, only that one-time retrace comes back.
    import jax._src.pallas.fuser.jaxpr_fusion  # noqa: F401
except ImportError:
    pass

ROWS = 64  # one warpgroup's wgmma M
DTYPES = ("bfloat16", "float16")


def interpreted() -> bool:
    return host.interpreted_without_gpu((9, 0))


def common_decline(problem: NSAProblem, float32: bool = False) -> str | None:
    """The cases no Mosaic piece runs: float32 where the piece has no split path, big heads."""
    if problem.dtype not in DTYPES + (("float32",) if float32 else ()):
        return (f"dtype {problem.dtype}: this kernel runs wgmma on 16-bit operands only "
                f"(float32 operands would run as tf32, outside the float32 tolerance 1e-4); "
                f"supported: {', '.join(DTYPES + (('float32',) if float32 else ()))}")
    for name, dim in (("head_dim", problem.head_dim), ("value_dim", problem.value_dim)):
        if padded_dim(dim) > 256:
            return f"{name} {dim} > 256 (a [64, D] tile per operand must fit in shared memory)"
    if problem.block_size < 16 or problem.block_size > 128 or problem.block_size & (problem.block_size - 1):
        return f"block_size {problem.block_size}: the Mosaic kernels take powers of two in 16..128"
    return None


def padded_dim(dim: int) -> int:
    """Smallest width >= dim that a 16-bit swizzled wgmma operand takes: 16, 32, 64 or k*64."""
    for width in (16, 32, 64):
        if dim <= width:
            return width
    return -(-dim // 64) * 64


def swizzle_for(dtype, *widths) -> int:
    """The largest swizzle (bytes) whose row of `dtype` elements divides every width: the one
    swizzle that all of a kernel's wgmma operands can share."""
    itemsize = jnp.dtype(dtype).itemsize
    return next(s for s in (128, 64, 32) if all(w * itemsize % s == 0 for w in widths))


def smem(shape, dtype, swizzle: int | None = None):
    """A shared-memory tile with the (8, swizzle) tiling and swizzle wgmma operands require.

    Mosaic's layout inference gives the two smem operands of one wgmma the same tiling, so every
    operand of a kernel takes one `swizzle` (`swizzle_for` over the last dims of all of them);
    without it, the largest the tile's own last dim allows."""
    if swizzle is None:
        swizzle = swizzle_for(dtype, shape[-1])
    elems = swizzle // jnp.dtype(dtype).itemsize
    return plgpu.SMEM(shape, dtype, transforms=(plgpu.TilingTransform((8, elems)), plgpu.SwizzleTransform(swizzle)))


def barriers(copies: int):
    """Barriers for a kernel whose copies in flight at once, counted as pairs, take `copies`
    indices: twice that, since `issue` copies a two-part operand one part at a time."""
    return plgpu.Barrier(num_barriers=2 * copies)


# Shared memory one block may take on an H100 (227 KiB), less a margin for Mosaic's own use
# (barriers, alignment padding between buffers).
SMEM_LIMIT = 220 * 1024


# Pallas places each scratch buffer at a multiple of this many bytes (jax 0.11.2,
# `mosaic_gpu.core.SMEM_ALIGNMENT`).
SMEM_ALIGNMENT = 1024


def smem_bytes(scratch: dict) -> int:
    """Shared memory a kernel's scratch (name -> type) takes: its buffers, each rounded up to
    Pallas's 1 KiB alignment as the lowering places them (barriers are a few bytes)."""
    return sum(-(-math.prod(ref.shape) * jnp.dtype(ref.dtype).itemsize // SMEM_ALIGNMENT) * SMEM_ALIGNMENT
               for ref in scratch.values() if hasattr(ref, "shape"))


def smem_decline(kernels) -> str | None:
    """A reason if one of the `(name, scratch)` kernels would not fit in shared memory: checked
    from the problem's static shapes, so that a case Mosaic could not compile is declined first."""
    for name, scratch in kernels:
        need = smem_bytes(scratch)
        if need > SMEM_LIMIT:
            return (f"{name} would need {need // 1024} KiB of shared memory for these head dims, block "
                    f"size and dtype (at most {SMEM_LIMIT // 1024} KiB)")
    return None


def pad_axis(x, axis, size, value=0):
    extra = size - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


@dataclasses.dataclass(frozen=True)
class RowTiling:
    """How `(token, query head)` rows of one kv head fill 64-row tiles."""

    num_tokens: int
    num_kv_heads: int
    group: int

    @property
    def heads_per_chunk(self) -> int:  # HP
        return min(self.group, ROWS)

    @property
    def head_chunks(self) -> int:  # HEAD_CHUNKS
        return -(-self.group // self.heads_per_chunk)

    @property
    def tokens_per_tile(self) -> int:  # BT
        return ROWS // self.heads_per_chunk

    @property
    def num_tiles(self) -> int:  # NT
        return -(-self.num_tokens // self.tokens_per_tile)

    @property
    def num_rows(self) -> int:
        return self.num_tiles * ROWS

    def pack(self, x, width: int):
        """`[B, T, G*H, D]` -> `[B, H*HEAD_CHUNKS, NT*64, width]` (zero padding)."""
        B, T, _, D = x.shape
        HP, HEAD_CHUNKS, BT = self.heads_per_chunk, self.head_chunks, self.tokens_per_tile
        x = x.reshape(B, T, self.num_kv_heads, self.group, D)
        x = pad_axis(pad_axis(x, 3, HEAD_CHUNKS * HP), 4, width)
        x = x.reshape(B, T, self.num_kv_heads, HEAD_CHUNKS, HP, width).transpose(0, 2, 3, 1, 4, 5)
        x = pad_axis(x, 3, self.num_tiles * BT)
        x = x.reshape(B, self.num_kv_heads * HEAD_CHUNKS, self.num_tiles, BT * HP, width)
        return pad_axis(x, 3, ROWS).reshape(B, self.num_kv_heads * HEAD_CHUNKS, self.num_rows, width)

    def unpack(self, x, dim: int):
        """Inverse of `pack`: `[B, H*HEAD_CHUNKS, NT*64, W]` -> `[B, T, G*H, dim]`."""
        B, W = x.shape[0], x.shape[-1]
        HP, HEAD_CHUNKS, BT = self.heads_per_chunk, self.head_chunks, self.tokens_per_tile
        x = x.reshape(B, self.num_kv_heads, HEAD_CHUNKS, self.num_tiles, ROWS, W)[:, :, :, :, : BT * HP]
        x = x.reshape(B, self.num_kv_heads, HEAD_CHUNKS, self.num_tiles * BT, HP, W)[:, :, :, : self.num_tokens]
        x = x.transpose(0, 3, 1, 2, 4, 5).reshape(B, self.num_tokens, self.num_kv_heads, HEAD_CHUNKS * HP, W)
        return x[:, :, :, : self.group, :dim].reshape(B, self.num_tokens, self.num_kv_heads * self.group, dim)

    def pack_scalar(self, x):
        """`[B, T, G*H]` -> `[B, H*HEAD_CHUNKS, NT*64]`."""
        return self.pack(x[..., None], 1)[..., 0]

    def unpack_scalar(self, x):
        return self.unpack(x[..., None], 1)[..., 0]

    def row_token(self):
        """`[NT*64]` int32: the token of each row, -1 for padding rows (same for every head chunk)."""
        rows = jnp.arange(ROWS, dtype=jnp.int32)
        tiles = jnp.arange(self.num_tiles, dtype=jnp.int32)[:, None]
        HP, BT = self.heads_per_chunk, self.tokens_per_tile
        token = tiles * BT + rows[None, :] // HP
        valid = (rows[None, :] < BT * HP) & (token < self.num_tokens)
        return jnp.where(valid, token, -1).reshape(-1)

    def per_row(self, per_token, fill):
        """A `[T]` per-token array spread over the rows, `fill` on padding rows."""
        token = self.row_token()
        return jnp.where(token >= 0, per_token[jnp.maximum(token, 0)], fill).astype(jnp.int32)

    def row_meta(self, layout: TokenLayout, block_size: int):
        """`[NT, 4, 64]` int32 per tile: token index, position, first packed compressed block, and
        one past the last complete block the row sees (`first_block + (pos + 1) // BS`, computed
        here so that no kernel divides vectors). Padding rows get token and position -1 and an
        empty block range: they see nothing."""
        pos = self.per_row(layout.pos, -1)
        first_block = self.per_row(layout.first_block, 0)
        rows = jnp.stack([
            self.row_token(),
            pos,
            first_block,
            jnp.where(pos >= 0, first_block + (pos + 1) // block_size, 0),
        ])
        return rows.reshape(4, self.num_tiles, ROWS).transpose(1, 0, 2)


META_TOKEN, META_POS, META_FIRST_BLOCK, META_CMP_END = range(4)


def kernel(body, *, out_type, grid, grid_names, scratch, name):
    """`plgpu.kernel` with this backend's interpret switch: on CPU (EJKERNEL_NSA_INTERPRET=1) the
    kernel runs in Mosaic GPU's interpreter, on a Hopper GPU it is compiled.

    `scratch` maps each of `body`'s keyword-only scratch parameters to its type. Pallas allocates
    scratch and passes it by position, in this order; `body` gets it by name, so a buffer cannot
    reach the wrong parameter when a list is edited."""
    names = tuple(scratch)

    def by_name(*refs):
        split = len(refs) - len(names)
        return body(*refs[:split], **dict(zip(names, refs[split:])))

    params = dict(out_type=out_type, grid=grid, grid_names=grid_names, scratch_types=list(scratch.values()))
    if interpreted():
        params["interpret"] = plgpu.InterpretGPUParams()
    else:
        params["compiler_params"] = plgpu.CompilerParams(approx_math=False)
    by_name.__name__ = name
    return plgpu.kernel(by_name, **params)


def load_rows(ref):
    """A `[64]` per-row vector from shared memory, laid out to broadcast along a wgmma row."""
    return plgpu.load(ref, layout=plgpu.Layout.WGMMA.reduce(1))


def load_cols(ref):
    """A `[64]` per-row vector laid out to broadcast along a wgmma column (transposed tiles)."""
    return plgpu.load(ref, layout=plgpu.Layout.WGMMA.reduce(0))


def iota(shape, dim):
    return plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=plgpu.Layout.WGMMA)


def rows(vector, shape):
    return jax.lax.broadcast_in_dim(vector, shape, [0])


def cols(vector, shape):
    return jax.lax.broadcast_in_dim(vector, shape, [1])


def matmul(a_smem, b_smem, shape):
    """`a @ b` into a fresh float32 accumulator. The interpreter has no `run_state`, so products
    are accumulated in registers by the caller instead of with `ACC.init`."""

    def body(acc_ref):
        plgpu.wgmma(acc_ref, a_smem, b_smem)
        return acc_ref[...]

    return pl.run_scoped(body, plgpu.ACC(shape, jnp.float32))


def zeros(shape):
    return plgpu.layout_cast(jnp.zeros(shape, jnp.float32), plgpu.Layout.WGMMA)


def operand_dtype(dtype):
    """The 16-bit type the tensor cores see: the input's own, or bfloat16 parts of a float32."""
    return jnp.dtype(dtype) if jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) else jnp.dtype(jnp.bfloat16)


def split(x, parts: int, dtype):
    """`x` as `parts` 16-bit terms stacked on a new axis -3 (before rows and width): `hi`, and
    with 2 parts also `lo = x - hi`. Two bfloat16 parts carry 16 mantissa bits, so products of
    split operands (all pairs but lo*lo) are float32-accurate to ~1e-5 on 16-bit tensor cores."""
    if parts == 1:
        return x.astype(dtype)[..., None, :, :]
    x = x.astype(jnp.float32)
    # `hi` rounded by `reduce_precision`, not by `x.astype(dtype).astype(f32)`: XLA on GPU removes
    # such conversion round trips (xla_allow_excess_precision, on by default), which made `lo`
    # zero on the H100 (float32 error 1.3e-3). `hi` then converts to `dtype` exactly.
    info = jnp.finfo(dtype)
    high = jax.lax.reduce_precision(x, exponent_bits=info.nexp, mantissa_bits=info.nmant)
    return jnp.stack([high.astype(dtype), (x - high).astype(dtype)], axis=-3)


def store_parts(ref, x, parts: int):
    """Registers -> a `[parts, R, C]` shared-memory operand (see `split`), fenced for wgmma."""
    high = x.astype(ref.dtype)
    ref.at[0][...] = high
    if parts == 2:
        ref.at[1][...] = (x - high.astype(jnp.float32)).astype(ref.dtype)
    plgpu.commit_smem()


def matmul_parts(a_smem, b_smem, shape, transpose_b: bool = False):
    """`sum a_i @ b_j` over the parts pairs (i, j) except lo*lo (`[P, M, K]` x `[P, K, N]`, or
    `[P, N, K]` transposed)."""
    total = None
    for i in range(a_smem.shape[0]):
        for j in range(b_smem.shape[0]):
            if i + j > 1:
                continue
            b = b_smem.at[j].T if transpose_b else b_smem.at[j]
            term = matmul(a_smem.at[i], b, shape)
            total = term if total is None else total + term
    return total


def parts_of(dtype) -> int:
    """16-bit terms per operand of a problem in `dtype`: 1 for 16-bit inputs, 2 for float32."""
    return 1 if jnp.dtype(dtype) == operand_dtype(dtype) else 2


class Operands:
    """For a kernel's static shape with a `dtype` field (the problem's): the 16-bit type its
    wgmma operands take and how many parts each float operand is split into."""

    dtype: str

    @property
    def operand(self):
        return operand_dtype(self.dtype)

    @property
    def parts(self) -> int:
        return parts_of(self.dtype)


def row_tile_program(num_kv_heads: int, head_chunks: int):
    """This program's row tile on the grid `(tile, batch x kv head x head chunk)`: the tile, the
    batch, the head-chunk row block `hn`, its kv head, and the tile's rows."""
    tile, bh = jax.lax.axis_index("tile"), jax.lax.axis_index("bh")
    b, hn = div(bh, num_kv_heads * head_chunks), rem(bh, num_kv_heads * head_chunks)
    return tile, b, hn, div(hn, head_chunks), pl.ds(tile * ROWS, ROWS)


# Inside kernels, integer division of the (non-negative) scalars goes through lax.div / lax.rem,
# as the jax Mosaic GPU examples do, rather than jnp's floor division (sign fix-ups).
def div(a, b):
    return jax.lax.div(a, jnp.asarray(b, jnp.int32))


def rem(a, b):
    return jax.lax.rem(a, jnp.asarray(b, jnp.int32))


def _copies(src, dst):
    """A `[2, R, W]` two-part operand (`split`) goes as one TMA copy per part: with the parts axis,
    the tiled box of a part `W` > 64 wide would take 6 strided dimensions, and TMA (Mosaic's
    lowering) takes at most 5."""
    if len(dst.shape) == 3 and dst.shape[0] == 2:
        return [(src.at[part], dst.at[part]) for part in range(2)]
    return [(src, dst)]


def issue(pairs, bars, first: int = 0):
    """Start a TMA copy for each (gmem ref, smem ref) pair, one barrier each from `first` (two for
    a two-part operand); returns the barrier indices to `wait` on."""
    used = []
    for pair in pairs:
        for src, dst in _copies(*pair):
            plgpu.copy_gmem_to_smem(src, dst, bars.at[first + len(used)])
            used.append(first + len(used))
    return used


def wait(bars, used):
    for n in used:
        plgpu.barrier_wait(bars.at[n])


def fetch(pairs, bars, first: int = 0):
    """TMA-copy each (gmem ref, smem ref) pair (`issue`) and wait for all."""
    wait(bars, issue(pairs, bars, first))


def store(pairs):
    """Registers already written to shared memory -> gmem, for each (smem, gmem) pair."""
    plgpu.commit_smem()
    for src, dst in pairs:
        plgpu.copy_smem_to_gmem(src, dst)
    plgpu.wait_smem_to_gmem(0)


def softmax_init(width: int):
    """Online-softmax state of a row tile: accumulator, running max (log2 units), running sum."""
    row = plgpu.Layout.WGMMA.reduce(1)
    return (zeros((ROWS, width)), plgpu.layout_cast(jnp.full((ROWS,), -jnp.inf, jnp.float32), row),
            plgpu.layout_cast(jnp.zeros((ROWS,), jnp.float32), row))


def softmax_step(s, visible, m, l):
    """One key tile of an online softmax over log2-scaled scores `s`: returns the tile's
    unnormalized probabilities, the factor rescaling the accumulator, and the new max and sum."""
    s = jnp.where(visible, s, -jnp.inf)
    m_new = jnp.maximum(m, s.max(axis=1))
    # A row that has seen nothing keeps max -inf: shift by 0 so exp2 gives 0, not NaN.
    shift = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    alpha = jnp.exp2(m - shift)
    p = jnp.where(visible, jnp.exp2(s - rows(shift, s.shape)), 0.0)
    return p, alpha, m_new, l * alpha + p.sum(axis=1)


def softmax_finish(acc, m, l):
    """The normalized output (0 for a row that saw nothing) and its lse in log2 units (-inf)."""
    seen = l > 0
    safe_l = jnp.where(seen, l, 1.0)
    return acc / rows(safe_l, acc.shape), jnp.where(seen, m + jnp.log2(safe_l), -jnp.inf)


def saved_softmax(lse_smem, delta_smem, load, spread, shape):
    """The forward's lse (natural units) and `delta` for a backward tile, broadcast with `spread`
    (`rows` or `cols`): whether the row saw anything, lse in log2 units (0 where not), delta."""
    lse = load(lse_smem)
    # Not `lse > -inf`: a row whose output saw a non-finite value comes with lse NaN
    # (`poisoned_rows`), and must keep it, so that its visible probabilities (its own gradients)
    # are NaN while its masked ones stay 0.
    seen = lse != -jnp.inf
    return (spread(seen, shape), spread(jnp.where(seen, lse * LOG2E, 0.0), shape),
            spread(load(delta_smem), shape))


# ---- SPEC 8 containment (backends/common/containment.py) ----------------------------------------
# The kernels read keys and values zeroed where non-finite. Which rows saw a non-finite one is
# known in XLA before the launch (each row's visible key range is part of its metadata), and the
# kernels load TMA boxes, not per-row gathers: so the flag is gathered from the prefix count in
# XLA, and applied to the kernel's packed output there too (one `where`, fused into the unpack
# copy), nothing in the kernels.


def poisoned_rows(tiling: RowTiling, seen):
    """`[B, T, H]` bool (the (token, kv head) saw a non-finite key or value) -> `[B, H*HEAD_CHUNKS,
    NT*64]` bool over the packed query rows (every query head of the kv head's group)."""
    per_head = jnp.repeat(seen, tiling.group, axis=2)  # query head i belongs to kv head i // G
    return tiling.pack_scalar(per_head.astype(jnp.int32)) > 0


def poison(o_rows, bad_rows):
    """The packed output `[B, HN, rows, D]` with NaN on the `poisoned_rows`."""
    return jnp.where(bad_rows[..., None], jnp.asarray(jnp.nan, o_rows.dtype), o_rows)
