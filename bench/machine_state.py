"""How fast this machine's arithmetic and memory are right now, for the record of a run.

A virtual machine's speed drifts: on one Intel Xeon VM the integer step's peak rate read 5.4
G/s per core one day and 3.9 the next, while its memory slowed far less, so a wide forward's
cost over a step's moved from 2.15x to 3.16x with the same code (docs/benchmarks.md). A
benchmark whose goals are such ratios therefore records, beside its figures, the machine's
state when it ran: ``probe(threads)`` measures

- ``arithmetic_g_per_s``: the kernel path's integer instruction (``vpdpbusd`` or
  ``vpmaddubsw``) per second per core, register-fed, one copy of ``bench/arithmetic.py``'s
  probe per thread at once (the slowest copy);
- ``read_gb_s``: GB/s of a sum over a 512 MB float tensor on ``threads`` threads (a stream
  from memory, as a 1-token forward's weights are).

A few seconds; ``None`` with a reason where there is no compiler or no probe for the path.
"""

from __future__ import annotations

import statistics
import subprocess
import time
from typing import Any

import torch

READ_BYTES = 512 * 1024 * 1024


def read_bandwidth(threads: int, repeats: int = 5) -> float:
    """GB/s of summing READ_BYTES of floats on ``threads`` threads (median of ``repeats``)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        data = torch.ones(READ_BYTES // 4)
        data.sum()  # pages touched, threads started
        times = []
        for _ in range(repeats):
            begin = time.perf_counter()
            data.sum()
            times.append(time.perf_counter() - begin)
    finally:
        torch.set_num_threads(before)
    return READ_BYTES / statistics.median(times) / 1e9


def arithmetic_rate(threads: int) -> tuple[float | None, str | None]:
    """The kernel path's integer instruction, G/s per core register-fed, or None and why."""
    from bench.arithmetic import kernel_probe, peak_rates
    from bench.common import REPO_ROOT

    try:
        source, _, _ = kernel_probe()
        peak = peak_rates(threads, REPO_ROOT / "bench" / source)
    except (SystemExit, OSError, subprocess.CalledProcessError) as error:  # no g++ or probe
        return None, str(error)
    return float(peak["register_fed_g_per_s"]), None


def probe(threads: int) -> dict[str, Any]:
    """The machine's arithmetic and memory rates now (see the module's doc)."""
    rate, why = arithmetic_rate(threads)
    state: dict[str, Any] = {
        "time": time.strftime("%H:%M:%S"),
        "arithmetic_g_per_s": None if rate is None else round(rate, 2),
        "read_gb_s": round(read_bandwidth(threads), 1),
    }
    if why:
        state["arithmetic_unavailable"] = why
    return state


def describe(state: dict[str, Any]) -> str:
    """One line for a report."""
    rate = state["arithmetic_g_per_s"]
    arithmetic = "-" if rate is None else f"{rate:.2f} G/s per core"
    return f"{state['time']}: arithmetic {arithmetic}, memory read {state['read_gb_s']:.1f} GB/s"
