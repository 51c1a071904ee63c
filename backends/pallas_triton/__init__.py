"""Pallas kernels lowered through Triton (NVIDIA GPUs; CPU in interpret mode).

Each piece lives in its own module (`compression`, `compressed_attention`, `selection`,
`selected_attention`, `sliding_window`) with its kernels (`pl.pallas_call`), its `custom_vjp`
and the cases it declines; `common` holds what they share. Interpret mode: with
`EJKERNEL_NSA_INTERPRET=1` (or inside `ejkernel_nsa.config.interpret_mode()`) on a machine without
a GPU, the kernels run in the Pallas interpreter (`interpret=True`); the registry then uses them
only when forced, never by automatic choice. See docs/pallas.md.
"""

from ejkernel_nsa import config
from ejkernel_nsa.problem import NSAProblem
from ejkernel_nsa.backends.common import host
from ejkernel_nsa.registry import Backend, register_backend
from ejkernel_nsa.registry.toolchain import gpu_failure, import_failure

NAME = "pallas_triton"
# Below the Triton backend (20), above the XLA fallback (0).
PRIORITY = 10


def availability() -> str | None:
    failure = import_failure("jax.experimental.pallas.triton")
    if failure or config.interpret_enabled():
        return failure
    return gpu_failure()


def interpreted() -> bool:
    """The kernels run in the Pallas interpreter: interpret mode asked for, and no GPU here
    (read at trace time, so `config.interpret_mode()` applies; the kernels' `interpret=` flag)."""
    return host.interpreted_without_gpu()


register_backend(Backend(NAME, "Pallas, Triton lowering (NVIDIA GPU)", availability, interpreted))


def _on_cpu_only_interpreted(problem: NSAProblem) -> str | None:
    return host.cpu_only_interpreted(problem, interpreted, "EJKERNEL_NSA_INTERPRET=1, no GPU")


# Interpret mode is decided per call (config.interpret_mode() may switch it), so the CPU platform
# is listed and checked in `supports`.
host.register_pieces(NAME, ("compression", "compressed_attention", "selection", "selected_attention", "sliding_window"),
                     platforms=("gpu", "cpu"), priority=PRIORITY, decline_first=_on_cpu_only_interpreted)
