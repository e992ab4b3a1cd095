"""The generation loop for one request: prefill, then decode steps until a stop condition."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from specserve.engine.output import TextAssembler
from specserve.engine.sampling import InvalidRequestError, SamplingParams, sample, target_probs
from specserve.model.loader import Model
from specserve.model.transformer import ForwardBatch


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str  # "stop" (EOS or a stop string) or "length"
    time_to_first_token: float  # seconds, prefill included
    decode_seconds: float  # from the first token to the last

    @property
    def decode_tokens_per_second(self) -> float:
        steps = len(self.token_ids) - 1  # the first token comes from the prefill
        return steps / self.decode_seconds if self.decode_seconds > 0 and steps > 0 else 0.0


def check_prompt(model: Model, prompt_ids: Sequence[int]) -> None:
    """Refuse, before any compute, a prompt that is empty or does not fit the context."""
    if not prompt_ids:
        raise InvalidRequestError("the prompt is empty")
    if len(prompt_ids) >= model.max_context:
        raise InvalidRequestError(
            f"the prompt has {len(prompt_ids)} tokens; this model's context window is "
            f"{model.max_context} tokens (and at least one must be left to generate)"
        )
    vocab = model.lm.config.vocab_size
    if min(prompt_ids) < 0 or max(prompt_ids) >= vocab:
        raise InvalidRequestError(f"prompt token ids must be in [0, {vocab})")


def pick_token(logits: torch.Tensor, params: SamplingParams, gen: torch.Generator) -> int:
    """logits ``[V]`` -> the next token, greedy or sampled."""
    if params.greedy:
        return int(logits.argmax())
    return int(sample(target_probs(logits[None], params), gen)[0])


def generate(
    model: Model,
    prompt_ids: Sequence[int],
    params: SamplingParams,
    on_text: Callable[[str], None] | None = None,
) -> GenerationResult:
    """Plain decoding: one target forward per new token (the speculative baseline)."""
    check_prompt(model, prompt_ids)
    budget = min(params.max_tokens, model.max_context - len(prompt_ids))
    cache = model.lm.new_cache(1, len(prompt_ids) + budget)
    gen = params.generator()
    assembler = TextAssembler(model.tokenizer, prompt_ids, params.stop)
    eos = set() if params.ignore_eos else set(model.tokenizer.eos_ids)
    start = time.perf_counter()
    tokens = torch.tensor([list(prompt_ids)])
    logits = model.lm(ForwardBatch(tokens, [0], [0]), cache, all_logits=False)
    token = pick_token(logits[0, -1], params, gen)
    first = time.perf_counter()
    out: list[int] = []
    finish = "length"
    while True:
        if token in eos:
            finish = "stop"
            break
        out.append(token)
        piece = assembler.add([token])
        if on_text and piece:
            on_text(piece)
        if assembler.finished:
            finish = "stop"
            break
        if len(out) >= budget:
            break
        step = ForwardBatch(torch.tensor([[token]]), [0], [len(prompt_ids) + len(out) - 1])
        token = pick_token(model.lm(step, cache)[0, -1], params, gen)
    tail = assembler.finish()
    if on_text and tail:
        on_text(tail)
    end = time.perf_counter()
    return GenerationResult(
        text=assembler.text,
        token_ids=out,
        prompt_tokens=len(prompt_ids),
        finish_reason=finish,
        time_to_first_token=first - start,
        decode_seconds=end - first,
    )
