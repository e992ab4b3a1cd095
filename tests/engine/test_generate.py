"""Sampling parameters, stop strings, limits and the CLI's flag rules."""

from __future__ import annotations

import argparse

import pytest
import torch

from specserve.cli import build_parser, main, speculation_from_flags
from specserve.engine.generate import generate
from specserve.engine.output import TextAssembler
from specserve.model.loader import Model
from specserve.speculative.sampling import InvalidRequestError, SamplingParams, target_probs


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"temperature": -1.0}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_k": -3}, "top_k"),
        ({"min_p": 1.0}, "min_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"stop": ("",)}, "stop"),
    ],
)
def test_invalid_sampling_values_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(InvalidRequestError, match=message):
        SamplingParams(**kwargs)


def test_target_probs_filters() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    top_k = target_probs(logits, SamplingParams(temperature=1.0, top_k=2))
    torch.testing.assert_close(top_k, torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    top_p = target_probs(logits, SamplingParams(temperature=1.0, top_p=0.8))
    torch.testing.assert_close(top_p, torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    min_p = target_probs(logits, SamplingParams(temperature=1.0, min_p=0.2))
    torch.testing.assert_close(min_p, torch.tensor([[0.5, 0.3, 0.15, 0.0]]) / 0.95)
    greedy = target_probs(logits, SamplingParams())
    torch.testing.assert_close(greedy, torch.tensor([[1.0, 0.0, 0.0, 0.0]]))


def test_text_assembler_holds_back_possible_stop_prefix(tiny_model: Model) -> None:
    tok = tiny_model.tokenizer
    assembler = TextAssembler(tok, [], stop=("END",))
    streamed = "".join(assembler.add(tok.encode(piece)) for piece in ["abc E", "N", "D more"])
    streamed += assembler.finish()
    assert assembler.finished and assembler.text == "abc " and streamed == "abc "


def test_stop_string_and_limits(tiny_model: Model) -> None:
    prompt = [10, 11, 12, 13]
    free = generate(tiny_model, prompt, SamplingParams(max_tokens=20, ignore_eos=True))
    assert free.finish_reason == "length" and len(free.token_ids) == 20
    stop = free.text[5:8]
    stopped = generate(tiny_model, prompt, SamplingParams(max_tokens=20, stop=(stop,)))
    assert stopped.finish_reason == "stop"
    assert stopped.text == free.text[: free.text.index(stop)]
    with pytest.raises(InvalidRequestError, match="context window"):
        generate(tiny_model, [5] * tiny_model.max_context, SamplingParams())
    with pytest.raises(InvalidRequestError, match="empty"):
        generate(tiny_model, [], SamplingParams())


def _flags(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["generate", "m", "--prompt", "x", *argv])


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["--draft-model", "a", "--ngram-speculation-length", "2", "--draft-token-count", "4"],
            "cannot be used together",
        ),
        (["--ngram-speculation-length", "2"], "--draft-token-count is required"),
        (["--draft-model", "a"], "--draft-token-count is required"),
        (["--draft-token-count", "4"], "needs --draft-model or --ngram"),
        (
            ["--no-speculation", "--ngram-speculation-length", "2", "--draft-token-count", "2"],
            "cannot be combined",
        ),
        (["--ngram-speculation-length", "0", "--draft-token-count", "4"], "--ngram-speculation"),
        (["--ngram-speculation-length", "2", "--draft-token-count", "99"], "--draft-token-count"),
    ],
)
def test_speculation_flag_rules(tiny_model: Model, argv: list[str], message: str) -> None:
    # `generate` applies the same rules as `deployment create` (one function checks them).
    with pytest.raises(ValueError, match=message):
        speculation_from_flags(_flags(*argv), tiny_model)


def test_cli_generate_prints_text_and_stats(tiny_gguf, capsys: pytest.CaptureFixture) -> None:
    code = main(
        [
            "generate",
            str(tiny_gguf),
            "--prompt",
            "the cat",
            "--max-tokens",
            "8",
            "--dtype",
            "float32",
        ]
    )
    captured = capsys.readouterr()
    assert code == 0
    assert "tok/s" in captured.err and "tokens per target step" in captured.err
    assert main(["generate", "no-such-model", "--prompt", "x"]) == 2
    assert "smollm2-135m-instruct" in capsys.readouterr().err
    # 0 threads had been taken for "the default"
    assert main(["generate", str(tiny_gguf), "--prompt", "x", "--threads", "0"]) == 2
    assert "--threads must be a positive integer, got 0" in capsys.readouterr().err
