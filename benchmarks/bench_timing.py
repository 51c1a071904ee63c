"""Timing loops (METHOD.md): a first call (compile, autotune), the rest of the warm-up, then timed
runs, each synchronised with the device, and the median. JAX is timed on the host clock around
`block_until_ready`; PyTorch with CUDA events (the host clock is kept beside them).
"""

from __future__ import annotations

import dataclasses
import gc
import statistics
import time
from collections.abc import Callable
from typing import Any


@dataclasses.dataclass
class Timing:
    first_call_s: float  # the first call: compilation or autotuning, and one run
    times_ms: list[float]
    host_times_ms: list[float] | None = None  # PyTorch: the host clock around the same runs
    peak_bytes: int | None = None

    @property
    def median_ms(self) -> float:
        return statistics.median(self.times_ms)


def repeats_within(first_ms: float, repeats: int, max_timed_s: float, minimum: int = 3) -> int:
    """As many timed runs as fit in `max_timed_s` after a run of `first_ms`, within [minimum, repeats]."""
    if first_ms <= 0:
        return repeats
    return max(min(minimum, repeats), min(repeats, int(max_timed_s * 1e3 / first_ms)))


def median_ms(fn, *args, repeats: int, warmup: int = 2) -> float:
    """The median host time (ms) of `fn(*args)` over `repeats` runs, each synchronised, after
    `warmup` untimed calls (compilation in the first): for the scripts that time one kernel or
    variant against another on the same inputs."""
    import jax

    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def time_jax(run: Callable[[int], Any], *, warmup: int, repeats: int, max_timed_s: float) -> Timing:
    """`run(i)` launches one step on input set i (alternating sets, so that repeated runs do not
    re-read one buffer from the cache) and returns its outputs."""
    import jax

    device = jax.devices()[0]
    peak_before = _jax_peak(device)
    start = time.perf_counter()
    jax.block_until_ready(run(0))
    first_call_s = time.perf_counter() - start
    for i in range(1, max(warmup, 1)):
        jax.block_until_ready(run(i))
    times: list[float] = []
    count = repeats
    i = 0
    while i < count:
        start = time.perf_counter()
        jax.block_until_ready(run(i))
        times.append((time.perf_counter() - start) * 1e3)
        if i == 0:
            count = repeats_within(times[0], repeats, max_timed_s)
        i += 1
    peak_after = _jax_peak(device)
    # JAX keeps one process-wide peak: it is this case's peak only if the case raised it.
    peak = peak_after if peak_after is not None and peak_before is not None and peak_after > peak_before else None
    return Timing(first_call_s, times, None, peak)


def _jax_peak(device) -> int | None:
    try:
        return (device.memory_stats() or {}).get("peak_bytes_in_use")
    except Exception:  # CPU devices and some plugins have no memory statistics
        return None


def time_torch(run: Callable[[int], Any], *, warmup: int, repeats: int, max_timed_s: float) -> Timing:
    import torch

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    run(0)
    torch.cuda.synchronize()
    first_call_s = time.perf_counter() - start
    for i in range(1, max(warmup, 1)):
        run(i)
    torch.cuda.synchronize()
    times: list[float] = []
    host: list[float] = []
    count = repeats
    i = 0
    while i < count:
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        host_start = time.perf_counter()
        begin.record()
        run(i)
        end.record()
        torch.cuda.synchronize()
        host.append((time.perf_counter() - host_start) * 1e3)
        times.append(begin.elapsed_time(end))
        if i == 0:
            count = repeats_within(times[0], repeats, max_timed_s)
        i += 1
    return Timing(first_call_s, times, host, int(torch.cuda.max_memory_allocated()))


def release_memory(framework: str | None = None) -> None:
    """Drop what the last case left: Python references, JAX's compiled executables, and PyTorch's
    cached blocks, so that the next implementation (in either framework) has the GPU's memory."""
    gc.collect()
    import jax

    jax.clear_caches()
    if framework == "torch":
        import torch

        torch.cuda.synchronize()
        torch.cuda.empty_cache()
