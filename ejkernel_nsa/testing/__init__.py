"""What checks ejkernel_nsa, shipped with it so that an installed wheel can check itself.

`oracle` is the float64 NumPy reading of the NSA contract (SPEC sections 1-10) that every backend
is tested against; it needs only NumPy (no jax, pytest or hypothesis). `check_backends` forces
each backend on a few problems and compares it with the oracle (`ejkernel-nsa check`);
`TOLERANCES` and `rel_l2` are SPEC section 8's comparison, shared with the test suite.
"""

from ejkernel_nsa.testing import oracle
from ejkernel_nsa.testing.check import PROBLEMS, TOLERANCES, Outcome, Problem, check_backends, rel_l2

__all__ = ["PROBLEMS", "TOLERANCES", "Outcome", "Problem", "check_backends", "oracle", "rel_l2"]
