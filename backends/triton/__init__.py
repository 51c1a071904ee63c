"""Triton kernels launched through jax-triton (NVIDIA GPUs).

The kernels themselves are not written yet; until they are, this backend registers no piece, so
forcing it raises with the reason and automatic resolution never picks it.
"""

from ejkernel_nsa.registry import Backend, register_backend
from ejkernel_nsa.registry.toolchain import gpu_failure, import_failure


def availability() -> str | None:
    return import_failure("jax_triton") or gpu_failure()


register_backend(Backend("triton", "Triton kernels via jax-triton (NVIDIA GPU)", availability))
