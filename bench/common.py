"""Helpers shared by the benchmark scripts: prompts, timing, machine facts, result files.

Every script in ``bench/`` measures on real models and real prompts and reports its speeds
next to a baseline measured in the same run (DESIGN.md, "Measured, not assumed"). This module
holds what they share, so that two scripts pick the same prompts and time the same way:

>>> prompts = sample_prompts(6)                                   # doctest: +SKIP
>>> [p.category for p in prompts]                                 # doctest: +SKIP
['mt_bench', 'translation', 'summarization', 'qa', 'math_reasoning', 'rag']
>>> stats = time_call(lambda: sum(range(1000)), repeats=20, warmup=3)
>>> stats.repeats
20
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import gc
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "bench" / "results"
SHARED_ENV = "SPECSERVE_SHARED"  # overrides where the shared data directory is
SPEC_BENCH_FILE = Path("data") / "spec_bench" / "question.jsonl"

# Spec-Bench's six task groups, in the order of its paper; the eight MT-bench categories of
# question.jsonl (writing, roleplay, ...) form the first group.
SPEC_BENCH_GROUPS = ("mt_bench", "translation", "summarization", "qa", "math_reasoning", "rag")


# ----------------------------------------------------------------------------- prompts


@dataclass(frozen=True)
class Prompt:
    """One benchmark prompt: the first user turn of a Spec-Bench question."""

    question_id: int
    category: str  # a Spec-Bench group (SPEC_BENCH_GROUPS)
    text: str


def shared_dir() -> Path:
    """The shared data directory: ``$SPECSERVE_SHARED``, else ``<repo>/../shared``."""
    env = os.environ.get(SHARED_ENV)
    return Path(env).expanduser() if env else Path(__file__).resolve().parents[2] / "shared"


def spec_bench_group(category: str) -> str:
    """Spec-Bench category of question.jsonl -> its task group (MT-bench ones fold into one)."""
    return category if category in SPEC_BENCH_GROUPS else "mt_bench"


def load_spec_bench(path: Path | None = None) -> list[Prompt]:
    """All Spec-Bench questions (first turn each), in file order."""
    path = path or shared_dir() / SPEC_BENCH_FILE
    if not path.exists():
        raise FileNotFoundError(
            f"Spec-Bench questions not found at {path}; set {SHARED_ENV} to the shared directory"
        )
    prompts = []
    with path.open(encoding="utf-8") as lines:
        for line in lines:
            if line.strip():
                row = json.loads(line)
                group = spec_bench_group(row["category"])
                prompts.append(Prompt(int(row["question_id"]), group, row["turns"][0]))
    return prompts


def sample_prompts(n: int, prompts: Sequence[Prompt] | None = None) -> list[Prompt]:
    """A fixed, deterministic sample of ``n`` prompts spread over the Spec-Bench groups.

    Groups take turns (round robin, in SPEC_BENCH_GROUPS order); within a group the picks sit
    at fractions 0, 1/2, 1/4, 3/4, ... of its questions in file order, so they are spread out
    (MT-bench: different sub-categories) and a larger ``n`` keeps a smaller one's prompts.
    """
    prompts = load_spec_bench() if prompts is None else prompts
    by_group: dict[str, list[Prompt]] = {g: [] for g in SPEC_BENCH_GROUPS}
    for prompt in prompts:
        by_group.setdefault(prompt.category, []).append(prompt)
    groups = [g for g, members in by_group.items() if members]
    if n > len(prompts):
        raise ValueError(f"asked for {n} prompts; only {len(prompts)} exist")
    per_group = [(n + len(groups) - 1 - i) // len(groups) for i in range(len(groups))]
    sample: list[Prompt] = []
    for i in range(max(per_group)):
        for group, count in zip(groups, per_group, strict=True):
            if i < count:
                members = by_group[group]
                sample.append(members[int(_van_der_corput(i) * len(members))])
    return sample


def _van_der_corput(i: int) -> float:
    """0, 1/2, 1/4, 3/4, 1/8, ...: spread points in [0, 1) whose prefixes stay spread."""
    value, denominator = 0.0, 1.0
    while i:
        denominator *= 2
        i, bit = divmod(i, 2)
        value += bit / denominator
    return value


# ----------------------------------------------------------------------------- timing


@dataclass(frozen=True)
class TimingStats:
    """Wall-clock seconds of repeated calls, after warm-up calls that are not counted."""

    median_s: float
    min_s: float
    max_s: float
    repeats: int

    @classmethod
    def of(cls, seconds: Sequence[float]) -> TimingStats:
        if not seconds:
            raise ValueError("no timings")
        return cls(statistics.median(seconds), min(seconds), max(seconds), len(seconds))

    def as_ms(self) -> dict[str, float | int]:
        return {
            "median_ms": round(self.median_s * 1e3, 3),
            "min_ms": round(self.min_s * 1e3, 3),
            "max_ms": round(self.max_s * 1e3, 3),
            "repeats": self.repeats,
        }


def time_call(
    fn: Callable[[], object],
    repeats: int,
    warmup: int = 2,
    after: Callable[[], object] | None = None,
) -> TimingStats:
    """Call ``fn`` ``warmup`` times untimed, then ``repeats`` times timed (median is robust to
    the odd preempted call). ``after`` runs after each call, outside the timed span (e.g. to
    roll a cache back)."""
    seconds = []
    for i in range(warmup + repeats):
        begin = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - begin
        if after is not None:
            after()
        if i >= warmup:
            seconds.append(elapsed)
    return TimingStats.of(seconds)


def time_in_turns(
    calls: dict[str, Callable[[], object]],
    repeats: int,
    warmup: int = 2,
    after: dict[str, Callable[[], object]] | None = None,
) -> dict[str, TimingStats]:
    """Time several alternatives taking turns, call by call, so that a background load that
    comes and goes hits them alike (their ratio is then fair even on a busy machine).

    Like ``time_call`` for each entry of ``calls``; ``after[name]`` runs untimed after each
    call of ``calls[name]``.
    """
    after = after or {}
    seconds: dict[str, list[float]] = {name: [] for name in calls}
    for i in range(warmup + repeats):
        for name, fn in calls.items():
            begin = time.perf_counter()
            fn()
            elapsed = time.perf_counter() - begin
            if name in after:
                after[name]()
            if i >= warmup:
                seconds[name].append(elapsed)
    return {name: TimingStats.of(values) for name, values in seconds.items()}


def set_threads(threads: int) -> None:
    """Pin the compute threads (the knob that matters for single-stream decoding)."""
    from specserve.model.loader import set_compute_threads

    set_compute_threads(threads)


def free_memory() -> None:
    """Drop a model between measurements so the next one starts from a clean heap."""
    gc.collect()


# ----------------------------------------------------------------------------- machine


def _cpuinfo() -> dict[str, str]:
    """The first processor's entries of /proc/cpuinfo (empty where there is none)."""
    info: dict[str, str] = {}
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return info
    for line in text.splitlines():
        if not line.strip():
            break  # the end of the first processor's block
        key, _, value = line.partition(":")
        info[key.strip()] = value.strip()
    return info


# CPU features that decide which kernels are fast for LLM inference on x86.
_CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16", "amx_tile")


def machine_info(threads: int) -> dict[str, Any]:
    """Facts a reader needs to compare a result file with another machine's."""
    cpu = _cpuinfo()
    flags = set(cpu.get("flags", "").split())
    info: dict[str, Any] = {
        "cpu_model": cpu.get("model name") or platform.processor() or "unknown",
        # Virtual machines often hide the model name ("AMD EPYC"); family/model still tell
        # the generation (e.g. AMD family 25 = Zen 3/Zen 4).
        "cpu_family_model": f"{cpu.get('cpu family', '?')}/{cpu.get('model', '?')}",
        "cpu_flags": [f for f in _CPU_FLAGS if f in flags],
        "logical_cpus": os.cpu_count(),
        "threads": threads,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }
    with contextlib.suppress(OSError):  # a hint of a busy machine
        info["load_average_1m"] = round(os.getloadavg()[0], 2)
    return info


def package_version(name: str) -> str | None:
    """The installed version of a distribution, or None."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


# ----------------------------------------------------------------------------- output


def write_json(path: Path, payload: dict[str, Any]) -> Path:
    """Write ``payload`` (dataclasses allowed) as indented JSON, creating the directory."""

    def default(value: object) -> object:
        if is_dataclass(value) and not isinstance(value, type):
            return asdict(value)
        if isinstance(value, Path):
            return str(value)
        raise TypeError(f"cannot serialize {type(value).__name__}")

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=default) + "\n", encoding="utf-8")
    return path


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A GitHub-flavoured markdown table; floats keep their formatting from the caller."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt_number(value: float | None, digits: int = 1) -> str:
    """A table cell: ``-`` for a missing figure."""
    return "-" if value is None else f"{value:.{digits}f}"
