"""Rounds of the runtime benchmark's workers, merged figure by figure by the median.

On a shared 2-core VM the memory bandwidth drifts from minute to minute: in consecutive
runs the 1.5B's 1-token forward measured 19 and 30 ms while its 16-token forward (bound by
arithmetic, not by memory) stayed at 58-69 ms. One round can therefore favour one engine,
or make k-forward ratios look good or bad. With ``--rounds N`` every (model, engine) worker
runs N times, the engines taking turns in alternating order, and each figure is the median
of its N measurements; every round's value is kept beside it. Each goal is judged on its
median round (`judge_by_round`): a ratio between two measurements taken minutes apart in one
round (specserve and llama.cpp; k tokens and 1) is fairer than one between medians taken
from different rounds.

>>> runs = [{"decode": {"tokens_per_second": v}} for v in (30.0, 50.0, 40.0)]
>>> merged = merge_runs([{**r, "prefill": r["decode"]} for r in runs])
>>> merged["decode"]["tokens_per_second"], merged["decode"]["rounds"]
(40.0, [30.0, 50.0, 40.0])
"""

from __future__ import annotations

from statistics import median
from typing import Any

Results = dict[str, dict[str, Any]]  # model -> engine -> a worker's result


def merge(rounds: list[Results]) -> Results:
    """One result per (model, engine): the median of the rounds that did not fail."""
    merged: Results = {}
    for model, engines in rounds[0].items():
        merged[model] = {}
        for engine, first in engines.items():
            runs = [r[model][engine] for r in rounds if "error" not in r[model][engine]]
            merged[model][engine] = merge_runs(runs) if runs else first
    return merged


def merge_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Decode and prefill: the median round's figures; forwards: the median of each k's
    time, the ratios recomputed from those; peak memory: the largest."""
    if len(runs) == 1:
        return runs[0]
    out = dict(runs[0])
    for part in ("decode", "prefill"):
        ordered = sorted(runs, key=lambda r: r[part]["tokens_per_second"])
        values = [r[part]["tokens_per_second"] for r in runs]
        out[part] = {**ordered[len(ordered) // 2][part], "rounds": values}
    if "forward" in out:
        out["forward"] = _merge_forwards([r["forward"] for r in runs])
    if "peak_rss_mb" in out:
        out["peak_rss_mb"] = max(r["peak_rss_mb"] for r in runs)
    return out


def _merge_forwards(forwards: list[dict[str, Any]]) -> dict[str, Any]:
    ms: dict[str, Any] = {}
    for k in forwards[0]["ms"]:
        values = [f["ms"][k]["median_ms"] for f in forwards]
        ms[k] = {"median_ms": round(median(values), 3), "rounds_ms": values}
    base = ms["1"]["median_ms"]
    ratios = {k: round(v["median_ms"] / base, 3) for k, v in ms.items()}
    rounds = [f["ratio_to_k1"] for f in forwards]
    return {**forwards[0], "ms": ms, "ratio_to_k1": ratios, "rounds_ratio_to_k1": rounds}


def judge_by_round(
    found: list[dict[str, Any]], per_round: list[list[dict[str, Any]]], value: str = "measured"
) -> None:
    """Make each goal its median round's (by its numeric ``value``), every round's figure kept
    as ``rounds`` (None where a worker failed). Goals: dicts with goal, ``value``, met, and a
    model where there are several.

    >>> found = [{"model": "m", "goal": "g", "measured": 0.9, "met": False}]
    >>> def round_of(v): return [{"model": "m", "goal": "g", "measured": v, "met": v >= 1}]
    >>> rounds = [round_of(v) for v in (1.1, 0.9, 1.3)]
    >>> judge_by_round(found, rounds); found[0]["measured"], found[0]["met"], found[0]["rounds"]
    (1.1, True, [1.1, 0.9, 1.3])
    """
    indexed = [{(g.get("model"), g["goal"]): g for g in goals} for goals in per_round]
    for goal in found:
        each = [r.get((goal.get("model"), goal["goal"])) for r in indexed]
        judged = sorted((g for g in each if g is not None), key=lambda g: g[value])
        if judged:
            goal.update(judged[len(judged) // 2])
        goal["rounds"] = [None if g is None else g[value] for g in each]
