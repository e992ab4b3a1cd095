"""`specserve tune` reporting: report.json, the PNG plots and the tables."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from specserve.tune.measure import Candidate, Measurement, ThroughputPoint
from specserve.tune.ranking import Ranked, rank, recommend
from specserve.tune.report import format_table, markdown_table, write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

PLAIN = Candidate("plain", None)
CANDIDATES = [
    PLAIN,
    *(
        Candidate(f"ngram n={n} k<={k}", "ngram", draft_token_count=k, ngram_length=n,
                  is_default=(n, k) == (3, 4))
        for n in (2, 3)
        for k in (1, 2, 4)
    ),
    Candidate("draft tiny k<=2", "draft_model", draft_token_count=2, draft_model="tiny"),
]  # fmt: skip
THROUGHPUT = [
    ThroughputPoint("plain", 1, 40.0),
    ThroughputPoint("plain", 4, 120.0),
    ThroughputPoint("ngram n=3 k<=4", 1, 61.5),
    ThroughputPoint("ngram n=3 k<=4", 4, 150.25),
]


def synthetic_measurements() -> list[Measurement]:
    """Deterministic measurements: longer drafts accept less per position."""
    out = []
    for c in CANDIDATES:
        k = c.draft_token_count
        for p in range(5):
            tokens = 40 + 10 * p
            proposed = [10] * k
            accepted = [max(0, 9 - 3 * i) for i in range(k)]
            steps = tokens - sum(accepted) if k else tokens
            speed = 1.0 + 0.1 * k * (c.ngram_length or 1) - 0.05 * p * (c.method is not None)
            seconds = tokens / 40.0 / speed
            out.append(
                Measurement(
                    candidate=c.name, prompt_index=p, tokens=tokens, decode_seconds=seconds,
                    total_seconds=seconds + 0.2, target_steps=steps, proposed=sum(proposed),
                    accepted=sum(accepted), proposed_per_position=proposed,
                    accepted_per_position=accepted, identical_to_plain=True,
                )
            )  # fmt: skip
    return out


@pytest.fixture(scope="module")
def ranked() -> list[Ranked]:
    return rank(CANDIDATES, synthetic_measurements(), resamples=200)


def test_write_report_writes_json_and_plots(tmp_path: Path, ranked: list[Ranked]) -> None:
    measurements = synthetic_measurements()
    recommendation = recommend(ranked)
    out = tmp_path / "nested" / "tune"
    paths = write_report(
        out, target="smollm2-135m-instruct", settings={"max_tokens": 64, "prompts": "p.jsonl"},
        candidates=CANDIDATES, measurements=measurements, ranked=ranked,
        recommendation=recommendation, throughput=THROUGHPUT,
    )  # fmt: skip
    assert set(paths) == {"report", "speedup_vs_k", "acceptance_by_position"}
    assert {p.name for p in out.iterdir()} == {
        "report.json", "speedup_vs_k.png", "acceptance_by_position.png",
    }  # fmt: skip

    text = paths["report"].read_text()
    assert "NaN" not in text
    report = json.loads(text)
    assert report["target"] == "smollm2-135m-instruct"
    assert report["settings"]["max_tokens"] == 64
    assert report["machine"]["cpu_count"] >= 1 and report["machine"]["python"]
    rec = report["recommendation"]
    assert rec["candidate"]["name"] == recommendation.candidate.name
    assert rec["reason"] == recommendation.reason and rec["flags"] == recommendation.flags
    assert [r["candidate"]["name"] for r in report["ranked"]] == [r.candidate.name for r in ranked]
    assert {c["name"] for c in report["candidates"]} == {c.name for c in CANDIDATES}
    first = report["ranked"][0]
    assert first["rank"] == 1 and first["speedup"] == pytest.approx(ranked[0].speedup)
    assert first["acceptance_per_position"] == pytest.approx(ranked[0].acceptance_per_position)
    assert len(report["measurements"]) == len(measurements)
    assert report["throughput"][3] == {
        "candidate": "ngram n=3 k<=4", "concurrency": 4, "tokens_per_second": 150.25,
    }  # fmt: skip

    for name in ("speedup_vs_k", "acceptance_by_position"):
        data = paths[name].read_bytes()
        assert data.startswith(PNG_SIGNATURE)
        assert len(data) > 10_000  # axes, lines and a legend, not an empty canvas


def test_report_json_has_no_nan(tmp_path: Path) -> None:
    # Single-token outputs: zero decode time, undefined speedups. JSON must still be valid.
    draft = Candidate("ngram n=1 k<=1", "ngram", draft_token_count=1, ngram_length=1)
    ms = [Measurement(c.name, 0, 1, 0.0, 0.1, 1, 0, 0, [], [], True) for c in (PLAIN, draft)]
    ranked = rank([PLAIN, draft], ms, resamples=10)
    paths = write_report(
        tmp_path, target="t", settings={}, candidates=[PLAIN, draft], measurements=ms,
        ranked=ranked, recommendation=recommend(ranked), throughput=[],
    )  # fmt: skip
    report = json.loads(paths["report"].read_text())
    undefined = next(r for r in report["ranked"] if r["candidate"]["name"] == draft.name)
    assert undefined["speedup"] is None and undefined["ci_low"] is None
    assert paths["speedup_vs_k"].read_bytes().startswith(PNG_SIGNATURE)


def test_format_table_lists_every_candidate_and_throughput(ranked: list[Ranked]) -> None:
    table = format_table(ranked, THROUGHPUT)
    lines = table.splitlines()
    header = lines[0].split()
    assert header[-2:] == ["c=1", "c=4"]
    for c in CANDIDATES:
        assert c.name in table
    rows = lines[2 : 2 + len(ranked)]
    assert [row.split()[0] for row in rows] == [str(i) for i in range(1, len(ranked) + 1)]
    default_row = next(row for row in rows if "ngram n=3 k<=4" in row)
    assert "*" in default_row and default_row.split()[-2:] == ["61.5", "150.2"]
    no_points = next(row for row in rows if "draft tiny" in row)
    assert no_points.split()[-2:] == ["-", "-"]
    assert len({len(line) for line in lines[:2]}) == 1  # header and rule align
    assert "default drafter" in lines[-1]


def test_format_table_without_throughput_has_no_concurrency_columns(
    ranked: list[Ranked],
) -> None:
    table = format_table(ranked, [])
    assert "c=" not in table.replace("k<=", "")


def test_markdown_table(ranked: list[Ranked]) -> None:
    md = markdown_table(ranked, THROUGHPUT)
    lines = md.splitlines()
    assert lines[0].startswith("| # | candidate |") and "| c=1 | c=4 |" in lines[0]
    assert set(lines[1]) <= set("|-: ")
    assert sum(1 for line in lines if line.startswith("| ") and "x [" in line) == len(ranked)
    for c in CANDIDATES:
        assert c.name in md
