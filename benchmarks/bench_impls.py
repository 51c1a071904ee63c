"""What the harness can run: ours (automatic choice, each backend forced, each piece alone), the
peers when installed (flash-linear-attention's `parallel_nsa`, ejkernel's Triton
`native_sparse_attention`) and dense causal attention through cuDNN.

Each implementation says what it computes, counts its valid FLOPs, says before running whether it
cannot run a case (not installed, unsupported shape, with the peer's own source line), and builds
a `run(i)` that launches one step on input set `i % 2` (two fresh random sets, never zeros).
Peers are imported only here, only when asked for: they are never dependencies of the library.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
from collections.abc import Callable
from typing import Any

import bench_flops as flops

PIECES = ("compression", "compressed_attention", "selection", "selected_attention", "sliding_window")
# The selection is piecewise constant: it has no backward to time.
PIECE_MODES = {piece: ("fwd",) if piece == "selection" else ("fwd", "fwd_bwd") for piece in PIECES}


@dataclasses.dataclass(frozen=True)
class Shape:
    name: str
    B: int
    HQ: int
    H: int
    D: int
    S: int
    BS: int
    W: int
    dtype: str = "bfloat16"
    # SPEC section 9: compression block length l and stride d (None: l = d = BS, disjoint pooling).
    L: int | None = None
    stride: int | None = None

    @property
    def G(self) -> int:
        return self.HQ // self.H

    @property
    def overlapping(self) -> bool:
        return self.L is not None

    def geometry(self) -> dict[str, int]:
        """`native_sparse_attention`'s geometry arguments (empty for the default geometry)."""
        return dict(compress_block_size=self.L, compress_stride=self.stride) if self.overlapping else {}

    def fields(self) -> dict[str, Any]:
        fields = {"shape": self.name, "B": self.B, "HQ": self.HQ, "H": self.H, "G": self.G, "D": self.D,
                  "S": self.S, "BS": self.BS, "dtype": self.dtype}
        if self.overlapping:
            fields.update(L=self.L, stride=self.stride)
        return fields

    def describe(self) -> str:
        geometry = f" l={self.L} d={self.stride}" if self.overlapping else ""
        return (f"B={self.B} HQ={self.HQ} H={self.H} (G={self.G}) D={self.D} S={self.S} BS={self.BS}{geometry} "
                f"W={self.W} {self.dtype}")


# The paper's setting (arXiv 2502.11089, section 4: G = 16) and the group sizes real models use,
# G = 1, 2, 4 (32 query heads) and 8 (64); `tiny` is for checking the harness itself on a CPU.
SHAPES = {
    "paper": Shape("paper", B=1, HQ=64, H=4, D=128, S=16, BS=64, W=512),
    # The paper's exact compression (SPEC section 9): blocks of l=32 at stride d=16, selection l'=64.
    "paper_overlap": Shape("paper_overlap", B=1, HQ=64, H=4, D=128, S=16, BS=64, W=512, L=32, stride=16),
    "g1": Shape("g1", B=1, HQ=32, H=32, D=128, S=16, BS=64, W=512),
    "g2": Shape("g2", B=1, HQ=32, H=16, D=128, S=16, BS=64, W=512),
    "g4": Shape("g4", B=1, HQ=32, H=8, D=128, S=16, BS=64, W=512),
    "g8": Shape("g8", B=1, HQ=64, H=8, D=128, S=16, BS=64, W=512),
    "tiny": Shape("tiny", B=1, HQ=16, H=1, D=32, S=4, BS=16, W=32),
    "tiny_overlap": Shape("tiny_overlap", B=1, HQ=16, H=1, D=32, S=4, BS=16, W=32, L=8, stride=4),
}


class Unsupported(Exception):
    """The implementation cannot run this case (a shape or option it does not take)."""


class Implementation:
    name: str
    framework: str = "jax"
    # Modes reported to fail: run after everything else, so that a failure that breaks the GPU
    # context (the process then restarts, --resume) costs no other measurement.
    risky_modes: tuple[str, ...] = ()

    def missing(self) -> str | None:
        """None when it can run here, else why not ("not installed", no GPU, ...)."""
        return None

    def computes(self, shape: Shape) -> str:
        raise NotImplementedError

    def window_size(self, shape: Shape) -> int:
        """The sliding window this implementation computes with (0: no window branch)."""
        return 0

    def forward_flops(self, case: Case) -> float:
        raise NotImplementedError

    def declines(self, case: Case) -> str | None:
        return None

    def build(self, case: Case, seed: int) -> Callable[[int], Any]:
        raise NotImplementedError

    def plan(self, case: Case) -> dict[str, str] | None:
        return None


def _installed(module: str, what: str) -> str | None:
    if importlib.util.find_spec(module) is None:
        return f"not installed ({what})"
    return None


@dataclasses.dataclass(frozen=True)
class Case:
    impl: Implementation
    shape: Shape
    T: int
    mode: str
    piece: str | None = None

    @property
    def implementation(self) -> str:
        return self.impl.name

    @property
    def W(self) -> int:
        """The window computed: the implementation's, or the window piece's own."""
        if self.piece:
            return self.shape.W if self.piece == "sliding_window" else 0
        return self.impl.window_size(self.shape)

    @property
    def key(self) -> tuple:
        return (self.implementation, self.shape.name, self.W, self.T, self.mode, self.piece)

    def label(self) -> str:
        what = self.implementation + (f" {self.piece}" if self.piece else "")
        window = "" if self.piece or self.W == self.shape.W else f" W={self.W}"
        return f"{what} {self.shape.name}{window} T={self.T} {self.mode}"


# ---- JAX helpers ---------------------------------------------------------------------------


def jax_inputs(shape: Shape, T: int, seed: int, *, with_window: bool):
    """Normal q, k, v and gates in (0, 1) (as a sigmoid gives them), plus a normal cotangent."""
    import jax
    import jax.numpy as jnp

    dtype = jnp.dtype(shape.dtype)
    keys = jax.random.split(jax.random.key(seed), 7)
    q_shape, kv_shape, g_shape = (shape.B, T, shape.HQ, shape.D), (shape.B, T, shape.H, shape.D), (shape.B, T, shape.HQ)
    inputs = {
        "query": jax.random.normal(keys[0], q_shape, dtype),
        "key": jax.random.normal(keys[1], kv_shape, dtype),
        "value": jax.random.normal(keys[2], kv_shape, dtype),
        "g_cmp": jax.nn.sigmoid(jax.random.normal(keys[3], g_shape, jnp.float32)).astype(dtype),
        "g_slc": jax.nn.sigmoid(jax.random.normal(keys[4], g_shape, jnp.float32)).astype(dtype),
    }
    if with_window:
        inputs["g_swa"] = jax.nn.sigmoid(jax.random.normal(keys[5], g_shape, jnp.float32)).astype(dtype)
    return inputs, keys[6]


def jax_step(fn: Callable, args: tuple, mode: str, cotangent_key, differentiable: tuple[int, ...],
             outputs: tuple[int, ...] = (0,)):
    """A jitted step: `fn(*args)` for "fwd"; for "fwd_bwd", the gradient in the `differentiable`
    arguments of the sum of <output i, ct_i> over the `outputs` of `fn` (a tuple, or one array as
    output 0), each ct_i a fixed random cotangent passed as an argument (not a constant baked into
    the program). Returns the step and the extra arguments it takes after `args`."""
    import jax
    import jax.numpy as jnp

    if mode == "fwd":
        return jax.jit(fn), ()
    shapes = jax.eval_shape(fn, *args)
    shapes = shapes if isinstance(shapes, tuple) else (shapes,)
    keys = jax.random.split(cotangent_key, len(outputs))
    cotangents = tuple(jax.random.normal(key, shapes[i].shape, shapes[i].dtype) for key, i in zip(keys, outputs))

    def loss(*all_args):
        inputs, cts = all_args[: len(args)], all_args[len(args):]
        values = fn(*inputs)
        values = values if isinstance(values, tuple) else (values,)
        return sum(jnp.vdot(values[i].astype(jnp.float32).ravel(), ct.astype(jnp.float32).ravel())
                   for i, ct in zip(outputs, cts))

    return jax.jit(jax.grad(loss, argnums=differentiable)), cotangents


def alternating(step: Callable, arg_sets: list[tuple]) -> Callable[[int], Any]:
    return lambda i: step(*arg_sets[i % len(arg_sets)])


# ---- ours ----------------------------------------------------------------------------------


class Ours(Implementation):
    """`ejkernel_nsa.native_sparse_attention`: the automatic choice, or one backend forced. With
    `piece`, one piece alone through its public function (forced backend, or automatic)."""

    def __init__(self, backend: str | None = None, window: bool = True):
        self.backend, self.window = backend, window
        self.name = "ejkernel_nsa" + (f":{backend}" if backend else "")

    def window_size(self, shape: Shape) -> int:
        return shape.W if self.window else 0

    def computes(self, shape: Shape) -> str:
        W = self.window_size(shape)
        return f"cmp+slc+swa (W={W})" if W else "cmp+slc"

    def forward_flops(self, case: Case) -> float:
        s = case.shape
        if case.piece:
            return flops.piece_flops(case.piece, case.T, s.H, s.HQ, s.D, s.S, s.BS, s.W, s.B)
        return flops.nsa_flops(case.T, s.HQ, s.D, s.S, s.BS, self.window_size(s), s.B)

    def declines(self, case: Case) -> str | None:
        if case.piece and case.mode not in PIECE_MODES[case.piece]:
            return f"the {case.piece} piece has no backward"
        return None

    def _options(self, shape: Shape) -> dict:
        return dict(block_counts=shape.S, block_size=shape.BS, window_size=self.window_size(shape),
                    backend=self.backend, **shape.geometry())

    def plan(self, case: Case) -> dict[str, str] | None:
        """Which backend each piece would use, read off `explain` on abstract inputs (nothing is
        allocated); raises `Unsupported` with the registry's reason when the backend declines."""
        if case.piece:
            return {case.piece: self.backend or "automatic"}
        import jax
        import ejkernel_nsa as nsa

        shape, with_window = case.shape, self.window_size(case.shape) > 0
        specs = {
            "query": (shape.B, case.T, shape.HQ, shape.D), "key": (shape.B, case.T, shape.H, shape.D),
            "value": (shape.B, case.T, shape.H, shape.D), "g_cmp": (shape.B, case.T, shape.HQ),
            "g_slc": (shape.B, case.T, shape.HQ),
        }
        if with_window:
            specs["g_swa"] = (shape.B, case.T, shape.HQ)
        found = {}

        def probe(*args):
            found["plan"] = nsa.explain(**dict(zip(specs, args)), **self._options(shape))
            return args[0]

        try:
            jax.eval_shape(probe, *(jax.ShapeDtypeStruct(size, shape.dtype) for size in specs.values()))
        except nsa.BackendError as error:
            raise Unsupported(str(error)) from error
        return {piece.value: impl.backend for piece, impl in found["plan"].chosen.items()}

    def build(self, case: Case, seed: int) -> Callable[[int], Any]:
        if case.piece:
            return self._build_piece(case, seed)
        import ejkernel_nsa as nsa

        shape, with_window = case.shape, self.window_size(case.shape) > 0
        options = self._options(shape)
        names = ("query", "key", "value", "g_cmp", "g_slc") + (("g_swa",) if with_window else ())

        def forward(*args):
            return nsa.native_sparse_attention(**dict(zip(names, args)), **options)

        arg_sets, step = [], None
        for i in range(2):
            inputs, ct_key = jax_inputs(shape, case.T, seed + i, with_window=with_window)
            args = tuple(inputs[name] for name in names)
            if step is None:
                step, extra = jax_step(forward, args, case.mode, ct_key, tuple(range(len(args))))
            arg_sets.append(args + extra)
        return alternating(step, arg_sets)

    def _build_piece(self, case: Case, seed: int) -> Callable[[int], Any]:
        """One piece on realistic inputs: the compressed keys, log-sum-exp and block indices it
        reads are made beforehand by the automatic choice, outside the timed step."""
        import ejkernel_nsa as nsa

        shape, backend, piece = case.shape, self.backend, case.piece
        BS, S, W = shape.BS, shape.S, shape.W
        geo = shape.geometry()
        # (function, differentiable arguments, outputs the backward flows from): both block means
        # carry gradient; the log-sum-exp feeds only the selection, which carries none.
        calls = {
            "compression": (lambda k, v: nsa.mean_pool(k, v, BS, backend=backend, **geo), (0, 1), (0, 1)),
            "compressed_attention": (
                lambda q, kc, vc: nsa.compressed_attention(q, kc, vc, BS, backend=backend, **geo), (0, 1, 2), (0,)),
            "selection": (lambda q, kc, lse: nsa.select_blocks(q, kc, lse, S, BS, backend=backend, **geo), (), ()),
            "selected_attention": (
                lambda q, k, v, idx: nsa.apply_native_sparse_attention(q, k, v, idx, S, BS, backend=backend),
                (0, 1, 2), (0,)),
            "sliding_window": (
                lambda q, k, v: nsa.sliding_window_attention(q, k, v, W, backend=backend), (0, 1, 2), (0,)),
        }
        fn, differentiable, outputs = calls[piece]
        arg_sets, step = [], None
        for i in range(2):
            inputs, ct_key = jax_inputs(shape, case.T, seed + i, with_window=False)
            q, k, v = inputs["query"], inputs["key"], inputs["value"]
            if piece == "compression":
                args = (k, v)
            elif piece == "sliding_window":
                args = (q, k, v)
            else:
                k_cmp, v_cmp = nsa.mean_pool(k, v, BS, **geo)
                if piece == "compressed_attention":
                    args = (q, k_cmp, v_cmp)
                else:
                    _, lse = nsa.compressed_attention(q, k_cmp, v_cmp, BS, **geo)
                    if piece == "selection":
                        args = (q, k_cmp, lse)
                    else:
                        args = (q, k, v, nsa.select_blocks(q, k_cmp, lse, S, BS, **geo))
            if step is None:
                step, extra = jax_step(fn, args, case.mode, ct_key, differentiable, outputs)
            arg_sets.append(args + extra)
        return alternating(step, arg_sets)


# ---- peers ---------------------------------------------------------------------------------


class FlaParallelNSA(Implementation):
    """flash-linear-attention 0.6.0, `fla.ops.nsa.parallel_nsa` (PyTorch + Triton), [B, T, H, D].

    Its window branch calls flash-attn (fla/ops/nsa/parallel.py:22-29, 943-958); without
    flash-attn installed it runs the compressed and selected branches only (window_size=0)."""

    name = "fla"
    framework = "torch"

    def missing(self) -> str | None:
        reason = _installed("fla", "flash-linear-attention") or _installed("torch", "PyTorch, needed by fla")
        if reason:
            return reason
        import torch

        return None if torch.cuda.is_available() else "unavailable: PyTorch sees no CUDA device"

    @functools.cached_property
    def has_window(self) -> bool:
        return importlib.util.find_spec("flash_attn") is not None

    def window_size(self, shape: Shape) -> int:
        return shape.W if self.has_window else 0

    def computes(self, shape: Shape) -> str:
        return f"cmp+slc+swa (W={shape.W})" if self.window_size(shape) else "cmp+slc"

    def forward_flops(self, case: Case) -> float:
        s = case.shape
        return flops.nsa_flops(case.T, s.HQ, s.D, s.S, s.BS, self.window_size(s), s.B)

    def declines(self, case: Case) -> str | None:
        G, S = case.shape.G, case.shape.S
        if case.piece:
            return "pieces are timed for ours only"
        if case.shape.overlapping:
            return "fla's parallel_nsa pools disjoint blocks of block_size only (no l, d of SPEC section 9)"
        if G < 16 or G & (G - 1):
            return f"fla needs HQ/H a power of 2 >= 16, here G={G} (fla/ops/nsa/parallel.py:904)"
        next_pow2 = 1 << (S - 1).bit_length()
        if case.shape.BS < 2 * next_pow2:
            return f"fla's top-k needs block_size >= 2 * next_pow2(S) (fla/ops/nsa/parallel.py:570)"
        return None

    def build(self, case: Case, seed: int) -> Callable[[int], Any]:
        import torch
        from fla.ops.nsa import parallel_nsa

        s, T = case.shape, case.T
        dtype = getattr(torch, s.dtype)
        generator = torch.Generator(device="cuda").manual_seed(seed)
        window = self.window_size(s)
        training = case.mode == "fwd_bwd"

        def normal(*size, gate=False):
            x = torch.randn(*size, device="cuda", dtype=torch.float32, generator=generator)
            return (torch.sigmoid(x) if gate else x).to(dtype).requires_grad_(training)

        sets = []
        for _ in range(2):
            inputs = dict(q=normal(s.B, T, s.HQ, s.D), k=normal(s.B, T, s.H, s.D), v=normal(s.B, T, s.H, s.D),
                          g_cmp=normal(s.B, T, s.HQ, gate=True), g_slc=normal(s.B, T, s.HQ, gate=True))
            if window:
                inputs["g_swa"] = normal(s.B, T, s.HQ, gate=True)
            d_out = torch.randn(s.B, T, s.HQ, s.D, device="cuda", dtype=dtype, generator=generator)
            sets.append((inputs, d_out))
        options = dict(block_counts=s.S, block_size=s.BS, window_size=window)

        def run(i):
            inputs, d_out = sets[i % 2]
            if not training:
                with torch.no_grad():
                    return parallel_nsa(**inputs, **options)
            for x in inputs.values():
                x.grad = None
            out = parallel_nsa(**inputs, **options)
            out.backward(d_out)
            return out

        return run


class EjkernelNSA(Implementation):
    """ejkernel 0.0.80, the Triton `native_sparse_attention` (JAX, through its own Triton calls),
    [B, T, H, D]; compressed and selected branches (no window argument)."""

    name = "ejkernel"
    risky_modes = ("fwd_bwd",)  # the reference measurement: ejkernel 0.0.80 fwd+bwd "fails"

    def missing(self) -> str | None:
        reason = _installed("ejkernel", "ejkernel")
        if reason:
            return reason
        import jax

        return None if jax.default_backend() == "gpu" else "unavailable: its Triton kernels need an NVIDIA GPU"

    def computes(self, shape: Shape) -> str:
        return "cmp+slc"

    def forward_flops(self, case: Case) -> float:
        s = case.shape
        return flops.nsa_flops(case.T, s.HQ, s.D, s.S, s.BS, 0, s.B)

    def declines(self, case: Case) -> str | None:
        if case.piece:
            return "pieces are timed for ours only"
        if case.shape.overlapping:
            return "ejkernel's native_sparse_attention pools disjoint blocks of block_size only (no l, d)"
        if case.shape.G % 16:
            return (f"ejkernel needs G a multiple of 16, here G={case.shape.G} "
                    "(ejkernel/kernels/_triton/native_sparse_attention/_interface.py:415)")
        return None

    def build(self, case: Case, seed: int) -> Callable[[int], Any]:
        # Imported only now, after JAX made its GPU client: importing ejkernel sets
        # TF_GPU_ALLOCATOR=cuda_malloc_async (ejkernel/__init__.py), which must not change the
        # allocator the other JAX implementations are timed with.
        from ejkernel.kernels._triton.native_sparse_attention import native_sparse_attention

        s = case.shape

        def forward(q, k, v, g_cmp, g_slc):
            return native_sparse_attention(q, k, v, g_cmp, g_slc, block_counts=s.S, block_size=s.BS)

        arg_sets, step = [], None
        for i in range(2):
            inputs, ct_key = jax_inputs(s, case.T, seed + i, with_window=False)
            args = tuple(inputs[n] for n in ("query", "key", "value", "g_cmp", "g_slc"))
            if step is None:
                step, extra = jax_step(forward, args, case.mode, ct_key, (0, 1, 2, 3, 4))
            arg_sets.append(args + extra)
        return alternating(step, arg_sets)


class CudnnDense(Implementation):
    """Dense causal attention, `jax.nn.dot_product_attention(..., implementation="cudnn")`, GQA."""

    name = "cudnn_dense"

    def missing(self) -> str | None:
        import jax

        return None if jax.default_backend() == "gpu" else "unavailable: cuDNN attention needs an NVIDIA GPU"

    def computes(self, shape: Shape) -> str:
        return "dense causal"

    def forward_flops(self, case: Case) -> float:
        s = case.shape
        return flops.dense_causal_flops(case.T, s.HQ, s.D, s.B)

    def declines(self, case: Case) -> str | None:
        return "pieces are timed for ours only" if case.piece else None

    def build(self, case: Case, seed: int) -> Callable[[int], Any]:
        import jax

        def forward(q, k, v):
            return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")

        arg_sets, step = [], None
        for i in range(2):
            inputs, ct_key = jax_inputs(case.shape, case.T, seed + i, with_window=False)
            args = (inputs["query"], inputs["key"], inputs["value"])
            if step is None:
                step, extra = jax_step(forward, args, case.mode, ct_key, (0, 1, 2))
            arg_sets.append(args + extra)
        return alternating(step, arg_sets)


class FlashNSA(Implementation):
    """mdy666's flash_nsa (github mdy666/Scalable-Flash-Native-Sparse-Attention, MIT; PyTorch +
    Triton), `HFNSACore` with our geometry (mean pooling, kernel_size = stride = block_size = BS,
    top_n = S, the first and two local blocks forced, as ours). Its window branch needs flash-attn,
    which is not installed here: the window is replaced by zeros (0.2 ms at 64k by the issue's
    measurement), so it computes cmp + slc and its gated combine, and compares with ours at W=0.
    Its source is read from `.device/peers/flash_nsa` (../shared/device/prepare.sh copies it
    there) or `$FLASH_NSA_PATH`; it is never a dependency."""

    name = "flash_nsa"
    framework = "torch"

    @staticmethod
    def _source() -> str | None:
        import os
        from pathlib import Path

        # The folder that holds the `flash_nsa` package (prepare.sh copies the peer's checkout,
        # package inside, to .device/peers/flash_nsa).
        for folder in (os.environ.get("FLASH_NSA_PATH"), Path(__file__).resolve().parents[1] / ".device" / "peers"
                       / "flash_nsa"):
            if folder and (Path(folder) / "flash_nsa" / "__init__.py").is_file():
                return str(folder)
        return None

    def missing(self) -> str | None:
        reason = _installed("torch", "PyTorch, needed by flash_nsa")
        if reason:
            return reason
        if self._source() is None:
            return "not installed (flash_nsa source: run ../shared/device/prepare.sh, or set FLASH_NSA_PATH)"
        import torch

        return None if torch.cuda.is_available() else "unavailable: PyTorch sees no CUDA device"

    def computes(self, shape: Shape) -> str:
        return "cmp+slc (window replaced by zeros: no flash-attn)"

    def forward_flops(self, case: Case) -> float:
        s = case.shape
        return flops.nsa_flops(case.T, s.HQ, s.D, s.S, s.BS, 0, s.B)

    def declines(self, case: Case) -> str | None:
        if case.piece:
            return "pieces are timed for ours only"
        if case.shape.overlapping and (case.shape.stride & (case.shape.stride - 1)):
            return f"flash_nsa needs a power-of-2 stride (flash_nsa/config.py:52), here d={case.shape.stride}"
        if case.shape.B != 1:
            return "the harness packs one sequence (cu_seqlens [0, T]); B must be 1"
        if case.shape.BS & (case.shape.BS - 1):
            return f"flash_nsa needs a power-of-2 stride (flash_nsa/config.py:52), here BS={case.shape.BS}"
        return None

    @functools.cached_property
    def module(self):
        import sys
        import types

        source = self._source()
        if source not in sys.path:
            sys.path.insert(0, source)
        try:
            import pkg_resources  # noqa: F401
        except ImportError:
            # flash_nsa/utils.py compares Triton versions with pkg_resources, absent from newer setuptools.
            from packaging.version import parse

            sys.modules["pkg_resources"] = types.SimpleNamespace(parse_version=parse)
        import flash_nsa
        import flash_nsa.modules.hf_level_nsa as hf

        hf.swa_varlen_func = lambda q, k, v, scale: __import__("torch").zeros_like(q)
        return flash_nsa

    def build(self, case: Case, seed: int) -> Callable[[int], Any]:
        import torch

        flash_nsa = self.module
        s, T = case.shape, case.T
        dtype = getattr(torch, s.dtype)
        config = flash_nsa.NSAConfig(head_dim=s.D, num_heads=s.HQ, num_kv_heads=s.H, kernel_size=s.L or s.BS,
                                     stride=s.stride or s.BS,
                                     block_size=s.BS, top_n=s.S, window_size=s.W)
        core = flash_nsa.HFNSACore(config).cuda().to(dtype)
        cu_seqlens = torch.tensor([0, T], device="cuda", dtype=torch.int32)
        generator = torch.Generator(device="cuda").manual_seed(seed)
        training = case.mode == "fwd_bwd"

        def normal(*size):
            return torch.randn(*size, device="cuda", dtype=torch.float32, generator=generator).to(dtype)

        sets = []
        for _ in range(2):
            inputs = [normal(T, s.HQ, s.D), normal(T, s.H, s.D), normal(T, s.H, s.D), normal(T, s.HQ, 3)]
            inputs = [x.requires_grad_(training) for x in inputs]
            sets.append((inputs, normal(T, s.HQ, s.D)))

        def run(i):
            inputs, d_out = sets[i % 2]
            if not training:
                with torch.no_grad():
                    return core(*inputs, cu_seqlens)
            for x in inputs:
                x.grad = None
            out = core(*inputs, cu_seqlens)
            out.backward(d_out)
            return out

        return run


PEERS = {"fla": FlaParallelNSA, "flash_nsa": FlashNSA, "ejkernel": EjkernelNSA, "cudnn": CudnnDense}
