"""The arithmetic floor of a k-token forward, against the measured forwards.

A k-token forward of a quantized model issues k x (multiply-adds per token) / P integer
instructions, however the kernel is written: on an AVX-512 VNNI CPU 512-bit ``vpdpbusd``
(P = 64 int8 products), on an AVX2 CPU 256-bit ``vpmaddubsw`` (P = 32; the kernel path that
``specserve.model.qlinear`` picks decides which). This benchmark compiles the matching probe,
``bench/vnni_peak.cpp`` or ``bench/maddubs_peak.cpp``, and runs one copy per core at once,
which gives the instruction's best rate per core with every core busy (see the C++ files:
``register_fed``, the best case, and ``kernel_shape``, specserve's inner loop with its float
steps but already-unpacked weights; the AVX2 probe also reports ``bare``, the instruction
alone without the 16-bit adds that a block's sum needs). It then counts each model's
multiply-adds per token from its packed matrices and sets the floors beside the forward costs
that ``bench/runtime.py`` measured (``bench/results/runtime.json``, each round's own k = 1):

- ``floor_ms[k]``: the matmuls alone on every core at ``floor_rate_g_per_s``, the faster of the
  two loops (``register_fed`` and ``kernel_shape``) in the slowest copy;
- ``ratio_floor[k]``: that floor over the measured 1-token forward, i.e. the best k-to-1 ratio
  the arithmetic allows even if everything else in the forward cost nothing;
- ``kernel_fraction[k]``: the rate the measured forward implies, over that rate;
- on AVX2, ``mix_floor_ms[k]`` and ``ratio_mix_floor[k]``: the same at ``mix_unchained``'s rate,
  the kernel's own instructions with none of their chains, which no arrangement of that
  instruction mix can beat on this CPU.

Usage (from the repository root; nothing else running)::

    python -m bench.arithmetic                   # -> bench/results/arithmetic.json
    python -m bench.arithmetic --runtime bench/results/runtime-zen3.json \
        --out bench/results/arithmetic-zen3.json  # on the AVX2 machine of that run
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.common import REPO_ROOT, RESULTS_DIR

MODELS = ("qwen2.5-coder-1.5b-instruct", "qwen2.5-coder-0.5b-instruct", "smollm2-135m-instruct")
# kernel path -> (probe, instruction, int8 products per instruction)
PROBES = {
    "avx512": ("vnni_peak.cpp", "vpdpbusd zmm", 64),  # 16 int32 lanes x 4 products
    "avx2": ("maddubs_peak.cpp", "vpmaddubsw ymm", 32),  # 16 int16 lanes x 2 products
}


def kernel_probe() -> tuple[str, str, int]:
    """The probe for the kernel path this machine runs (specserve's own choice)."""
    from specserve.model.qlinear import native_module

    isa = native_module().isa()
    if isa not in PROBES:
        raise SystemExit(f"bench.arithmetic has no probe for the {isa!r} kernel path")
    return PROBES[isa]


def peak_rates(cores: int, source: Path) -> dict[str, Any]:
    """The probe on every core at once: each copy's rates and their per-core minimum."""
    compiler = shutil.which("g++")
    if compiler is None:
        raise SystemExit("bench.arithmetic needs g++ on PATH")
    with tempfile.TemporaryDirectory() as tmp:
        binary = Path(tmp) / source.stem
        subprocess.run([compiler, "-O3", "-march=native", str(source), "-o", str(binary)],
                       check=True)  # fmt: skip
        copies = [subprocess.Popen([str(binary)], stdout=subprocess.PIPE, text=True)
                  for _ in range(cores)]  # fmt: skip
        runs = [json.loads(p.communicate()[0]) for p in copies]
    # the integer step's best demonstrated rate: the better loop of each copy, then the
    # slowest copy (on a noisy VM the "best case" loop is not always the faster one)
    best = min(max(run["register_fed_g_per_s"], run["kernel_shape_g_per_s"]) for run in runs)
    return {
        "copies": runs,
        **{key: min(run[key] for run in runs) for key in runs[0]},
        "floor_rate_g_per_s": best,
    }


def products_per_token(name: str) -> int:
    """Multiply-adds of one token through every packed matrix (the LM head included)."""
    from specserve.model.catalog import resolve
    from specserve.model.loader import load_model
    from specserve.model.qlinear import PackedLinear

    model = load_model(str(resolve(name)[0]), progress=False)
    return sum(
        m.in_features * m.out_features for m in model.lm.modules() if isinstance(m, PackedLinear)
    )


def floors(
    name: str,
    measured: dict[str, Any],
    rate: float,
    cores: int,
    per_instruction: int,
    mix_rate: float | None = None,
) -> dict[str, Any]:
    """The floor of each k beside runtime.json's forwards (one entry per round); with
    ``mix_rate`` (the AVX2 probe's ``mix_unchained``) also the floor of the kernel's
    instruction mix with its latencies hidden."""
    products = products_per_token(name)
    forward = measured["specserve"]["forward"]["ms"]

    def floor_at(g_per_s: float) -> dict[str, float]:  # ms for k tokens' instructions
        return {k: int(k) * products / per_instruction / (cores * g_per_s * 1e6) for k in forward}

    floor = floor_at(rate)
    mix = floor_at(mix_rate) if mix_rate else None
    rounds = []
    for i, one in enumerate(forward["1"]["rounds_ms"]):
        taken = {k: forward[k]["rounds_ms"][i] for k in forward}
        entry = {
            "k1_ms": one,
            "ratio_floor": {k: round(floor[k] / one, 3) for k in forward},
            "kernel_fraction": {k: round(floor[k] / taken[k], 3) for k in forward},
        }
        if mix:
            entry["ratio_mix_floor"] = {k: round(mix[k] / one, 3) for k in forward}
        rounds.append(entry)
    result: dict[str, Any] = {"products_per_token": products}
    result["floor_ms"] = {k: round(v, 2) for k, v in floor.items()}
    result["rounds"] = rounds
    if mix:
        result["mix_floor_ms"] = {k: round(v, 2) for k, v in mix.items()}
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--runtime", type=Path, default=RESULTS_DIR / "runtime.json")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "arithmetic.json")
    args = parser.parse_args(argv)
    runtime = json.loads(args.runtime.read_text())
    cores = int(runtime["settings"].get("threads") or os.cpu_count() or 1)
    probe, instruction, per_instruction = kernel_probe()
    peak = peak_rates(cores, REPO_ROOT / "bench" / probe)
    rate = peak["floor_rate_g_per_s"]
    mix_key = "mix_unchained_g_per_s"
    models = {
        name: floors(
            name, runtime["results"][name], rate, cores, per_instruction, peak.get(mix_key)
        )
        for name in args.models
        if name in runtime["results"]
    }
    result = {
        "benchmark": "bench.arithmetic",
        "cores": cores,
        "instruction": instruction,
        "products_per_instruction": per_instruction,
        "peak_g_per_s_per_core": peak,
        "runtime_results": str(args.runtime.resolve().relative_to(REPO_ROOT)),
        "models": models,
    }
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    for name, m in models.items():
        first = m["rounds"][0]
        mix = f"; mix floor {first['ratio_mix_floor']}" if "ratio_mix_floor" in first else ""
        print(f"{name}: floor_ms {m['floor_ms']}; round 1 ratio floor {first['ratio_floor']}; "
              f"kernel fraction {first['kernel_fraction']}{mix}", file=sys.stderr)  # fmt: skip
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
