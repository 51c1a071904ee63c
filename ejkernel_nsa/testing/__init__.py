"""What checks ejkernel_nsa, shipped with it so an installed wheel can check itself.

`oracle` is the float64 NumPy reading of the NSA contract (SPEC sections 1-10) that every backend
is tested against; it needs only NumPy (no jax, pytest or hypothesis).
"""

from ejkernel_nsa.testing import oracle

__all__ = ["oracle"]
