"""Fast apply: code edits with Predicted Outputs on the coder model, against plain decoding
and llama.cpp on the same GGUF files, in one run (greedy).

Tasks: HumanEvalFix (the buggy function is the prediction; the model writes the whole fixed
function; with ``--fixes-with-prose N`` also N of them asked to say what was wrong first, so
the reply opens with prose the prediction does not hold), open code generation with no
prediction (HumanEvalPack's function headers), and one prompt from each Spec-Bench group.
specserve configurations: plain, prediction alone, n-gram, the 0.5B draft model, and the
deployment's default mix (the catalog default drafter, plus the prediction where the task
has one). llama.cpp (llama-server, same GGUFs, the same prompt token ids): plain,
draft-simple with the 0.5B, ngram-simple, ngram-mod.

Reported per task group and configuration: end-to-end tok/s (prefill included), decode tok/s,
tokens per target step, acceptance by draft position, and how many outputs equal plain
decoding; plus a plot of the prediction's speed-up against the edit's size. With
``--repeats N`` each specserve configuration runs N times per task, in turn with the others,
and its row keeps the median time (short answers, such as Spec-Bench's, are otherwise at the
mercy of one slow run on a shared machine).

Prompt prefixes: every run of a task finds the previous task's prompt (the request sent just
before it) in a fresh prefix cache, as the server's would hold it, so that the chat template's
system message and the fixed instruction are not prefilled again; llama-server gets
``cache_prompt`` and runs the tasks in the same order, so its slot holds the previous task's
prompt too. ``--no-prefix-cache`` turns both off (each prompt is prefilled whole).

    LLAMA_CPP_BIN=.../build/bin python -m bench.fast_apply [--fixes 6] [--open 3] [--quick]
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from bench.common import (
    RESULTS_DIR,
    machine_info,
    markdown_table,
    sample_prompts,
    set_threads,
    shared_dir,
    write_json,
)
from bench.llama_server import llama_complete, llama_server
from specserve.deployments.rules import DrafterFlags, effective_drafter
from specserve.engine.generate import generate
from specserve.model.catalog import resolve
from specserve.model.loader import Model, load_model
from specserve.model.prefix_cache import MIB, PrefixCache
from specserve.model.transformer import ForwardBatch
from specserve.server.served import EngineOptions
from specserve.speculative.config import PLAIN, SpeculationConfig, speculation_for_drafter
from specserve.speculative.sampling import SamplingParams

TARGET, DRAFT = "qwen2.5-coder-1.5b-instruct", "qwen2.5-coder-0.5b-instruct"
FIX_PROMPT = (
    "Fix the bug in this Python function. Answer with the complete fixed function in one "
    "```python code block, and nothing else.\n\n```python\n{code}```"
)
# The same fixes where the reply opens with prose, as chat replies often do: the prediction
# (the code block) fails its first drafts and has to find its place again (issue 12).
PROSE_FIX_PROMPT = (
    "Fix the bug in this Python function. First say in one sentence what was wrong, then give "
    "the complete fixed function in one ```python code block.\n\n```python\n{code}```"
)
OPEN_PROMPT = "Complete this Python function. Answer with the whole function only.\n\n{code}"


def load_tasks(
    fixes: int, open_tasks: int, spec_bench: int, prose_fixes: int = 0
) -> list[dict[str, Any]]:
    """Tasks with their prompt text and (for fixes) the prediction text."""
    rows = [
        json.loads(line)
        for line in (shared_dir() / "data" / "humanevalfix" / "humanevalpack_python.jsonl").open()
    ]
    # fixes at multiples of step, open tasks half a step after them: never the same task
    step = max(1, len(rows) // max(fixes, prose_fixes, open_tasks, 1))
    tasks = []
    fix_kinds = [
        ("humanevalfix", "", FIX_PROMPT, fixes),
        ("humanevalfix, prose first", " (prose)", PROSE_FIX_PROMPT, prose_fixes),
    ]
    for group, suffix, template, count in fix_kinds:
        for row in rows[::step][:count]:
            code = row["declaration"] + row["buggy_solution"]
            tasks.append(
                {
                    "group": group,
                    "id": row["task_id"] + suffix,
                    "text": template.format(code=code),
                    "prediction": f"```python\n{code}```",
                }
            )
    for row in rows[step // 2 :: step][:open_tasks]:
        tasks.append(
            {
                "group": "open code",
                "id": row["task_id"],
                "text": OPEN_PROMPT.format(code=row["prompt"]),
                "prediction": None,
            }
        )
    for prompt in sample_prompts(spec_bench):
        tasks.append(
            {
                "group": prompt.category,
                "id": prompt.question_id,
                "text": prompt.text,
                "prediction": None,
            }
        )
    return tasks


def specserve_configs(
    target: Model, draft: Model, eagle: Path | None = None
) -> dict[str, tuple[SpeculationConfig, bool]]:
    """name -> (speculation, whether the task's prediction is passed); with ``eagle`` (a
    trained head's directory) also the head alone and as a deployment runs it (n-gram first)."""
    default = effective_drafter(TARGET, DrafterFlags())
    heads = {}
    if eagle is not None:
        mix = speculation_for_drafter(
            "draft_model", 4, target, lambda name: target, draft_model=str(eagle)
        )
        heads = {
            "EAGLE head": (SpeculationConfig("eagle", 4, eagle=mix.eagle), False),
            "EAGLE head + n-gram": (mix, False),
        }
    return {
        "plain": (PLAIN, False),
        "prediction": (PLAIN, True),
        "ngram": (SpeculationConfig("ngram", 4, ngram_length=3), False),
        "ngram (k<=16)": (SpeculationConfig("ngram", 16, ngram_length=3), False),
        "draft model 0.5B": (SpeculationConfig("draft_model", 4, draft_model=draft), False),
        f"default mix ({default.describe()})": (
            speculation_for_drafter(**default.fields(), target=target, load=lambda name: draft),
            True,
        ),
    } | heads  # after plain: each row is compared with plain's output


class PreviousPrompt:
    """The prompt sent just before a task's, prefilled once (untimed): each run of the task
    gets a fresh prefix cache holding it, so no run finds its own task's prompt there."""

    def __init__(self, model: Model, ids: list[int]) -> None:
        self.ids = ids
        self.kv = model.lm.new_cache(1, len(ids))
        batch = ForwardBatch(torch.tensor([ids]), [0], [0])
        self.features = model.lm.forward_with_features(batch, self.kv, last_logits=1)[1][0]

    def cache(self) -> PrefixCache:
        cache = PrefixCache(EngineOptions.prefix_cache_mb * MIB)  # the server's default
        cache.store(self.ids, self.kv, 0, self.features)
        return cache


def run_specserve(
    model: Model,
    tasks: list[dict[str, Any]],
    draft: Model,
    max_tokens: int,
    eagle: Path | None = None,
    only: Sequence[str] = (),
    repeats: int = 1,
    prefix_cache: bool = True,
) -> list[dict[str, Any]]:
    """Each configuration (``only``: those whose names start so, and plain) on each task,
    ``repeats`` times in turn (plain, the others, plain, ...); a row keeps the median time.
    ``prefix_cache``: the task before each one (the last for the first) is in the cache."""
    rows = []
    configs = {
        name: config
        for name, config in specserve_configs(model, draft, eagle).items()
        if name == "plain" or not only or any(name.startswith(o) for o in only)
    }
    warm = model.tokenizer.encode_chat([{"role": "user", "content": tasks[0]["text"]}])
    generate(model, warm, SamplingParams(temperature=0.0, max_tokens=8))  # warm-up
    for task in tasks:
        task["prompt_ids"] = model.tokenizer.encode_chat(
            [{"role": "user", "content": task["text"]}]
        )
    for i, task in enumerate(tasks):
        previous = PreviousPrompt(model, tasks[i - 1]["prompt_ids"]) if prefix_cache else None
        runs: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for _ in range(repeats):
            for name, (speculation, with_prediction) in configs.items():
                prediction = task["prediction"] if with_prediction else None
                if with_prediction and prediction is None and name == "prediction":
                    continue
                runs[name].append(
                    run_once(model, task, speculation, prediction, max_tokens, previous)
                )
        plain_ids = runs["plain"][0]["token_ids"]
        rows += [task_row(task, name, tries, plain_ids) for name, tries in runs.items()]
        print(f"[{i + 1}/{len(tasks)}] {task['group']} {task['id']}", flush=True)
    return rows


def run_once(
    model: Model,
    task: dict[str, Any],
    speculation: SpeculationConfig,
    prediction: str | None,
    max_tokens: int,
    previous: PreviousPrompt | None = None,
) -> dict[str, Any]:
    """One greedy generation of the task's answer, timed end to end."""
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    pred_ids = model.tokenizer.encode(prediction, add_special_tokens=False) if prediction else None
    cache = previous.cache() if previous is not None else None
    began = time.perf_counter()
    result = generate(
        model,
        task["prompt_ids"],
        params,
        speculation=speculation,
        prediction_ids=pred_ids,
        prefix_cache=cache,
    )
    total = time.perf_counter() - began
    return {
        "token_ids": result.token_ids,
        "text": result.text,
        "seconds": total,
        "decode_seconds": result.decode_seconds,
        "decode_tokens": result.decode_tokens,  # after the prefill's (it may verify drafts)
        "stats": result.stats.as_dict(),
        "prediction": prediction,
        "cached_tokens": result.cached_prompt_tokens,
    }


def task_row(
    task: dict[str, Any], name: str, tries: list[dict[str, Any]], plain_ids: list[int]
) -> dict[str, Any]:
    """A configuration's row for one task: the median run's time (every run's kept too);
    identical only if every run's output equals plain's."""
    by_time = sorted(tries, key=lambda t: t["seconds"])
    mid = by_time[len(by_time) // 2]
    prediction = mid["prediction"]
    return {
        "engine": "specserve",
        "config": name,
        "group": task["group"],
        "task": task["id"],
        "tokens": len(mid["token_ids"]),
        "seconds": mid["seconds"],
        "decode_seconds": mid["decode_seconds"],
        "decode_tokens": mid["decode_tokens"],
        "prompt_tokens": len(task["prompt_ids"]),
        "cached_tokens": mid["cached_tokens"],
        "runs_seconds": [round(t["seconds"], 4) for t in tries],
        "tokens_per_step": mid["stats"]["tokens_per_step"],
        "by_method": mid["stats"]["by_method"],
        "identical": all(t["token_ids"] == plain_ids for t in tries),
        "edit_size": edit_size(prediction, mid["text"]) if prediction else None,
    }


def edit_size(prediction: str, output: str) -> float:
    """Share of the prediction's characters that the output does not keep (0 = copied)."""
    return round(1.0 - difflib.SequenceMatcher(None, prediction, output).ratio(), 4)


LLAMA_CONFIGS = {
    "llama.cpp plain": [],
    "llama.cpp draft-simple 0.5B": [
        "--spec-type",
        "draft-simple",
        "-md",
        "{draft}",
        "--spec-draft-n-max",
        "4",
    ],
    "llama.cpp ngram-simple": ["--spec-type", "ngram-simple"],
    "llama.cpp ngram-mod": ["--spec-type", "ngram-mod"],
}


def run_llama(
    binary: Path, tasks: list[dict[str, Any]], max_tokens: int, threads: int, cache: bool
) -> list[dict[str, Any]]:
    """Each llama.cpp configuration on every task in order; with ``cache``, the slot holds
    the previous task's prompt (the warm-up sends the last task's)."""
    rows = []
    draft = str(resolve(DRAFT)[0])
    for name, args in LLAMA_CONFIGS.items():
        server_args = [a.replace("{draft}", draft) for a in args]
        server = llama_server(binary, resolve(TARGET)[0], server_args, threads)
        try:
            llama_complete(tasks[-1]["prompt_ids"], 8, cache)  # warm-up: first-request costs
            for task in tasks:
                t = llama_complete(task["prompt_ids"], max_tokens, cache)["timings"]
                seconds = (t["prompt_ms"] + t["predicted_ms"]) / 1000
                drafted, accepted = t.get("draft_n", 0), t.get("draft_n_accepted", 0)
                rows.append(
                    {
                        "engine": "llama.cpp",
                        "config": name,
                        "group": task["group"],
                        "task": task["id"],
                        "tokens": t["predicted_n"],
                        "seconds": seconds,
                        "decode_seconds": t["predicted_ms"] / 1000,
                        "decode_tokens": t["predicted_n"],
                        "prompt_tokens": len(task["prompt_ids"]),
                        "cached_tokens": len(task["prompt_ids"]) - t["prompt_n"],
                        "drafted": drafted,
                        "accepted": accepted,
                        "tokens_per_step": None,
                        "identical": None,
                    }
                )
        finally:
            server.terminate()
            server.wait(timeout=30)
        print(f"{name}: done", flush=True)
    return rows


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (group, config): summed tokens / summed seconds, as ratios to specserve plain."""
    cells: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        cells[(row["group"], row["config"])].append(row)
    plain = {g: cells[(g, "plain")] for g, c in cells if c == "plain"}
    out = []
    for (group, config), members in cells.items():
        e2e = sum(r["tokens"] for r in members) / sum(r["seconds"] for r in members)
        dec = sum(r["decode_tokens"] for r in members) / max(
            sum(r["decode_seconds"] for r in members), 1e-9
        )
        base = plain[group]
        base_e2e = sum(r["tokens"] for r in base) / sum(r["seconds"] for r in base)
        base_dec = sum(r["decode_tokens"] for r in base) / sum(r["decode_seconds"] for r in base)
        steps = [r["tokens_per_step"] for r in members if r["tokens_per_step"]]
        identical = [r["identical"] for r in members if r["identical"] is not None]
        out.append(
            {
                "group": group,
                "config": config,
                "e2e_tok_s": round(e2e, 2),
                "decode_tok_s": round(dec, 2),
                "e2e_vs_plain": round(e2e / base_e2e, 3),
                "decode_vs_plain": round(dec / base_dec, 3),
                "tokens_per_step": round(sum(steps) / len(steps), 2) if steps else None,
                "identical": f"{sum(identical)}/{len(identical)}" if identical else "-",
            }
        )
    return out


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Prediction speed-up (end to end, vs plain) against the edit's size, per HumanEvalFix
    fix (none: no plot)."""
    plain = {r["task"]: r["seconds"] / r["tokens"] for r in rows if r["config"] == "plain"}
    points = [
        (r["edit_size"], plain[r["task"]] / (r["seconds"] / r["tokens"]))
        for r in rows
        if r["config"] == "prediction" and r["group"] == "humanevalfix"
    ]
    if not points:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.scatter([p[0] for p in points], [p[1] for p in points])
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_xlabel("edit size (share of the prediction not kept)")
    ax.set_ylabel("end-to-end speed-up vs plain")
    ax.set_title("Qwen2.5-Coder-1.5B, HumanEvalFix, prediction")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fixes", type=int, default=6)
    parser.add_argument("--fixes-with-prose", type=int, default=0, help="fixes, prose first")
    parser.add_argument("--open", type=int, default=3)
    parser.add_argument("--spec-bench", type=int, default=6)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--llama-cpp-bin", type=Path, default=os.environ.get("LLAMA_CPP_BIN"))
    parser.add_argument("--quick", action="store_true", help="2 fixes, 1 open, 0 spec-bench")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "fast_apply.json")
    parser.add_argument("--eagle", type=Path, help="a trained head's directory to compare too")
    parser.add_argument("--only", default="", help="comma-separated config name prefixes")
    parser.add_argument(
        "--repeats", type=int, default=1, help="runs per task and configuration (median kept)"
    )
    parser.add_argument(
        "--no-prefix-cache",
        action="store_true",
        help="prefill every prompt whole (specserve and llama.cpp); by default each task finds "
        "the previous task's prompt cached",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.fixes, args.open, args.spec_bench, args.max_tokens = 2, 1, 0, 64
    set_threads(args.threads)
    tasks = load_tasks(args.fixes, args.open, args.spec_bench, args.fixes_with_prose)
    target, draft = load_model(TARGET, progress=False), load_model(DRAFT, progress=False)
    only = [o for o in args.only.split(",") if o]
    cache = not args.no_prefix_cache
    rows = run_specserve(
        target, tasks, draft, args.max_tokens, args.eagle, only, args.repeats, cache
    )
    notes = []
    if args.llama_cpp_bin:
        rows += run_llama(Path(args.llama_cpp_bin), tasks, args.max_tokens, args.threads, cache)
    else:
        notes.append("llama.cpp skipped: no --llama-cpp-bin / LLAMA_CPP_BIN")
    summary = summarize(rows)
    headers = ["group", "config", "e2e tok/s", "decode tok/s", "e2e vs plain"]
    headers += ["decode vs plain", "tokens/step", "identical"]
    print(markdown_table(headers, [list(s.values()) for s in summary]))
    plot(rows, args.out.with_suffix(".png"))
    write_json(
        args.out,
        {
            "machine": machine_info(args.threads),
            "settings": vars(args)
            | {"llama_cpp_bin": str(args.llama_cpp_bin), "out": str(args.out)},
            "notes": notes,
            "summary": summary,
            "rows": rows,
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
