"""Timing shared by the benchmark scripts."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def time_ms(fn: Callable[[], object], device: torch.device, rep_ms: int = 100) -> float:
    """Median milliseconds of fn(): triton's do_bench (CUDA events, L2 flushed) on a GPU; a few
    wall-clock calls after a warm-up elsewhere (the --smoke runs only check the plumbing)."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=max(25, rep_ms // 10), rep=rep_ms, return_mode="median"))
    fn()
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)
