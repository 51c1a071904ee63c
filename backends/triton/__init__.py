"""Triton kernels launched through jax-triton (NVIDIA GPUs; CPU through Triton's interpreter).

Each piece lives in its own module (`compression`, `compressed_attention`, `selection`,
`selected_attention`, `sliding_window`) with its kernels, its launch, its `custom_vjp` and the
cases it declines. Interpret mode: with `EJKERNEL_NSA_INTERPRET=1` in the environment when
`ejkernel_nsa` is imported on a machine without a GPU, the kernels are defined under
`TRITON_INTERPRET=1` and run in Triton's interpreter; the registry then uses them only when
forced, never by automatic choice.
"""

import os

from ejkernel_nsa import config
from ejkernel_nsa.registry import Backend, register, register_backend
from ejkernel_nsa.registry.toolchain import gpu_failure, import_failure

NAME = "triton"
# Above the XLA fallback; kernels of other backends compete through their own priorities.
PRIORITY = 20

if config.interpret_enabled() and gpu_failure() is not None:
    # Triton decides at definition time whether a kernel is compiled or interpreted.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from ejkernel_nsa.backends.triton import launch  # noqa: E402  (after TRITON_INTERPRET is settled)


def availability() -> str | None:
    if launch.INTERPRETED:
        return None
    return import_failure("jax_triton") or gpu_failure()


register_backend(Backend(NAME, "Triton kernels via jax-triton (NVIDIA GPU)", availability,
                         interpret=lambda: launch.INTERPRETED))


def _register_pieces() -> None:
    import importlib

    for module_name in ("compression", "compressed_attention", "selection", "selected_attention", "sliding_window"):
        module = importlib.import_module(f"ejkernel_nsa.backends.triton.{module_name}")
        register(module.PIECE, backend=NAME, platforms=("gpu", "cpu") if launch.INTERPRETED else ("gpu",),
                 priority=PRIORITY, supports=module.supports)(module.run)


_register_pieces()
