"""Show a tuning run: a terminal table, a Markdown table, two plots and ``report.json``.

The JSON keeps the raw measurements next to the summary so a run can be re-analysed
later (another threshold, another seed) without measuring again. Plots are drawn on a
bare `matplotlib.figure.Figure` with the Agg canvas: no pyplot global state and no GUI
backend, so this works headless and from inside a server process alike.
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
from collections.abc import Sequence
from dataclasses import asdict
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from specserve.tune.measure import Candidate, Measurement, ThroughputPoint
from specserve.tune.ranking import Ranked, Recommendation

SCHEMA_VERSION = 1
MAX_POSITIONS_SHOWN = 8  # acceptance columns beyond this only widen the table
DEFAULT_MARK = "*"  # next to the model's default drafter in the tables


def _num(value: float, fmt: str) -> str:
    return format(value, fmt) if math.isfinite(value) else "-"


def _throughput_lookup(
    throughput: Sequence[ThroughputPoint],
) -> tuple[list[int], dict[tuple[str, int], float]]:
    """Concurrency levels measured, and the mean tok/s per (candidate, concurrency)."""
    sums: dict[tuple[str, int], list[float]] = {}
    for p in throughput:
        sums.setdefault((p.candidate, p.concurrency), []).append(p.tokens_per_second)
    levels = sorted({p.concurrency for p in throughput})
    return levels, {key: sum(v) / len(v) for key, v in sums.items()}


def _table(
    ranked: Sequence[Ranked], throughput: Sequence[ThroughputPoint]
) -> tuple[list[str], list[list[str]]]:
    """Headers and cells shared by the terminal and the Markdown tables."""
    levels, tps = _throughput_lookup(throughput)
    headers = ["#", "candidate", "speedup [95% CI]", "e2e", "acc.len", "accept@pos", "p50 s"]
    headers += ["p95 s", *(f"c={c}" for c in levels)]
    rows = []
    for i, r in enumerate(ranked, start=1):
        c = r.candidate
        shown = r.acceptance_per_position[:MAX_POSITIONS_SHOWN]
        rows.append(
            [
                str(i),
                c.name + (f" {DEFAULT_MARK}" if c.is_default else ""),
                f"{_num(r.speedup, '.2f')}x [{_num(r.ci_low, '.2f')}-{_num(r.ci_high, '.2f')}]",
                f"{_num(r.end_to_end_speedup, '.2f')}x",
                _num(r.mean_accepted_length, ".2f"),
                " ".join(_num(a, ".2f") for a in shown) or "-",
                _num(r.latency_p50, ".3f"),
                _num(r.latency_p95, ".3f"),
                *(
                    _num(tps[(c.name, level)], ".1f") if (c.name, level) in tps else "-"
                    for level in levels
                ),
            ]
        )
    return headers, rows


def _footnote(ranked: Sequence[Ranked]) -> str:
    if not any(r.candidate.is_default for r in ranked):
        return ""
    return f"{DEFAULT_MARK} the model's default drafter"


def format_table(ranked: Sequence[Ranked], throughput: Sequence[ThroughputPoint]) -> str:
    """An aligned plain-text table, one row per candidate in rank order.

    Speedups are decode rates relative to plain decoding ("e2e" includes prefill);
    c=N columns are tok/s with N sequences at once.
    """
    headers, rows = _table(ranked, throughput)
    widths = [max(len(cell) for cell in column) for column in zip(headers, *rows, strict=True)]
    left = {1, 5}  # text columns; numbers are right-aligned so their digits line up

    def line(cells: Sequence[str]) -> str:
        parts = [
            cell.ljust(w) if i in left else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "  ".join(parts).rstrip()

    out = [line(headers), line(["-" * w for w in widths]), *(line(row) for row in rows)]
    if note := _footnote(ranked):
        out.append(note)
    return "\n".join(out)


def markdown_table(ranked: Sequence[Ranked], throughput: Sequence[ThroughputPoint]) -> str:
    """The same table as `format_table`, in GitHub Markdown for a README."""
    headers, rows = _table(ranked, throughput)
    align = [":---" if i in (1, 5) else "---:" for i in range(len(headers))]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"

    out = [line(headers), line(align), *(line(row) for row in rows)]
    if note := _footnote(ranked):
        out += ["", f"\\{note}"]
    return "\n".join(out)


def _family(c: Candidate) -> str:
    """The line a candidate belongs to in the speedup-vs-k plot: one per drafter."""
    if c.method == "ngram":
        return f"ngram n={c.ngram_length}"
    return f"draft {c.draft_model}"


def _new_figure(width: float = 8.0, height: float = 5.0) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def plot_speedup_vs_k(ranked: Sequence[Ranked], path: Path) -> None:
    """Speedup vs plain by draft token count, one line per drafter, CI as error bars."""
    fig = _new_figure()
    ax = fig.add_subplot()
    families: dict[str, list[Ranked]] = {}
    for r in ranked:
        if not r.candidate.is_plain and math.isfinite(r.speedup):
            families.setdefault(_family(r.candidate), []).append(r)
    ax.axhline(1.0, color="black", linestyle="--", linewidth=1, label="plain")
    for label, members in sorted(families.items()):
        members.sort(key=lambda r: r.candidate.draft_token_count)
        ks = [r.candidate.draft_token_count for r in members]
        ys = [r.speedup for r in members]
        below = [r.speedup - r.ci_low if math.isfinite(r.ci_low) else 0.0 for r in members]
        above = [r.ci_high - r.speedup if math.isfinite(r.ci_high) else 0.0 for r in members]
        bars = ax.errorbar(
            ks, ys, yerr=[[max(b, 0.0) for b in below], [max(a, 0.0) for a in above]],
            marker="o", capsize=3, label=label,
        )  # fmt: skip
        defaults = [r for r in members if r.candidate.is_default]
        for r in defaults:  # ring the default drafter so users see where they stand today
            ax.plot(
                [r.candidate.draft_token_count], [r.speedup], marker="o", markersize=14,
                markerfacecolor="none", color=bars[0].get_color(), linestyle="none",
            )  # fmt: skip
    if not families:
        ax.text(0.5, 0.5, "no speculation candidates", ha="center", transform=ax.transAxes)
    if any(r.candidate.is_default for r in ranked if not r.candidate.is_plain):
        ax.plot([], [], marker="o", markersize=10, markerfacecolor="none", color="gray",
                linestyle="none", label="default drafter")  # fmt: skip
    ax.set_title("Decode speedup vs plain decoding by draft token count (95% CI)")
    ax.set_xlabel("draft token count k (upper bound)")
    ax.set_ylabel("speedup vs plain (x)")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    fig.savefig(path, format="png")


def plot_acceptance_by_position(ranked: Sequence[Ranked], path: Path, top: int = 6) -> None:
    """Acceptance rate at each draft position for the `top` fastest speculating candidates.

    It shows where drafts stop paying: a position accepted rarely is a draft token the
    target verifies mostly in vain, a hint to lower k.
    """
    fig = _new_figure()
    ax = fig.add_subplot()
    shown = [r for r in ranked if not r.candidate.is_plain and r.acceptance_per_position][:top]
    for r in shown:
        rates = r.acceptance_per_position
        positions = list(range(1, len(rates) + 1))
        ax.plot(positions, rates, marker="o", label=f"{r.candidate.name} ({r.speedup:.2f}x)")
    if not shown:
        ax.text(0.5, 0.5, "no speculation candidates", ha="center", transform=ax.transAxes)
    ax.set_title(f"Draft acceptance by position (top {len(shown)} candidates)")
    ax.set_xlabel("draft position")
    ax.set_ylabel("accepted / proposed")
    ax.set_ylim(0.0, 1.05)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(True, alpha=0.3)
    if shown:
        ax.legend(loc="best", fontsize="small")
    fig.savefig(path, format="png")


def _version(package: str) -> str | None:
    module = sys.modules.get(package)
    if module is not None and hasattr(module, "__version__"):
        return str(module.__version__)
    try:  # no import: torch takes seconds to import just to read its version
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on; speedups do not transfer between machines."""
    return {
        "python": platform.python_version(),
        "torch": _version("torch"),
        "numpy": _version("numpy"),
        "specserve": _version("specserve"),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "platform": platform.platform(),
    }


def _json_safe(value: Any) -> Any:
    """NaN/inf become None (JSON has no NaN); paths and tuples become strings and lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def _ranked_entry(index: int, r: Ranked) -> dict[str, Any]:
    entry = {"rank": index, **asdict(r)}
    entry["candidate"]["flags"] = r.candidate.cli_flags()
    return entry


def write_report(
    out_dir: Path,
    *,
    target: str,
    settings: dict[str, Any],
    candidates: Sequence[Candidate],
    measurements: Sequence[Measurement],
    ranked: Sequence[Ranked],
    recommendation: Recommendation,
    throughput: Sequence[ThroughputPoint],
) -> dict[str, Path]:
    """Write ``report.json`` and both plots into `out_dir`; return their paths by name."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "report": out_dir / "report.json",
        "speedup_vs_k": out_dir / "speedup_vs_k.png",
        "acceptance_by_position": out_dir / "acceptance_by_position.png",
    }
    report = {
        "schema_version": SCHEMA_VERSION,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "target": target,
        "settings": settings,
        "machine": machine_info(),
        "recommendation": asdict(recommendation),
        "candidates": [{**asdict(c), "flags": c.cli_flags()} for c in candidates],
        "ranked": [_ranked_entry(i, r) for i, r in enumerate(ranked, start=1)],
        "throughput": [asdict(p) for p in throughput],
        "measurements": [asdict(m) for m in measurements],
    }
    text = json.dumps(_json_safe(report), indent=2, allow_nan=False, default=str)
    paths["report"].write_text(text + "\n", encoding="utf-8")
    plot_speedup_vs_k(ranked, paths["speedup_vs_k"])
    plot_acceptance_by_position(ranked, paths["acceptance_by_position"])
    return paths
