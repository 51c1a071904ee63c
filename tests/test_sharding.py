"""NSA on 8 host devices: batch/head sharding and context parallelism against one device.

JAX fixes its device count at import, and the rest of the suite runs on one device, so the checks
run in one subprocess with `--xla_force_host_platform_device_count=8` (this file executed as a
script); each check is reported back and asserted as its own test here. Every check compares the
sharded call with the same call unsharded, values and gradients, and reads the collectives of the
compiled program (which ones, their shapes and bytes).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest

DEVICES = 8
CHECK_PREFIX = "SHARDING_CHECK "
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "collective-permute", "all-to-all")
ITEMSIZE = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "f64": 8}
VALUE_TOL, GRAD_TOL = 1e-5, 1e-4  # sharded vs unsharded float32: the same arithmetic, regrouped


# ---- the subprocess side ----------------------------------------------------------------------


def collectives(hlo: str) -> dict[str, list[tuple[str, tuple[int, ...]]]]:
    """The collectives of a compiled HLO module: per op name, the dtype and shape of each."""
    found: dict[str, list] = {op: [] for op in COLLECTIVES}
    pattern = re.compile(r"= (\w+)\[([\d,]*)\]\{[^}]*\} (" + "|".join(COLLECTIVES) + r")(?:-start)?\(")
    for match in pattern.finditer(hlo):
        dtype, dims, op = match.groups()
        found[op].append((dtype, tuple(int(d) for d in dims.split(",") if d)))
    return found


def bytes_of(entries) -> int:
    total = 0
    for dtype, shape in entries:
        size = ITEMSIZE[dtype]
        for d in shape:
            size *= d
        total += size
    return total


def _setup():
    import jax
    import jax.numpy as jnp
    import numpy as np

    def inputs(batch, tokens, q_heads, kv_heads, dim, seed):
        keys = jax.random.split(jax.random.key(seed), 6)
        q = jax.random.normal(keys[0], (batch, tokens, q_heads, dim))
        k = jax.random.normal(keys[1], (batch, tokens, kv_heads, dim))
        v = jax.random.normal(keys[2], (batch, tokens, kv_heads, dim))
        gates = [jax.random.uniform(keys[i], (batch, tokens, q_heads)) for i in (3, 4, 5)]
        return (q, k, v, *gates)

    def rel(a, b):
        # On the host: a sharded array's global norm needs no mesh this way.
        # Equal entries (-inf log-sum-exps of tokens that see no block included) count as no error.
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        with np.errstate(invalid="ignore"):
            difference = np.where(a == b, 0.0, a - b)
        return float(np.linalg.norm(difference) / max(np.linalg.norm(np.where(np.isfinite(b), b, 0.0)), 1e-30))

    return jax, jnp, inputs, rel


NSA_OPTIONS = dict(block_counts=2, block_size=16, window_size=16)


def _nsa_fn(fn, **extra):
    def call(q, k, v, g_cmp, g_slc, g_swa):
        return fn(q, k, v, g_cmp=g_cmp, g_slc=g_slc, g_swa=g_swa, **NSA_OPTIONS, **extra)

    return call


_REFERENCES: dict = {}


def _reference(name, reference, args, grads):
    """The one-device results, computed once per named case (checks share them)."""
    jax, jnp, _, _ = _setup()
    if (name, grads) not in _REFERENCES:
        out = jax.jit(reference)(*args)
        expected_grads = jax.jit(jax.grad(_loss(reference), tuple(range(len(args)))))(*args) if grads else None
        _REFERENCES[name, grads] = out, expected_grads
    return _REFERENCES[name, grads]


def _loss(fn):
    import jax.numpy as jnp

    return lambda *a: jnp.sum(jnp.sin(fn(*a)))


def _compare(fn, reference, args, reference_args, name, unpermute=lambda x: x, grads=True):
    """Values and gradients of `fn(*args)` against `reference(*reference_args)` (cached under
    `name`); returns the output and the compiled forward and gradient programs (each compiled
    once, run and read)."""
    jax, jnp, _, rel = _setup()
    expected, expected_grads = _reference(name, reference, reference_args, grads)
    forward = jax.jit(fn).lower(*args).compile()
    out = forward(*args)
    error = rel(unpermute(out), expected)
    assert error < VALUE_TOL, f"output differs from one device: relative L2 {error:.2e}"
    if not grads:
        return out, forward, None
    grad = jax.jit(jax.grad(_loss(fn), tuple(range(len(args))))).lower(*args).compile()
    for i, (g, e) in enumerate(zip(grad(*args), expected_grads, strict=True)):
        error = rel(unpermute(g), e)
        assert error < GRAD_TOL, f"gradient of argument {i} differs from one device: relative L2 {error:.2e}"
    return out, forward, grad


def _assert_no_collectives(compiled, what):
    found = collectives(compiled.as_text())
    used = {op: len(v) for op, v in found.items() if v}
    assert not used, f"{what}: collectives in the compiled program: {used}"


def check_batch_head_explicit_mesh():
    """`jax.make_mesh`'s default (explicit) axes: the inputs' shardings pick the per-shard path."""
    jax, jnp, inputs, _ = _setup()
    import ejkernel_nsa
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = jax.make_mesh((2, 2, 2), ("data", "model", "other"))
    args = inputs(4, 64, 4, 2, 16, seed=1)
    fn = _nsa_fn(ejkernel_nsa.native_sparse_attention)
    with jax.set_mesh(mesh):
        sharded_args = [jax.device_put(x, NamedSharding(mesh, P("data", None, "model"))) for x in args]
        out, forward, grad = _compare(fn, fn, sharded_args, args, "batch_head")
        assert tuple(out.sharding.spec)[:3] == ("data", None, "model"), f"output sharded as {out.sharding.spec}"
        _assert_no_collectives(forward, "forward")
        _assert_no_collectives(grad, "backward")


def check_batch_head_auto_mesh_wrapper():
    """Auto axes (shardings invisible at trace time): `sharding.sharded` names the axes."""
    jax, jnp, inputs, _ = _setup()
    import ejkernel_nsa
    from ejkernel_nsa.sharding import sharded
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "model"), axis_types=(AxisType.Auto,) * 3)
    args = inputs(4, 64, 4, 2, 16, seed=1)
    nsa = sharded(ejkernel_nsa.native_sparse_attention, mesh, batch_axis=("data", "fsdp"), head_axis="model")
    spec = P(("data", "fsdp"), None, "model")
    sharded_args = [jax.device_put(x, NamedSharding(mesh, spec)) for x in args]
    out, forward, grad = _compare(_nsa_fn(nsa), _nsa_fn(ejkernel_nsa.native_sparse_attention), sharded_args, args,
                                  "batch_head")
    assert tuple(out.sharding.spec)[:3] == tuple(spec), f"output sharded as {out.sharding.spec}"
    _assert_no_collectives(forward, "forward")
    _assert_no_collectives(grad, "backward")


def check_pieces_explicit_mesh():
    """Each public piece on explicitly sharded inputs equals the piece on one device."""
    jax, jnp, inputs, rel = _setup()
    import ejkernel_nsa as nsa
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    def pieces(q, k, v):
        k_cmp, v_cmp = nsa.mean_pool(k, v, 16)
        o_cmp, lse = nsa.compressed_attention(q, k_cmp, v_cmp, 16)
        indices = nsa.select_blocks(q, k_cmp, lse, 2, 16)
        return {"mean_pool": k_cmp, "compressed_attention": o_cmp, "lse": lse, "select_blocks": indices,
                "sliding_window_attention": nsa.sliding_window_attention(q, k, v, 16),
                "apply_native_sparse_attention": nsa.apply_native_sparse_attention(q, k, v, indices, 2, 16)}

    mesh = jax.make_mesh((4, 2), ("data", "model"))
    q, k, v, *_ = inputs(4, 64, 4, 2, 16, seed=3)
    expected = jax.jit(pieces)(q, k, v)
    with jax.set_mesh(mesh):
        placement = NamedSharding(mesh, P("data", None, "model"))
        got = jax.jit(pieces)(*(jax.device_put(x, placement) for x in (q, k, v)))
    for name, out in got.items():
        assert tuple(out.sharding.spec)[:3] == ("data", None, "model"), f"{name}: output sharded as {out.sharding.spec}"
        if name == "select_blocks":
            assert bool(jnp.all(jnp.asarray(out) == expected[name])), "select_blocks differs from one device"
        else:
            assert rel(out, expected[name]) < VALUE_TOL, f"{name}: relative L2 {rel(out, expected[name]):.2e}"


def check_varlen_head_sharded():
    """Packed sequences (`cu_seqlens`, replicated) with the heads split."""
    jax, jnp, inputs, rel = _setup()
    import ejkernel_nsa
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = jax.make_mesh((8,), ("model",))
    args = inputs(1, 96, 16, 8, 16, seed=4)
    cu_seqlens = jnp.array([0, 23, 64, 96], jnp.int32)
    fn = _nsa_fn(lambda *a, **kw: ejkernel_nsa.native_sparse_attention(*a, cu_seqlens=cu_seqlens, **kw))
    with jax.set_mesh(mesh):
        sharded_args = [jax.device_put(x, NamedSharding(mesh, P(None, None, "model"))) for x in args]
        _compare(fn, fn, sharded_args, args, "varlen", grads=False)  # the varlen backward is the unsharded one's


def check_sharding_errors():
    """Splits NSA cannot run locally are refused with the argument named."""
    jax, jnp, inputs, _ = _setup()
    import ejkernel_nsa
    from ejkernel_nsa.context_parallel import context_parallel_nsa
    from ejkernel_nsa.sharding import sharded
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    q, k, v, g, *_ = inputs(2, 64, 4, 2, 16, seed=5)
    mesh = jax.make_mesh((2, 4), ("data", "seq"))
    expectations = []
    with jax.set_mesh(mesh):
        q_seq = jax.device_put(q, NamedSharding(mesh, P(None, "seq")))
        expectations.append((lambda: ejkernel_nsa.native_sparse_attention(q_seq, k, v, g_cmp=g, block_size=16),
                             "query: sharded on dimension 1"))
    auto = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    expectations += [
        (lambda: sharded(ejkernel_nsa.native_sparse_attention, auto, head_axis="model")(q, k, v, g_cmp=g,
                                                                                         block_size=16),
         "key: its head dimension 2"),
        (lambda: sharded(ejkernel_nsa.native_sparse_attention, auto, batch_axis="nope"), "batch_axis: 'nope'"),
        (lambda: context_parallel_nsa(q, k, v, g_cmp=g, block_size=16, mesh=auto, seq_axis="model",
                                      cu_seqlens=jnp.array([0, 64])), "cu_seqlens"),
        (lambda: context_parallel_nsa(q, k, v, g_cmp=g, block_size=32, mesh=auto, seq_axis="model"),
         "whole blocks"),
    ]
    for thunk, needle in expectations:
        try:
            thunk()
        except ValueError as error:
            assert needle in str(error), f"expected {needle!r} in the error, got: {error}"
        else:
            raise AssertionError(f"no ValueError (expected one mentioning {needle!r})")


def check_interpreted_kernels_batch_sharded():
    """The Triton kernels (interpreted), forced, per batch shard: forward and backward equal one
    device, and the kernels run per shard (no collective). (One kernel backend: the interpreter
    is slow; every backend goes through the same per-shard wrapper.)"""
    jax, jnp, inputs, _ = _setup()
    import ejkernel_nsa
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = jax.make_mesh((2,), ("data",))
    args = inputs(2, 32, 2, 1, 16, seed=8)[:4]
    for backend in ("triton",):
        reason = ejkernel_nsa.backend_status().get(backend)
        if reason is not None:
            raise Skipped(f"{backend}: {reason}")

        def fn(q, k, v, g_cmp, backend=backend):
            return ejkernel_nsa.native_sparse_attention(q, k, v, g_cmp=g_cmp, block_counts=1, block_size=16,
                                                        backend=backend)

        _reference(f"interpreted {backend}", fn, args, True)  # outside the mesh: one device
        with jax.set_mesh(mesh):
            placed = [jax.device_put(x, NamedSharding(mesh, P("data"))) for x in args]
            _, forward, grad = _compare(fn, fn, placed, args, f"interpreted {backend}")
            _assert_no_collectives(forward, f"{backend} forward")
            _assert_no_collectives(grad, f"{backend} backward")


class Skipped(Exception):
    """A check that cannot run here (a backend's toolchain is missing)."""


def _cp_case(load_balance, axis_types, head_axis=None):
    jax, jnp, inputs, _ = _setup()
    import ejkernel_nsa
    from ejkernel_nsa.context_parallel import context_parallel_nsa, from_zigzag, to_zigzag
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    seq_parts = 4
    names = ("data", "seq") if head_axis is None else ("model", "seq")
    mesh = jax.make_mesh((2, seq_parts), names, axis_types=(axis_types,) * 2)
    batch_axis = "data" if head_axis is None else None
    args = inputs(2, 256, 4, 2, 16, seed=6)
    cp = _nsa_fn(lambda *a, **kw: context_parallel_nsa(*a, mesh=mesh, seq_axis="seq", batch_axis=batch_axis,
                                                       head_axis=head_axis, load_balance=load_balance, **kw))
    reference = _nsa_fn(ejkernel_nsa.native_sparse_attention)
    zig = load_balance == "zigzag"
    laid_out = [to_zigzag(x, seq_parts) if zig else x for x in args]
    with jax.set_mesh(mesh):
        placed = [jax.device_put(x, NamedSharding(mesh, P(batch_axis, "seq", head_axis))) for x in laid_out]
        _, forward, grad = _compare(cp, reference, placed, args, "context_parallel",
                                    unpermute=(lambda x: from_zigzag(x, seq_parts)) if zig else (lambda x: x))
        return placed, forward, grad


def check_context_parallel_contiguous_auto_mesh():
    """Sequence over 4 devices (and batch over 2): exact, with 4 all-gathers forward (compressed K,
    compressed V, K, V) and 4 reduce-scatters of their gradients backward."""
    jax, _, _, _ = _setup()
    placed, forward, grad = _cp_case("contiguous", jax.sharding.AxisType.Auto)
    fwd = collectives(forward.as_text())
    # Per device: its batch row, every token / block, both kv heads, Dk = Dv = 16, float32.
    expected_gathers = sorted([("f32", (1, 256 // 16, 2, 16))] * 2 + [("f32", (1, 256, 2, 16))] * 2)
    assert sorted(fwd["all-gather"]) == expected_gathers, f"forward all-gathers {fwd['all-gather']}"
    assert bytes_of(fwd["all-gather"]) == 2 * 4 * 2 * 16 * (16 + 256)
    others = {op: v for op, v in fwd.items() if v and op != "all-gather"}
    assert not others, f"forward: unexpected collectives {others}"
    bwd = collectives(grad.as_text())
    expected_scatters = sorted([("f32", (1, 4, 2, 16))] * 2 + [("f32", (1, 64, 2, 16))] * 2)
    assert sorted(bwd["reduce-scatter"]) == expected_scatters, f"backward reduce-scatters {bwd['reduce-scatter']}"
    assert not bwd["all-reduce"] and not bwd["collective-permute"], f"backward: {bwd}"


def check_context_parallel_zigzag_explicit_mesh():
    """Zigzag layout, sequence over 4 devices and heads over 2, on explicit axes."""
    jax, _, _, _ = _setup()
    placed, forward, _ = _cp_case("zigzag", jax.sharding.AxisType.Explicit, head_axis="model")
    fwd = collectives(forward.as_text())
    assert len(fwd["all-gather"]) == 4 and not fwd["all-reduce"], f"forward collectives {fwd}"


def check_context_parallel_given_selection_oracle():
    """The caller's block indices, sequence over 8 devices, against the float64 oracle."""
    jax, jnp, inputs, rel = _setup()
    import numpy as np
    from ejkernel_nsa.testing import oracle
    from ejkernel_nsa.context_parallel import context_parallel_nsa

    mesh = jax.make_mesh((8,), ("seq",), axis_types=(jax.sharding.AxisType.Auto,))
    q, k, v, g_cmp, g_slc, g_swa = inputs(1, 128, 2, 1, 16, seed=7)
    rng = np.random.default_rng(7)
    indices = rng.integers(-1, 8, size=(1, 128, 1, 3)).astype(np.int32)
    out = context_parallel_nsa(q, k, v, g_cmp, g_slc, jnp.asarray(indices), 3, 16, g_swa=g_swa, window_size=12,
                               mesh=mesh, seq_axis="seq")
    expected = oracle.nsa_forward(*(np.asarray(x) for x in (q, k, v, g_cmp, g_slc)), indices, 3, 16,
                                  g_swa=np.asarray(g_swa), window_size=12)
    error = rel(out, expected["o"])
    assert error < 1e-4, f"relative L2 {error:.2e} against the oracle (SPEC float32 bound 1e-4)"


def main() -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    only = sys.argv[1:]
    for name in _check_names():
        if only and name not in only:
            continue
        start = time.perf_counter()
        try:
            globals()[name]()
            record = {"name": name, "ok": True, "error": ""}
        except Skipped as reason:
            record = {"name": name, "ok": True, "error": "", "skipped": str(reason)}
        except Exception:  # noqa: BLE001 - every failure is reported to the test that asserts it
            record = {"name": name, "ok": False, "error": traceback.format_exc()}
        record["seconds"] = round(time.perf_counter() - start, 1)
        print(CHECK_PREFIX + json.dumps(record), flush=True)


# ---- the pytest side: one subprocess, one test per check ------------------------------------------


@pytest.fixture(scope="module")
def results() -> dict:
    # Interpret mode lets the kernel check force the Triton kernels on CPU; unforced calls still
    # choose the XLA backend.
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={DEVICES}", JAX_PLATFORMS="cpu",
               EJKERNEL_NSA_INTERPRET="1")
    env.pop("EJKERNEL_NSA_BACKEND", None)
    repo = Path(__file__).resolve().parent.parent
    env["PYTHONPATH"] = os.pathsep.join([str(repo), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    found = {}
    for line in proc.stdout.splitlines():
        if line.startswith(CHECK_PREFIX):
            record = json.loads(line[len(CHECK_PREFIX):])
            found[record["name"]] = record
    if not found:
        pytest.fail(f"the sharded checks did not run (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr[-4000:]}")
    return found


def _check_names() -> list[str]:
    return [name for name in globals() if name.startswith("check_")]


@pytest.mark.parametrize("name", _check_names())
def test_sharded(results, name):
    record = results.get(name)
    assert record is not None, f"{name} did not report (the subprocess stopped early?)"
    if record.get("skipped"):
        pytest.skip(record["skipped"])
    assert record["ok"], record["error"]


if __name__ == "__main__":
    main()
