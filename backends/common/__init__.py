"""What the kernel backends share, below them (installed as `ejkernel_nsa.backends.common`).

Backends never import each other; what two of them would otherwise write twice lives here:
`vjp` wires an attention kernel's forward and backward into a `jax.custom_vjp` (the delta row
sums, the lse cotangent), `host` holds the host-side plumbing of the Triton-family backends
(triton, pallas_triton, pallas_mosaic): softmax constants, sizes, the selection's slot sizing and
the registration of a backend's pieces, `containment` the XLA side of SPEC 8's NaN/Inf
containment around every kernel launch. Nothing here launches a kernel. The registry does not
treat this package as a backend (it imports only `registry.core.KNOWN_BACKENDS`).
"""
