"""Work counts: the matrix FLOPs of causally valid work, per branch, piece and implementation.

Only keys a query can see count (2 FLOP per multiply-add, QK and PV, each over the head dim):
for a query at position t, `(t + 1) // BS` compressed keys; all keys up to t while there are at
most S candidate blocks, then `(S - 1) * BS + t % BS + 1`; `min(t + 1, W)` window keys; `t + 1`
keys for dense causal attention. Forward+backward counts 3.5x the forward (the backward
recomputes the scores and forms dQ, dK, dV: 2.5x), the usual convention for attention.
"""

from __future__ import annotations

import numpy as np

BACKWARD_FACTOR = 3.5

# Datasheet dense bf16/fp16 matrix rate, FLOP/s, by a substring of `device_kind`. The measured
# ceiling on these H100s is lower (about 800 TFLOP/s for an 8192^3 bf16 product; KINDS.md).
PEAK_BF16 = {"H100": 989e12, "H200": 989e12}


def peak_flops(device_kind: str, dtype: str) -> float | None:
    if dtype not in ("bfloat16", "float16"):
        return None
    return next((rate for name, rate in PEAK_BF16.items() if name in device_kind), None)


def branch_keys(T: int, S: int, BS: int, W: int) -> dict[str, int]:
    """Keys summed over all query positions of one sequence, per branch."""
    t = np.arange(T, dtype=np.int64)
    return {
        "cmp": int(((t + 1) // BS).sum()),
        "slc": int(np.where(t // BS + 1 <= S, t + 1, (S - 1) * BS + t % BS + 1).sum()),
        "swa": int(np.minimum(t + 1, W).sum()) if W > 0 else 0,
        "dense": T * (T + 1) // 2,
    }


def attention_flops(keys: int, B: int, HQ: int, D: int, with_values: bool = True) -> float:
    return float((4 if with_values else 2) * B * HQ * D * keys)


def nsa_flops(T: int, HQ: int, D: int, S: int, BS: int, W: int, B: int = 1) -> float:
    """Forward FLOPs of all three branches (W = 0: compressed and selected only)."""
    keys = branch_keys(T, S, BS, W)
    return attention_flops(keys["cmp"] + keys["slc"] + keys["swa"], B, HQ, D)


def dense_causal_flops(T: int, HQ: int, D: int, B: int = 1) -> float:
    return attention_flops(branch_keys(T, 1, 1, 0)["dense"], B, HQ, D)


def piece_flops(piece: str, T: int, H: int, HQ: int, D: int, S: int, BS: int, W: int, B: int = 1) -> float:
    """Forward FLOPs of one piece alone. The selection recomputes the compressed scores (QK only);
    compression is a mean (adds, no matrix work) and counts its additions."""
    keys = branch_keys(T, S, BS, W)
    return {
        "compression": float(2 * B * T * H * D),
        "compressed_attention": attention_flops(keys["cmp"], B, HQ, D),
        "selection": attention_flops(keys["cmp"], B, HQ, D, with_values=False),
        "selected_attention": attention_flops(keys["slc"], B, HQ, D),
        "sliding_window": attention_flops(keys["swa"], B, HQ, D),
    }[piece]


def mode_flops(forward: float, mode: str) -> float:
    return forward * (BACKWARD_FACTOR if mode == "fwd_bwd" else 1.0)
