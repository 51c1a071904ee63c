"""What every Triton piece shares: launching a kernel from JAX, and the compile specs CI checks.

Kernels are plain `@triton.jit` functions, importable wherever `triton` is installed; only the
launch needs `jax_triton`, which refuses to import on a CPU-only jaxlib, so it is imported here,
at call time. CI has no GPU: it compiles every kernel for sm_90 from the `CompileSpec`s that each
module lists, with the same constexprs its launches use.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import os
import threading
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from ejkernel_nsa import config
from ejkernel_nsa.backends.common.host import cdiv, next_pow2  # noqa: F401 (the pieces read them here)
from ejkernel_nsa.registry.toolchain import gpu_failure, triton_kernel_decline

# Hopper: what the kernels are tuned for, and what CI compiles them for.
TARGET_ARCH = 90


def triton_call(*args, kernel, out_shape, grid, **options):
    """`jax_triton.triton_call`: inputs first, then one pointer per output, in that order.

    Under `jax.vmap` the launch repeats once per mapped element (jax_triton has no batching
    rule, and a kernel's grid cannot know which axis is the mapped one): correct for every
    kernel, and a caller who wants one launch folds the mapped axis into the batch axis.

    When the kernels were defined under `TRITON_INTERPRET=1` (the Triton backend's interpret
    mode, see `backends/triton/__init__.py`) they run in Triton's NumPy interpreter instead,
    through a host callback: slow, but the whole JAX wrapper, custom_vjp included, then runs and
    is tested on a machine without a GPU.
    """
    is_array = [_is_array(a) for a in args]

    def with_arrays(arrays):
        arrays = iter(arrays)
        return [next(arrays) if array else a for a, array in zip(args, is_array)]

    @jax.custom_batching.custom_vmap
    def launch(*arrays):
        arrays = [jnp.asarray(a) for a in arrays]
        full_args = with_arrays(arrays)
        if INTERPRETED:
            outs = _interpreted_call(full_args, kernel, out_shape, grid, options)
        else:
            import jax_triton

            outs = jax_triton.triton_call(*full_args, kernel=kernel, out_shape=out_shape, grid=grid, **options)
        # One array for one output shape; a tuple, always, for a sequence of them.
        return tuple(outs) if isinstance(out_shape, (list, tuple)) else outs

    @launch.def_vmap
    def launch_per_element(axis_size, in_batched, *arrays):
        def one(sliced):
            sliced = iter(sliced)
            return launch(*[next(sliced) if batched else a for a, batched in zip(arrays, in_batched)])

        outs = jax.lax.map(one, [a for a, batched in zip(arrays, in_batched) if batched])
        return outs, jax.tree.map(lambda _: True, outs)

    return launch(*[a for a, array in zip(args, is_array) if array])


def _is_array(value) -> bool:
    """Arrays go to the kernel as pointers, Python scalars as values. Tracing can hand us array
    constants that are not `jax.Array`s (NumPy-backed literals), so look at the shape, not the type."""
    return hasattr(value, "shape") and hasattr(value, "dtype")


# Triton decides when a kernel is defined whether it is compiled or interpreted: once per process,
# from the environment at import (the user's own TRITON_INTERPRET=1 included), never from an
# `interpret_mode()` block that happens to surround the first import.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1" or (
    config.interpret_requested_by_environment() and gpu_failure() is not None
)
_interpreter_env_lock = threading.RLock()


@contextlib.contextmanager
def triton_interpreter():
    """`TRITON_INTERPRET=1` for this block only when our kernels are interpreted (Triton reads it
    when a kernel is defined and while one is interpreted), then the process's own value back, so
    other Triton users in the process (PyTorch's, say) keep compiling."""
    if not INTERPRETED:
        yield
        return
    with _interpreter_env_lock:
        saved = os.environ.get("TRITON_INTERPRET")
        os.environ["TRITON_INTERPRET"] = "1"
        try:
            yield
        finally:
            if saved is None:
                os.environ.pop("TRITON_INTERPRET", None)
            else:
                os.environ["TRITON_INTERPRET"] = saved
_LAUNCH_ONLY = ("num_warps", "num_stages", "num_ctas", "zeroed_outputs", "input_output_aliases", "debug")


class _HostDtype:
    def __init__(self, name: str):
        self.name = name

    def __str__(self) -> str:  # Triton's interpreter reads the element type from this spelling
        return f"torch.{self.name}"


# One live dtype object per name: Triton caches argument types by the dtype object's identity,
# and a freed object's address reused by another dtype would hand a kernel the wrong pointer type.
_HOST_DTYPES: dict[str, _HostDtype] = {}


class _HostTensor:
    """Just enough of a torch.Tensor for Triton's interpreter, over a contiguous NumPy array (the
    interpreter reads and writes memory through `data_ptr`; host and 'device' are the same)."""

    def __init__(self, array: np.ndarray):
        self.array = np.ascontiguousarray(array)
        name = jnp.dtype(self.array.dtype).name
        self.dtype = _HOST_DTYPES.setdefault(name, _HostDtype(name))

    def data_ptr(self) -> int:
        return self.array.ctypes.data

    def untyped_storage(self):
        return self

    def cpu(self):
        return self

    def copy_(self, other):
        return self

    def new_empty(self, *args, **kwargs):
        return self

    def set_(self, *args):
        return self

    def storage_offset(self) -> int:
        return 0

    def size(self):
        return self.array.shape

    def stride(self):
        return tuple(step // self.array.itemsize for step in self.array.strides)


def _patch_interpreter() -> None:
    """Work around three gaps of Triton 3.6's NumPy interpreter, once:
    - it keeps scalars as 1-element arrays, which NumPy 2 refuses to turn into an int, so
      `range(lo, hi)` over runtime scalars fails: give its tensors `__index__`;
    - `tl.dot` multiplies bfloat16 operands as their raw 16-bit patterns: widen them first;
    - it keeps global state per launch, and XLA may run two host callbacks at once (a dq and a
      dkv kernel are independent): run one launch at a time.
    """
    from triton.runtime import interpreter

    if getattr(interpreter, "_ejkernel_nsa_patched", False):
        return
    interpreter._ejkernel_nsa_patched = True

    patch_tensor = interpreter._patch_lang_tensor

    def patched_tensor(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interpreter._patch_lang_tensor = patched_tensor

    import triton.language as tl

    create_dot = interpreter.InterpreterBuilder.create_dot

    def widen(x):
        if x.dtype.scalar != tl.bfloat16:
            return x
        data = interpreter._convert_float(x.data, tl.bfloat16, tl.float32, None).view(np.float32)
        return interpreter.TensorHandle(data, tl.float32)

    def dot_widened(self, a, b, d, input_precision, max_num_imprecise_acc):
        return create_dot(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    interpreter.InterpreterBuilder.create_dot = dot_widened

    launch_grid = interpreter.GridExecutor.__call__
    lock = threading.Lock()

    def one_at_a_time(self, *args, **kwargs):
        with lock:
            return launch_grid(self, *args, **kwargs)

    interpreter.GridExecutor.__call__ = one_at_a_time


def _interpreted_call(args, kernel, out_shape, grid, options):
    _patch_interpreter()
    meta = {k: v for k, v in options.items() if k not in _LAUNCH_ONLY}
    shapes = list(out_shape) if isinstance(out_shape, (list, tuple)) else [out_shape]
    is_array = [_is_array(a) for a in args]

    def host(*arrays):
        arrays = iter(arrays)
        launch_args = [_HostTensor(np.asarray(next(arrays))) if array else a for a, array in zip(args, is_array)]
        # Outputs start zeroed, as `zeroed_outputs` asks of jax_triton; others are fully written.
        outs = [_HostTensor(np.zeros(s.shape, s.dtype)) for s in shapes]
        launch_grid = grid(meta) if callable(grid) else grid
        with triton_interpreter():
            kernel[tuple(launch_grid)](*launch_args, *outs, **meta)
        return [o.array for o in outs]

    results = jax.pure_callback(host, shapes, *[a for a, array in zip(args, is_array) if array])
    return results if isinstance(out_shape, (list, tuple)) else results[0]


def dot_precision(dtype) -> str:
    """`tl.dot` input precision: float32 problems use three tf32 passes, which keeps them within
    the float32 tolerance; 16-bit inputs are exact in one pass anyway."""
    return "tf32x3" if jnp.dtype(dtype) == jnp.float32 else "tf32"


TRITON_TYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "int32": "i32", "int64": "i64"}


def pointer(dtype) -> str:
    return "*" + TRITON_TYPES[jnp.dtype(dtype).name]


@dataclasses.dataclass(frozen=True)
class CompileSpec:
    """One kernel instance to compile ahead of time: argument types and constexpr values."""

    name: str
    kernel: Callable
    signature: dict[str, str]
    constexprs: dict[str, object]
    num_warps: int = 4
    num_stages: int = 2

    def compile(self, arch: int = TARGET_ARCH):
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource

        signature = dict(self.signature)
        signature.update({name: "constexpr" for name in self.constexprs})
        # jax_triton tells Triton that every pointer is 16-byte aligned; say the same, so that CI
        # compiles the kernel that runs (vectorized, pipelined loads).
        names = list(inspect.signature(self.kernel.fn).parameters)
        aligned = {(names.index(n),): [["tt.divisibility", 16]] for n, t in self.signature.items() if t.startswith("*")}
        source = ASTSource(fn=self.kernel, signature=signature, constexprs=dict(self.constexprs), attrs=aligned)
        options = {"num_warps": self.num_warps, "num_stages": self.num_stages}
        return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)


# What none of the kernels do; each piece adds its own limits.
common_decline = triton_kernel_decline
