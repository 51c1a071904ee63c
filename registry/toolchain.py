"""Availability checks that several backends share: is a toolchain importable, is a GPU here."""

from __future__ import annotations

import importlib

import jax


def import_failure(module: str) -> str | None:
    """None when `module` imports, else the error (e.g. jax_triton on a CPU-only jaxlib)."""
    try:
        importlib.import_module(module)
    except Exception as error:  # a toolchain can fail with more than ImportError (e.g. RuntimeError)
        first_sentence = str(error).splitlines()[0].split(". ")[0].rstrip(":. ")
        return f"{module} cannot be imported: {type(error).__name__}: {first_sentence}"
    return None


def gpu_failure(min_compute_capability: tuple[int, int] | None = None) -> str | None:
    """None when an NVIDIA GPU (of at least that compute capability) is visible to JAX."""
    try:
        devices = jax.devices("gpu")
    except RuntimeError:
        return f"needs an NVIDIA GPU; JAX sees only {jax.default_backend()} devices"
    if min_compute_capability is not None:
        capability = getattr(devices[0], "compute_capability", "0.0")
        major, minor = (int(part) for part in str(capability).split(".")[:2])
        if (major, minor) < min_compute_capability:
            wanted = ".".join(map(str, min_compute_capability))
            return f"needs compute capability >= {wanted}, the GPU has {capability}"
    return None


def triton_kernel_decline(problem) -> str | None:
    """The limits every Triton-compiled kernel of ours shares, through jax-triton or Pallas's
    Triton lowering (the tiles are written for these dtypes and head widths); each piece adds its
    own. None when the problem is within them, else the reason."""
    if problem.dtype not in ("float32", "bfloat16", "float16"):
        return f"dtype {problem.dtype} (the kernels take float32, bfloat16, float16)"
    if max(problem.head_dim, problem.value_dim) > 256:
        return f"head dims up to 256, got Dk={problem.head_dim}, Dv={problem.value_dim}"
    return None
