"""`specserve tune` end to end on a tiny model: report, plots, recommendation, --apply."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from specserve.cli import main
from specserve.deployments.store import DeploymentStore
from specserve.engine.prompt_file import PromptFileError, PromptRecord, load_prompts
from specserve.model.loader import Model
from specserve.tune.measure import Candidate
from specserve.tune.runner import measure

ROWS = [
    {"messages": [{"role": "user", "content": "the cat the cat the cat the cat"}]},
    {"prompt": "in the in the in the in the", "prediction": "in the in the"},
    {
        "messages": [{"role": "user", "content": "abc"}],
        "prediction": {"type": "content", "content": "ab"},
    },
    {"time": 1.0, "deployment": "x", "prompt_token_ids": [5, 6, 7, 5, 6, 7]},  # a traffic-log row
]


def _write(path: Path, rows: list[object]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_tune_reports_recommends_and_applies(
    tiny_gguf: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("SPECSERVE_HOME", str(tmp_path / "home"))
    assert main(["deployment", "create", str(tiny_gguf), "--id", "tiny"]) == 0
    prompts = _write(tmp_path / "prompts.jsonl", ROWS)
    out = tmp_path / "report"
    argv = ["tune", "tiny", "--prompts", str(prompts), "--max-tokens", "16", "--dtype", "float32"]
    argv += ["--ngram-lengths", "1,2", "--draft-token-counts", "2,4", "--concurrency", "1,2"]
    assert main([*argv, "--out", str(out), "--apply"]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    names = {c["name"] for c in report["candidates"]}
    assert names == {
        "plain",
        "ngram n=3 k<=4",
        *(f"ngram n={n} k<={k}" for n in (1, 2) for k in (2, 4)),
    }
    assert all(r["identical"] for r in report["ranked"])  # lossless: every output == plain
    assert len(report["measurements"]) == len(names) * len(ROWS)
    assert {p["concurrency"] for p in report["throughput"]} == {1, 2}
    for plot in ("speedup_vs_k.png", "acceptance_by_position.png"):
        assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    recommendation = report["recommendation"]
    assert "Recommendation:" in printed and recommendation["reason"] in printed
    # --apply deployed exactly the recommended flags (or --no-speculation).
    deployed = DeploymentStore(tmp_path / "home" / "deployments.db").get("tiny")
    assert deployed.flags.as_cli() == recommendation["flags"]


def test_tune_errors(
    tiny_gguf: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("SPECSERVE_HOME", str(tmp_path))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "fine"}\n{"messages": "not a list"}\n', encoding="utf-8")
    with pytest.raises(PromptFileError, match=r"bad.jsonl:2: 'messages'"):
        load_prompts(bad)
    bad.write_text('{"prompt": "fine"}\n\n{oops\n', encoding="utf-8")
    with pytest.raises(PromptFileError, match=r"bad.jsonl:3: not valid JSON"):
        load_prompts(bad)
    good = _write(tmp_path / "good.jsonl", ROWS[:1])
    assert main(["tune", str(tiny_gguf), "--prompts", str(good), "--apply"]) == 2
    assert "--apply needs a deployment id" in capsys.readouterr().err
    assert main(["tune", str(tiny_gguf), "--prompts", str(good), "--candidates", "ngram:x"]) == 2
    assert "cannot read 'ngram:x'" in capsys.readouterr().err


def test_plain_baseline_never_speculates_on_prompts_with_a_prediction(tiny_model: Model) -> None:
    """Rows carrying a prediction: the plain baseline ignores it (else a speculative run would
    be compared with a speculative one), while the speculative candidate proposes it."""
    prompts = [PromptRecord(None, None, "in the in the", [5, 6, 7, 5, 6, 7])]
    candidates = [Candidate("plain", None), Candidate("ngram", "ngram", 4, ngram_length=2)]
    rows = measure(tiny_model, prompts, candidates, 16, lambda name: tiny_model, progress=False)
    by_name = {row.candidate: row for row in rows}
    assert by_name["plain"].proposed == 0
    assert by_name["plain"].target_steps == by_name["plain"].tokens - 1
    assert by_name["ngram"].proposed > 0
