"""ejkernel-nsa: Native Sparse Attention (arXiv 2502.11089) for JAX, one call on every platform.

`native_sparse_attention` computes the contract in SPEC.md (docs/semantics.md) with whichever
registered backend fits the call; `use_backend`, the `backend=` argument or the environment
variable `EJKERNEL_NSA_BACKEND` force one; `explain` shows the choice and the reasons.
"""

from importlib import metadata as _metadata

from ejkernel_nsa.api import (
    apply_native_sparse_attention,
    compressed_attention,
    explain,
    mean_pool,
    native_sparse_attention,
    select_blocks,
    sliding_window_attention,
)
from ejkernel_nsa import cache  # the serving cache: decoding and chunked prefill (SPEC section 10)
from ejkernel_nsa.cache import NSACache
from ejkernel_nsa.config import interpret_mode, use_backend
from ejkernel_nsa.problem import NSAProblem, Piece
from ejkernel_nsa.registry import BackendError, backend_status

try:  # the version is written once, in pyproject.toml; the installed metadata carries it
    __version__ = _metadata.version("ejkernel-nsa")
except _metadata.PackageNotFoundError:  # a source tree on sys.path that was never installed
    __version__ = "0+unknown"

__all__ = [
    "BackendError",
    "NSACache",
    "NSAProblem",
    "Piece",
    "apply_native_sparse_attention",
    "backend_status",
    "cache",
    "compressed_attention",
    "explain",
    "interpret_mode",
    "mean_pool",
    "native_sparse_attention",
    "select_blocks",
    "sliding_window_attention",
    "use_backend",
]
