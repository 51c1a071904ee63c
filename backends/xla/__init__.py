"""The portable backend: every piece of NSA in plain `jax.numpy` / `lax`, differentiated by JAX.

It runs wherever XLA does and supports the whole contract, so it is the fallback on CPU and TPU
and the reference the kernels are checked against. Work is done in query chunks under
`jax.checkpoint`, so memory grows linearly in the sequence length, forward and backward.
"""

from ejkernel_nsa.backends.xla.compressed_attention import compressed_attention, select_blocks
from ejkernel_nsa.backends.xla.compression import mean_pool
from ejkernel_nsa.backends.xla.selected_attention import selected_attention
from ejkernel_nsa.backends.xla.sliding_window import sliding_window_attention
from ejkernel_nsa.problem import Piece
from ejkernel_nsa.registry import Backend, register, register_backend

NAME = "xla"
PLATFORMS = ("cpu", "gpu", "tpu")
# The lowest priority: any kernel that supports a call is preferred over the portable path.
PRIORITY = 0

register_backend(Backend(NAME, "plain XLA (jax.numpy), chunked; every platform, every case", lambda: None))
for piece, fn in [
    (Piece.COMPRESSION, mean_pool),
    (Piece.COMPRESSED_ATTENTION, compressed_attention),
    (Piece.SELECTION, select_blocks),
    (Piece.SELECTED_ATTENTION, selected_attention),
    (Piece.SLIDING_WINDOW, sliding_window_attention),
]:
    register(piece, backend=NAME, platforms=PLATFORMS, priority=PRIORITY, compression_geometry=True,
             longer_keys=True)(fn)
