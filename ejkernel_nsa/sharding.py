"""NSA on a device mesh: batch and head sharding computed per shard, with no communication.

NSA never mixes batch rows, and a kv head only ever meets the query heads of its own group, so a
call on a batch- and/or head-sharded mesh is exactly the same call on each shard's local rows and
heads. Left to XLA's partitioner it is not computed that way: the kernels are custom calls with no
partitioning rule (replicated), and the XLA pieces' gathers and top-k make the partitioner gather
whole operands. So every public call runs under `jax.shard_map` over the batch and head axes:

- automatically, when its inputs carry explicit-axis shardings (`jax.make_mesh`'s default axes,
  `jax.set_mesh`): the layout is the query's (the key's for `mean_pool`); the other inputs are
  resharded to it; the output is sharded like the query;
- on demand, for any mesh (auto axes included, where shardings are invisible at trace time):
  `sharded(fn, mesh, batch_axis=..., head_axis=...)`.

Head sharding splits the `H` kv heads and, with them, their `G` query heads each (query head `i`
reads kv head `i // G`, and contiguous shards of `HQ = G * H` heads line up with contiguous shards
of `H`), so the mesh axis must divide `H`. The sequence axis cannot be split this way: a query
reads keys from other shards; `ejkernel_nsa.context_parallel` does that with explicit exchanges.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
from collections.abc import Callable
from typing import Any, cast

import jax
import numpy as np
from jax.sharding import PartitionSpec as P

# Arguments with no batch or head axis (replicated on every shard); every other array argument of
# the public calls is `[B, T or NB, heads, ...]` (or `[B]` / `[B, T]`).
REPLICATED_ARGS = frozenset({"cu_seqlens", "token_indices"})
BATCH_DIM, HEAD_DIM = 0, 2

AxisEntry = str | tuple[str, ...] | None


@dataclasses.dataclass(frozen=True)
class Layout:
    """How one call is split: the mesh, and the mesh axes of its batch and head dimensions."""

    mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh
    batch_axis: AxisEntry = None
    head_axis: AxisEntry = None
    # Explicit-axis inputs are resharded to the layout before the shard_map (the partitioner does
    # it for auto axes).
    explicit: bool = False

    @property
    def axis_names(self) -> frozenset[str]:
        return frozenset(axis_names_of(self.batch_axis) + axis_names_of(self.head_axis))

    def size(self, entry: AxisEntry) -> int:
        return math.prod(self.mesh.shape[name] for name in axis_names_of(entry))

    def spec(self, ndim: int, replicated: bool = False) -> P:
        if replicated:
            return P()
        entries = [self.batch_axis, None, self.head_axis][:ndim]
        return P(*entries)


def axis_names_of(entry: AxisEntry) -> tuple[str, ...]:
    """The mesh axis names of one partition-spec entry (a name, a tuple of names, or None)."""
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


def per_shard[F: Callable[..., Any]](fn: F) -> F:
    """Decorate a public NSA call so that explicitly sharded inputs run it per batch/head shard.

    Typed as returning `fn`'s own type: the wrapper takes the same arguments, so type checkers and
    `help()` see the public call's annotated signature rather than `(*args, **kwargs)`.
    """
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        layout = explicit_layout(bound.arguments)
        if layout is None:
            return fn(*args, **kwargs)
        return run_per_shard(fn, bound, layout)

    wrapper.unsharded = fn  # type: ignore[attr-defined]  # read back by `sharded`
    return cast(F, wrapper)


def sharded[F: Callable[..., Any]](fn: F, mesh: jax.sharding.Mesh, *, batch_axis: AxisEntry = None,
                                    head_axis: AxisEntry = None) -> F:
    """`fn` (any public NSA call) computed per shard of `mesh`'s `batch_axis` and `head_axis`.

    Works on auto and explicit meshes, inside or outside `jit`, forward and backward; the kernels
    run once per shard on the local rows and heads, and nothing is communicated (inputs not
    already laid out this way are resharded once on entry). `batch_axis` / `head_axis` are mesh
    axis names (or tuples of names), or None to leave that dimension whole.

    Example (8 devices; `q`, `k`, `v`, `g` as for `native_sparse_attention`)::

        mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
        nsa = sharded(ejkernel_nsa.native_sparse_attention, mesh, batch_axis="data", head_axis="model")
        out = jax.jit(nsa)(q, k, v, g_cmp=g, block_counts=16)
    """
    unsharded = getattr(fn, "unsharded", None)
    if unsharded is None:
        raise TypeError(f"fn: expected a public ejkernel_nsa call (native_sparse_attention, ...), got {fn!r}")
    if not isinstance(mesh, (jax.sharding.Mesh, jax.sharding.AbstractMesh)):
        raise TypeError(f"mesh: expected a jax.sharding.Mesh, got {type(mesh).__name__}")
    for name, entry in (("batch_axis", batch_axis), ("head_axis", head_axis)):
        for axis in axis_names_of(entry):
            if axis not in mesh.shape:
                raise ValueError(f"{name}: {axis!r} is not an axis of the mesh {dict(mesh.shape)}")
    if set(axis_names_of(batch_axis)) & set(axis_names_of(head_axis)):
        raise ValueError(f"head_axis: {head_axis!r} shares a mesh axis with batch_axis={batch_axis!r}")
    explicit = any(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types)
    layout = Layout(mesh, batch_axis, head_axis, explicit)
    signature = inspect.signature(unsharded)

    @functools.wraps(unsharded)
    def wrapper(*args, **kwargs):
        return run_per_shard(unsharded, signature.bind(*args, **kwargs), layout)

    return cast(F, wrapper)  # the same arguments and result as `fn`, for type checkers


def _array_arguments(arguments: dict) -> dict[str, jax.Array]:
    return {name: value for name, value in arguments.items() if isinstance(value, (jax.Array, np.ndarray))}


def _explicit_spec(x) -> tuple[object, P] | None:
    """The explicit-axis mesh and spec of `x`'s type, or None when it has no explicit sharding."""
    sharding = getattr(jax.typeof(x), "sharding", None)
    spec = getattr(sharding, "spec", None)
    if spec is None or all(entry is None for entry in spec):
        return None
    return sharding.mesh, spec


def explicit_layout(arguments: dict) -> Layout | None:
    """The layout of a call whose inputs carry explicit shardings, else None (the plain call).

    The reference is the query (the key when there is none): its batch and head entries are the
    layout; it must not be sharded on any other dimension.
    """
    arrays = _array_arguments(arguments)
    found = {name: s for name, x in arrays.items() if (s := _explicit_spec(x)) is not None}
    if not found:
        return None
    reference = next((name for name in ("query", "key") if name in arrays), next(iter(arrays)))
    mesh, spec = found.get(reference, next(iter(found.values())))
    if reference in found:
        for dim, entry in enumerate(spec):
            if entry is not None and dim not in (BATCH_DIM, HEAD_DIM):
                raise ValueError(
                    f"{reference}: sharded on dimension {dim} ({entry!r}, spec {spec}); NSA runs per shard of "
                    f"the batch (0) and head (2) dimensions only. Shard the sequence with "
                    f"ejkernel_nsa.context_parallel.context_parallel_nsa, or reshard {reference}"
                )
        batch_axis = spec[BATCH_DIM] if len(spec) > BATCH_DIM else None
        head_axis = spec[HEAD_DIM] if len(spec) > HEAD_DIM else None
    else:
        # The reference is replicated: every input is brought to that (replicated) layout.
        batch_axis = head_axis = None
    return Layout(mesh, batch_axis, head_axis, explicit=True)


def run_per_shard(fn: Callable, bound: inspect.BoundArguments, layout: Layout):
    arguments = dict(bound.arguments)
    arrays = _array_arguments(arguments)
    names = list(arrays)
    specs = []
    for name in names:
        x = arrays[name]
        replicated = name in REPLICATED_ARGS
        if not replicated:
            _check_divisible(name, x, layout)
        specs.append(layout.spec(x.ndim, replicated))
    values = [arrays[name] for name in names]
    if layout.explicit:
        values = [jax.sharding.reshard(x, spec) for x, spec in zip(values, specs, strict=True)]
    if not layout.axis_names:
        # Nothing is split: the plain call on the (replicated) inputs.
        return fn(**{**arguments, **dict(zip(names, values, strict=True))})

    def local_call(*local_values):
        return fn(**{**arguments, **dict(zip(names, local_values, strict=True))})

    mapped = jax.shard_map(
        local_call, mesh=layout.mesh, in_specs=tuple(specs), out_specs=layout.spec(3),
        axis_names=set(layout.axis_names), check_vma=False,
    )
    # Under jit: an eager shard_map over some axes of an explicit mesh mistypes its outputs.
    return jax.jit(mapped)(*values)


def _check_divisible(name: str, x, layout: Layout) -> None:
    for dim, entry, what in ((BATCH_DIM, layout.batch_axis, "batch"), (HEAD_DIM, layout.head_axis, "head")):
        if entry is None or x.ndim <= dim:
            continue
        parts = layout.size(entry)
        if x.shape[dim] % parts:
            extra = " (head sharding splits the kv heads with their query-head groups)" if what == "head" else ""
            raise ValueError(
                f"{name}: its {what} dimension {x.shape[dim]} (shape {x.shape}) is not divisible by the "
                f"{parts} shards of mesh axis {entry!r}{extra}"
            )
