"""Pallas kernels lowered through Triton (NVIDIA GPUs; CPU in interpret mode).

The kernels themselves are not written yet; until they are, this backend registers no piece.
"""

from ejkernel_nsa import config
from ejkernel_nsa.registry import Backend, register_backend
from ejkernel_nsa.registry.toolchain import gpu_failure, import_failure


def availability() -> str | None:
    failure = import_failure("jax.experimental.pallas.triton")
    if failure or config.interpret_enabled():
        return failure
    return gpu_failure()


def interpreted() -> bool:
    return config.interpret_enabled() and gpu_failure() is not None


register_backend(Backend("pallas_triton", "Pallas, Triton lowering (NVIDIA GPU)", availability, interpreted))
