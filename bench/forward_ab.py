"""Two builds of the native extension timed in turn on a model's whole forwards, one process.

``bench.kernel_ab`` compares builds on single matrices; a change outside the matmuls
(attention, the layer's element-wise work) shows only in whole forwards. This loads both
builds side by side (``kernel_ab.load_build``), points the model at one, then the other
(the idle build's workers parked, so they do not spin on a core), and times k-token
forwards after a context of P positions, the order of the two builds alternating each
call. Each pair of calls must give bit-identical logits. Printed: median ms per build and
the ratio B / A for each (P, k). A build against a copy of itself reads ~0.985-1.0 on the
Intel Xeon VM: the method's resolution. Usage (repository root; nothing else running)::

    cp specserve/model/_native*.so /tmp/before.so     # the build before the change
    python setup.py build_ext --inplace              # the build after it
    python -m bench.forward_ab /tmp/before.so specserve/model/_native*.so \\
        --model smollm2-135m-instruct --positions 512,2048 --ks 1,16
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from bench.common import machine_info, markdown_table, set_threads, write_json
from bench.kernel_ab import load_build
from bench.runtime import Forwards, context_ids


def time_forwards(
    fwd: Forwards, builds: list[ModuleType], new: list[int], start: int, k: int, calls: int
) -> list[float]:
    """Median ms of a k-token forward at ``start`` with each build, the builds in turn."""
    from specserve.model import qlinear

    times: list[list[float]] = [[] for _ in builds]
    for call in range(calls + 1):  # the first pair warms up
        order = list(range(len(builds)))[:: 1 if call % 2 == 0 else -1]
        logits = []
        for b in order:
            builds[1 - b].park()
            qlinear._native = builds[b]  # what native_module() hands the model
            begin = time.perf_counter()
            logits.append(fwd(new[:k], start))
            if call:
                times[b].append((time.perf_counter() - begin) * 1e3)
        if not torch.equal(logits[0], logits[1]):
            raise SystemExit(f"the builds' logits differ at P={start}, k={k}")
    return [statistics.median(t) for t in times]


def run(args: argparse.Namespace) -> dict[str, Any]:
    builds = [load_build(args.a), load_build(args.b)]
    set_threads(args.threads)
    for build in builds:
        build.set_threads(args.threads)
    fwd = Forwards(args.model)
    ids = context_ids(fwd.model.tokenizer, max(args.positions) + max(args.ks))
    rows = []
    for start in args.positions:
        fwd.reset(start + max(args.ks))
        fwd(ids[:start], 0, last_logits=1)
        for k in args.ks:
            a, b = time_forwards(fwd, builds, ids[start:], start, k, args.calls)
            rows.append({"positions": start, "k": k, "a_ms": round(a, 2), "b_ms": round(b, 2),
                         "b_over_a": round(b / a, 3)})  # fmt: skip
    return {"benchmark": "bench.forward_ab", "machine": machine_info(args.threads),
            "a": str(args.a), "b": str(args.b), "model": args.model, "calls": args.calls,
            "results": rows}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("a", type=Path, help="build A (e.g. before the change)")
    parser.add_argument("b", type=Path, help="build B (e.g. after it)")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--positions", default="512", help="context lengths, comma-separated")
    parser.add_argument("--ks", default="1,16", help="tokens per forward, comma-separated")
    parser.add_argument("--calls", type=int, default=20, help="timed calls per build")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, help="also write the results as JSON")
    args = parser.parse_args(argv)
    args.positions = [int(p) for p in args.positions.split(",")]
    args.ks = [int(k) for k in args.ks.split(",")]
    payload = run(args)
    table = [[r["positions"], r["k"], r["a_ms"], r["b_ms"], r["b_over_a"]]
             for r in payload["results"]]  # fmt: skip
    print(markdown_table(["positions", "k", "A ms", "B ms", "B / A"], table))
    if args.out:
        print(f"wrote {write_json(args.out, payload)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
