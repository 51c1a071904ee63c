"""The issue's reference measurement (issue 5): what the issue's author measured on an H100, bf16,
paper setting (B=1, HQ=64, H=4, D=128, S=16, BS=64), before this harness existed. Printed beside the
live results as "issue's reference measurement", never mixed into them.

median ms by (implementation, T, mode); None: not measured; "fails": the run failed.
"""

LABEL = "issue's reference measurement (H100, bf16, paper setting; fla 0.6.0, ejkernel 0.0.80, cuDNN)"
SHAPE = "paper"

MEDIAN_MS: dict[tuple[str, int, str], float | str | None] = {
    ("cudnn_dense", 4096, "fwd"): 0.82, ("cudnn_dense", 4096, "fwd_bwd"): None,
    ("cudnn_dense", 16384, "fwd"): 7.95, ("cudnn_dense", 16384, "fwd_bwd"): 28.2,
    ("cudnn_dense", 65536, "fwd"): 116.0, ("cudnn_dense", 65536, "fwd_bwd"): 422.0,
    ("fla", 4096, "fwd"): 1.73, ("fla", 4096, "fwd_bwd"): 10.8,
    ("fla", 16384, "fwd"): 8.38, ("fla", 16384, "fwd_bwd"): 44.2,
    ("fla", 65536, "fwd"): 57.1, ("fla", 65536, "fwd_bwd"): 213.0,
    ("ejkernel", 4096, "fwd"): 2.08, ("ejkernel", 4096, "fwd_bwd"): "fails",
    ("ejkernel", 16384, "fwd"): 9.57, ("ejkernel", 16384, "fwd_bwd"): "fails",
    ("ejkernel", 65536, "fwd"): 64.8, ("ejkernel", 65536, "fwd_bwd"): "fails",
}


def reference_ms(implementation: str, shape: str, T: int, mode: str) -> float | None:
    """The reference time, or None where there is none (or it failed)."""
    value = MEDIAN_MS.get((implementation, T, mode)) if shape == SHAPE else None
    return value if isinstance(value, float) else None


def reference_failed(implementation: str, shape: str, T: int, mode: str) -> bool:
    return shape == SHAPE and MEDIAN_MS.get((implementation, T, mode)) == "fails"
