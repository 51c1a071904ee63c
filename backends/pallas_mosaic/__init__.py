"""Pallas kernels lowered through Mosaic GPU (Hopper; CPU through Mosaic GPU's interpreter).

One module per piece (`compression`, `compressed_attention`, `selection`, `selected_attention`),
each with its `plgpu.kernel`s, its `custom_vjp` and the cases it declines; `tiles.py` holds what
they share (64-row tiles of tokens x query heads, swizzled shared-memory operands, the launch).
The sliding window has no implementation here: automatic resolution takes it from another
backend, and forcing `pallas_mosaic` on a call with a window raises `BackendError`. See
docs/pallas.md, "Mosaic GPU". Interpret mode: with `EJKERNEL_NSA_INTERPRET=1` on a machine without a
Hopper GPU, every kernel runs in `plgpu.InterpretGPUParams` mode on the CPU, and the registry
uses it only when forced.
"""

from ejkernel_nsa import config
from ejkernel_nsa.backends.common import host
from ejkernel_nsa.registry import Backend, register_backend
from ejkernel_nsa.registry.toolchain import gpu_failure, import_failure

NAME = "pallas_mosaic"
# Above the XLA fallback (0), below the Pallas Triton kernels (10) and Triton (20): every GPU test
# passes on an H100 (2026-11-25), and each piece timed alone there is slower than Pallas Triton's
# (benchmarks/results/*_pieces.json). Where registry/tuning.json holds a measurement, it decides.
PRIORITY = 5
MODULES = ("compression", "compressed_attention", "selection", "selected_attention")


def availability() -> str | None:
    failure = import_failure("jax.experimental.pallas.mosaic_gpu")
    if failure or config.interpret_enabled():
        return failure
    return gpu_failure(min_compute_capability=(9, 0))


def interpreted() -> bool:
    return host.interpreted_without_gpu((9, 0))


register_backend(Backend(NAME, "Pallas, Mosaic GPU lowering (Hopper)", availability, interpreted))


def _register_pieces() -> None:
    if import_failure("jax.experimental.pallas.mosaic_gpu"):
        return
    # Interpret mode is read per call (config.interpret_mode() may switch it, reversibly), so the
    # CPU platform is listed and checked in `supports`, as the Pallas Triton backend does.
    host.register_pieces(NAME, MODULES, platforms=("gpu", "cpu"), priority=PRIORITY,
                         decline_first=_on_cpu_only_interpreted)


def _on_cpu_only_interpreted(problem) -> str | None:
    how = f"{config.INTERPRET_ENV}=1 or interpret_mode(), no Hopper GPU"
    return host.cpu_only_interpreted(problem, interpreted, how)


_register_pieces()
