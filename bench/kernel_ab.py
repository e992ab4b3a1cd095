"""Two builds of the native extension timed in turn inside one process, on a model's matrices.

A VM's speed drifts by tens of percent from one minute to the next (docs/benchmarks.md), so
two builds timed in separate processes minutes apart compare the VM's states as much as the
kernels. This loads both builds side by side (each its own module and thread pool) and
calls them in turn, A then B, on every distinct packed matrix of the model, with the same
activations. Each pair of calls must give the same bits (a kernel change that is meant to
change them fails here). Printed: each matrix's median per call and the model's matmul time
per forward, each matrix weighted by how many layers have it.

Both builds must read the packing of the checked-out Python code: this compares kernels,
not layouts. Usage (from the repository root; nothing else running)::

    cp specserve/model/_native*.so /tmp/before.so     # the build before the change
    python setup.py build_ext --inplace              # the build after it
    python -m bench.kernel_ab /tmp/before.so specserve/model/_native*.so --rows 1,8,16
"""

from __future__ import annotations

import argparse
import importlib.machinery
import importlib.util
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from bench.common import machine_info, markdown_table, write_json

NATIVE = "specserve.model._native"


def load_build(path: Path) -> ModuleType:
    """One build of the extension as a module of its own (its own globals and pool).

    It is loaded from a private copy: given the path of a build this process has already
    imported (``specserve/model/_native*.so`` once a model is loaded), Python hands back
    the imported module for both builds, and the two "builds" compared are one."""
    if not path.is_file():
        raise SystemExit(f"{path}: no such file")
    copy = Path(tempfile.mkdtemp(prefix="specserve-build-")) / path.name
    shutil.copyfile(path, copy)
    loader = importlib.machinery.ExtensionFileLoader(NATIVE, str(copy))
    spec = importlib.util.spec_from_file_location(NATIVE, copy, loader=loader)
    if spec is None:
        raise SystemExit(f"{path}: not a loadable extension")
    try:
        module = importlib.util.module_from_spec(spec)  # dlopen happens here
        loader.exec_module(module)
    except ImportError as error:
        raise SystemExit(f"{path}: not a build of specserve's extension ({error})") from None
    finally:
        shutil.rmtree(copy.parent)  # the mapping outlives the file
    return module


def gguf_type(mode: int, bits: int) -> str:
    """A packed part's (mode, bits) as the GGUF type it came from (specserve/model/packing.py)."""
    from specserve.model.packing import AFFINE16, K6, KAFFINE, SYM16

    names = {(SYM16, 4): "Q4_0", (AFFINE16, 4): "Q4_1", (SYM16, 5): "Q5_0", (SYM16, 8): "Q8_0",
             (KAFFINE, 4): "Q4_K", (KAFFINE, 5): "Q5_K", (K6, 6): "Q6_K"}  # fmt: skip
    return names.get((mode, bits), f"mode {mode} {bits}-bit")


def distinct_matrices(model: Any) -> list[tuple[str, Any, int]]:
    """(label, one PackedLinear, how many have its types and shape), largest first."""
    from specserve.model.qlinear import PackedLinear

    groups: dict[tuple[int, int, str], list[Any]] = {}
    for module in model.lm.modules():
        if isinstance(module, PackedLinear):
            kinds = "+".join(gguf_type(spec[0], spec[1]) for spec in module.spec)
            groups.setdefault((module.out_features, module.in_features, kinds), []).append(module)
    ordered = sorted(groups.items(), key=lambda item: -item[0][0] * item[0][1])
    return [(f"{out}x{inp} {kinds}", same[0], len(same)) for (out, inp, kinds), same in ordered]


def time_pair(
    builds: Sequence[ModuleType], layer: Any, x: torch.Tensor, repeats: int
) -> list[float]:
    """Median ms per call of each build, the builds called in turn; their outputs must agree."""
    outs = [torch.empty(x.shape[0], layer.padded) for _ in builds]
    times: list[list[float]] = [[] for _ in builds]
    for _ in range(repeats):
        for build, out, taken in zip(builds, outs, times, strict=True):
            begin = time.perf_counter()
            build.linear(x.data_ptr(), x.shape[0], x.shape[1], out.data_ptr(), layer.padded,
                         layer.spec)  # fmt: skip
            taken.append(time.perf_counter() - begin)
            build.park()  # its workers must not spin while the other build runs
    if not torch.equal(outs[0], outs[1]):
        raise SystemExit(f"the builds disagree on {layer!r} at {x.shape[0]} rows")
    return [statistics.median(taken) * 1e3 for taken in times]


def compare(
    model: Any, builds: Sequence[ModuleType], rows: Sequence[int], repeats: int
) -> list[dict[str, Any]]:
    """Both builds on every distinct matrix at each row count (the same activations)."""
    matrices = distinct_matrices(model)
    torch.manual_seed(0)
    activations = torch.randn(max(rows), max(layer.in_features for _, layer, _ in matrices))
    results = []
    for m in rows:
        for label, layer, count in matrices:
            x = activations[:m, : layer.in_features].contiguous()
            a_ms, b_ms = time_pair(builds, layer, x, repeats)
            results.append({"rows": m, "matrix": label, "count": count, "a_ms": round(a_ms, 4),
                            "b_ms": round(b_ms, 4)})  # fmt: skip
    return results


def report(results: list[dict[str, Any]]) -> str:
    """One markdown table per row count, with the forward's total."""
    lines = []
    for m in sorted({r["rows"] for r in results}):
        at = [r for r in results if r["rows"] == m]
        cells = [(r["matrix"], r["count"], f"{r['a_ms']:.3f}", f"{r['b_ms']:.3f}",
                  f"{r['b_ms'] / r['a_ms']:.3f}") for r in at]  # fmt: skip
        a = sum(r["a_ms"] * r["count"] for r in at)
        b = sum(r["b_ms"] * r["count"] for r in at)
        cells.append(("all matmuls of a forward", "", f"{a:.2f}", f"{b:.2f}", f"{b / a:.3f}"))
        lines += [
            f"\n{m} rows:",
            markdown_table(("matrix", "layers", "A ms", "B ms", "B/A"), cells),
        ]
    return "\n".join(lines)


def row_counts(text: str) -> list[int]:
    """--rows: comma-separated positive integers."""
    try:
        rows = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of row counts: {text!r}") from None
    if min(rows) < 1:
        raise argparse.ArgumentTypeError("row counts are positive")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("a", type=Path, help="the first build (.so)")
    parser.add_argument("b", type=Path, help="the second build (.so)")
    parser.add_argument("--model", default="qwen2.5-coder-1.5b-instruct")
    parser.add_argument("--rows", type=row_counts, default="1,8,16", help="e.g. 1,8,16")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=13, help="calls of each build per matrix")
    parser.add_argument("--out", type=Path, help="also write the results as JSON")
    args = parser.parse_args(argv)
    for path in (args.a, args.b):
        if not path.is_file():
            parser.error(f"{path}: no such file")
    from specserve.model.loader import load_model

    model = load_model(args.model, dtype="gguf", progress=False)
    builds = [load_build(args.a), load_build(args.b)]
    for build in builds:
        build.set_threads(args.threads)
    results = compare(model, builds, args.rows, args.repeats)
    print(f"A = {args.a}\nB = {args.b}\n{args.model}, {args.threads} thread(s), "
          f"medians of {args.repeats} calls (ISA {builds[1].isa()})" + report(results))  # fmt: skip
    if args.out:
        write_json(args.out, {"benchmark": "kernel_ab", "machine": machine_info(args.threads),
                              "a": str(args.a), "b": str(args.b), "model": args.model,
                              "results": results})  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
