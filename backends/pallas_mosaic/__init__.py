"""Pallas kernels lowered through Mosaic GPU (Hopper; CPU in interpret mode).

The kernels themselves are not written yet; until they are, this backend registers no piece.
"""

from ejkernel_nsa import config
from ejkernel_nsa.registry import Backend, register_backend
from ejkernel_nsa.registry.toolchain import gpu_failure, import_failure


def availability() -> str | None:
    failure = import_failure("jax.experimental.pallas.mosaic_gpu")
    if failure or config.interpret_enabled():
        return failure
    return gpu_failure(min_compute_capability=(9, 0))


def interpreted() -> bool:
    return config.interpret_enabled() and gpu_failure((9, 0)) is not None


register_backend(Backend("pallas_mosaic", "Pallas, Mosaic GPU lowering (Hopper)", availability, interpreted))
