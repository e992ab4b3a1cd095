"""Write Spec-Bench prompts as `specserve tune` / `specserve drafter train` JSONL rows.

    python -m bench.spec_bench_prompts --count 12 > specbench12.jsonl

The sample is the benches' fixed spread over the six Spec-Bench groups (evaluation data:
for tuning and measuring, never for training a drafter).
"""

from __future__ import annotations

import argparse
import json

from bench.common import sample_prompts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=12)
    args = parser.parse_args()
    for prompt in sample_prompts(args.count):
        row = {
            "messages": [{"role": "user", "content": prompt.text}],
            "category": prompt.category,
            "question_id": prompt.question_id,
        }
        print(json.dumps(row, ensure_ascii=False))


if __name__ == "__main__":
    main()
