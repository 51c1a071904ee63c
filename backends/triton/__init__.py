"""Triton kernels launched through jax-triton (NVIDIA GPUs; CPU through Triton's interpreter).

Each piece lives in its own module (`compression`, `compressed_attention`, `selection`,
`selected_attention`, `sliding_window`) with its kernels, its launch, its `custom_vjp` and the
cases it declines. Interpret mode: with `EJKERNEL_NSA_INTERPRET=1` in the environment when
`ejkernel_nsa` is imported on a machine without a GPU, the kernels are defined under
`TRITON_INTERPRET=1` and run in Triton's interpreter; the registry then uses them only when
forced, never by automatic choice. `TRITON_INTERPRET` is set only while our kernels are defined
and launched, then put back, so other Triton users of the process are not switched to the
interpreter; `interpret_mode()` cannot switch this backend (its kernels are fixed when defined).
"""

import os

from ejkernel_nsa import config
from ejkernel_nsa.registry import Backend, register_backend
from ejkernel_nsa.registry.toolchain import gpu_failure, import_failure

NAME = "triton"
# Above the XLA fallback; kernels of other backends compete through their own priorities.
PRIORITY = 20

from ejkernel_nsa.backends.common import host  # noqa: E402
from ejkernel_nsa.backends.triton import launch  # noqa: E402


def availability() -> str | None:
    # Whether the kernels are interpreted was fixed when they were defined (launch.INTERPRETED);
    # interpret mode itself is read now, so an `interpret_mode(False)` block turns them off.
    if launch.INTERPRETED:
        if config.interpret_enabled():
            return None
        return (f"its kernels were defined for Triton's interpreter ({config.INTERPRET_ENV}=1 at import, no GPU), "
                "and interpret mode is off here")
    failure = _import_jax_triton() or gpu_failure()
    if failure and config.interpret_enabled():
        failure += (f" (Triton's interpreter is chosen once, by {config.INTERPRET_ENV}=1 when ejkernel_nsa is "
                    "imported; interpret_mode() switches only the Pallas backends)")
    return failure


def _import_jax_triton() -> str | None:
    """Import jax_triton, undoing what its import does to the environment.

    jax_triton sets TRITON_CACHE_DIR to "" when imported. Its own compile path never reads
    Triton's cache, but every other Triton user in the process does: PyTorch's Triton kernels
    (fla's, say) then fail with "Could not create or locate cache dir". The user's setting, or its
    absence, is put back."""
    saved = os.environ.get("TRITON_CACHE_DIR")
    failure = import_failure("jax_triton")
    if saved is None:
        os.environ.pop("TRITON_CACHE_DIR", None)
    else:
        os.environ["TRITON_CACHE_DIR"] = saved
    return failure


register_backend(Backend(NAME, "Triton kernels via jax-triton (NVIDIA GPU)", availability,
                         interpret=lambda: launch.INTERPRETED))


# `decode`, `decode_compressed` and `decode_window` are a decoding step's selected attention,
# compressed branch and sliding window (SPEC section 10, one query per row): their own kernels,
# declining everything else, beside the full-length pieces, which decline decoding. The kernels
# are defined (`@triton.jit`) on import: under TRITON_INTERPRET=1 when interpreted.
host.register_pieces(NAME, ("compression", "compressed_attention", "selection", "selected_attention", "sliding_window",
                            "decode", "decode_compressed", "decode_window"),
                     platforms=("gpu", "cpu") if launch.INTERPRETED else ("gpu",), priority=PRIORITY,
                     importing=launch.triton_interpreter)
