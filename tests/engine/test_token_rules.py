"""Grammars, penalties, logit bias and logprobs under speculation (speculative/token_rules.py).

The tiny model's tokenizer is a real byte-level BPE, so llguidance compiles grammars for it.
Every check compares speculative decoding with plain decoding of the same rules, or the rules
with a hand-written decoding loop, and shows the speculation was engaged.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from specserve.engine.generate import generate
from specserve.engine.result import GenerationResult
from specserve.engine.scheduler import Engine
from specserve.engine.sequence import Sequence
from specserve.model.loader import Model, load_model
from specserve.model.transformer import ForwardBatch
from specserve.speculative.config import PLAIN, SpeculationConfig
from specserve.speculative.grammar import TokenGrammar
from specserve.speculative.sampling import InvalidRequestError, SamplingParams, target_probs
from specserve.speculative.stats import FORCED
from tests.engine.test_scheduler import Waiter
from tests.tiny import TinySpec, write_tiny_gguf

SCHEMA = {
    "type": "object",
    "properties": {
        "flag": {"type": "boolean"},
        "color": {"enum": ["red", "green", "blue", "the red", "a thin"]},
        "tags": {"type": "array", "items": {"enum": ["in", "the", "a"]}, "maxItems": 6},
    },
    "required": ["flag", "color", "tags"],
    "additionalProperties": False,
}
NGRAM = SpeculationConfig("ngram", 4, ngram_length=2, adaptive=False)
PROMPT_TEXT = 'the thin heat in a hint: {"flag": true, "color": "the red", "tags": ["in"]}'


@pytest.fixture(scope="module")
def model(tiny_gguf: Path) -> Model:
    """The tiny model in bfloat16: its k-token forward is bit-identical to k single steps
    (float32's CPU GEMMs are not: test_kv_cache.py), so logprobs can be compared exactly."""
    return load_model(str(tiny_gguf), dtype="bfloat16", progress=False)


@pytest.fixture(scope="module")
def draft(tmp_path_factory: pytest.TempPathFactory) -> Model:
    """Another random model of the same vocabulary: its drafts are partly accepted."""
    path = write_tiny_gguf(tmp_path_factory.mktemp("draft") / "d.gguf", TinySpec(seed=3))
    return load_model(str(path), dtype="bfloat16", progress=False)


def _grammar(model: Model, schema: dict = SCHEMA) -> TokenGrammar:
    return TokenGrammar.json_schema(schema, model.tokenizer, vocab_size=model.lm.config.vocab_size)


def _speculations(draft: Model) -> dict[str, tuple[SpeculationConfig, bool]]:
    """Name -> (speculation, with a prediction)."""
    return {
        "forced tokens only": (SpeculationConfig(), False),
        "ngram": (NGRAM, False),
        "draft_model": (
            SpeculationConfig("draft_model", 3, draft_model=draft, adaptive=False),
            False,
        ),
        "prediction": (SpeculationConfig(), True),
    }


def _run(
    model: Model,
    params: SamplingParams,
    speculation: SpeculationConfig = PLAIN,
    predict: bool = False,
) -> GenerationResult:
    tok = model.tokenizer
    prediction = tok.encode('{"flag": true, "color": "red", "tags": ["in", "the"]}', False)
    prompt = tok.encode(PROMPT_TEXT)
    return generate(
        model,
        prompt,
        params,
        speculation=speculation,
        prediction_ids=prediction if predict else None,
    )


def test_greedy_under_a_grammar_equals_plain_with_every_drafter(model: Model, draft: Model) -> None:
    params = SamplingParams(max_tokens=80, grammar=_grammar(model), logprobs=3)
    plain = _run(model, params)
    value = json.loads(plain.text)  # schema-valid JSON, ended by the grammar
    assert set(value) == {"flag", "color", "tags"} and plain.finish_reason == "stop"
    assert plain.stats.forced_tokens == 0 and plain.stats.target_steps == len(plain.token_ids) - 1
    for name, (speculation, predict) in _speculations(draft).items():
        result = _run(model, params, speculation, predict)
        assert result.token_ids == plain.token_ids, name
        assert result.logprobs == plain.logprobs, name  # the same rows, bit for bit
        # keys and punctuation are free: forced drafts where no drafter covered them
        free = len(plain.token_ids) / 3 if name == "forced tokens only" else 0
        assert result.stats.forced_tokens > free, name
        method = "prediction" if predict else speculation.method or FORCED
        stats = result.stats.by_method.get(method)
        assert stats is not None and stats.proposed > 0, f"{name} never drafted"


def test_forced_tokens_are_free_drafts_and_forbidden_drafts_never_reach_the_forward(
    model: Model,
) -> None:
    params = SamplingParams(max_tokens=80, grammar=_grammar(model))
    tok = model.tokenizer
    xyz = tok.encode("xyz", False)
    seq = Sequence(model, tok.encode("the"), params, SpeculationConfig(), prediction_ids=xyz)
    logits = torch.zeros(model.lm.config.vocab_size)
    seq.start(logits)  # the grammar forces '{"' ... : the first token is '{' whatever the logits
    feed = seq.next_feed()
    assert tok.decode(feed[1:]) == '"flag":'  # forced (not the prediction's "xyz")
    assert seq._proposal is not None and seq._proposal.method == FORCED


def test_grammar_requests_in_a_batch_equal_each_alone(model: Model) -> None:
    grammar = _grammar(model)
    tok = model.tokenizer
    requests = [
        (tok.encode(PROMPT_TEXT), SamplingParams(max_tokens=60, grammar=grammar)),
        (tok.encode("the thin hint"), SamplingParams(max_tokens=30)),
        (
            tok.encode("in a heat"),
            SamplingParams(max_tokens=60, grammar=grammar, presence_penalty=1.0),
        ),
    ]
    alone = [generate(model, p, params, speculation=NGRAM).token_ids for p, params in requests]
    engine = Engine(model, max_batch=4)
    try:
        waiters = []
        for prompt, params in requests:
            waiter = Waiter()
            engine.submit(prompt, params, waiter.on_text, waiter.on_done, speculation=NGRAM)
            waiters.append(waiter)
        assert [w.wait().token_ids for w in waiters] == alone
    finally:
        engine.stop()


def _by_hand(
    model: Model,
    prompt: list[int],
    n: int,
    presence: float,
    frequency: float,
    bias: dict[int, float],
) -> list[int]:
    """Plain greedy decoding with OpenAI's penalties written out: one full forward a token."""
    ids, out = list(prompt), []
    for _ in range(n):
        cache = model.lm.new_cache(1, len(ids) + 1)
        logits = model.lm(ForwardBatch(torch.tensor([ids]), [0], [0]), cache)[0, -1].float().clone()
        for token in set(out):
            count = out.count(token)
            logits[token] -= presence + frequency * count
        for token, value in bias.items():
            logits[token] += value
        out.append(int(logits.argmax()))
        ids.append(out[-1])
    return out


def test_penalties_and_logit_bias_as_openai_defines_them(model: Model, draft: Model) -> None:
    tok = model.tokenizer
    prompt = tok.encode("the thin heat in a hint the thin heat in a hint")
    bias = {tok.encode(" a", False)[0]: 1.5, tok.encode("t", False)[0]: -2.0}
    params = SamplingParams(
        max_tokens=24,
        ignore_eos=True,
        presence_penalty=0.6,
        frequency_penalty=0.9,
        logit_bias=tuple(bias.items()),
    )
    expected = _by_hand(model, prompt, 24, 0.6, 0.9, bias)
    unpenalized = generate(model, prompt, SamplingParams(max_tokens=24, ignore_eos=True))
    assert unpenalized.token_ids != expected  # the rules change this output
    for speculation in (
        PLAIN,
        NGRAM,
        SpeculationConfig("draft_model", 3, draft_model=draft, adaptive=False),
    ):
        result = generate(model, prompt, params, speculation=speculation)
        assert result.token_ids == expected, speculation.method
        if speculation.method is not None:
            assert result.stats.proposed > 0


def test_out_of_range_rules_are_refused(model: Model) -> None:
    with pytest.raises(InvalidRequestError, match="presence_penalty"):
        SamplingParams(presence_penalty=2.5)
    with pytest.raises(InvalidRequestError, match="logit_bias"):
        SamplingParams(logit_bias=((1, 101.0),))
    with pytest.raises(InvalidRequestError, match="top_logprobs"):
        SamplingParams(logprobs=21)
    with pytest.raises(InvalidRequestError, match="vocabulary"):
        Sequence(model, [1, 2], SamplingParams(logit_bias=((10**6, 1.0),)))


# ------------------------------------------------ sampled: the masked target distribution

LARK = "start: /([a-c][de ]){1,200}/"  # a few allowed tokens, alternating sets
BINS = 4
SEEDS = 60


def _masked_probs(
    model: Model, grammar: TokenGrammar, prompt: list[int], out: list[int], params: SamplingParams
) -> torch.Tensor:
    """The distribution plain constrained sampling draws token i of ``out`` from: [n, V]."""
    ids = prompt + out
    cache = model.lm.new_cache(1, len(ids))
    logits = model.lm(ForwardBatch(torch.tensor([ids]), [0], [0]), cache)[0].float().clone()
    rows = logits[len(prompt) - 1 : len(ids) - 1]
    matcher = grammar.matcher()
    masks = []
    for token in out:
        masks.append(matcher.allowed())
        assert matcher.accept(token)
    mask = torch.stack(masks)
    rows[:, : mask.shape[1]] = rows[:, : mask.shape[1]].masked_fill(~mask, float("-inf"))
    return target_probs(rows, params)


def _rank_bins(probs: torch.Tensor, out: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Observed and expected counts of the emitted tokens' ranks (0, 1, 2, 3+)."""
    order = probs.argsort(dim=-1, descending=True)
    ranks = (order == torch.tensor(out)[:, None]).float().argmax(dim=-1).clamp(max=BINS - 1)
    observed = torch.bincount(ranks, minlength=BINS).float()
    expected = torch.zeros(BINS)
    for b in range(BINS - 1):
        expected[b] = probs.gather(1, order[:, b : b + 1]).sum()
    expected[BINS - 1] = probs.shape[0] - expected[: BINS - 1].sum()
    return observed, expected


def _tvd_and_chi2(
    model: Model, speculation: SpeculationConfig, seeds: range
) -> tuple[float, float, int]:
    grammar = TokenGrammar.lark(LARK, model.tokenizer, vocab_size=model.lm.config.vocab_size)
    prompt = model.tokenizer.encode("a bad cab")
    observed, expected, drafted = torch.zeros(BINS), torch.zeros(BINS), 0
    for seed in seeds:
        params = SamplingParams(
            temperature=0.5, seed=seed, max_tokens=48, grammar=grammar, ignore_eos=True
        )
        result = generate(model, prompt, params, speculation=speculation)
        drafted += result.stats.accepted
        o, e = _rank_bins(
            _masked_probs(model, grammar, prompt, result.token_ids, params), result.token_ids
        )
        observed, expected = observed + o, expected + e
    n = float(observed.sum())
    tvd = float((observed - expected).abs().sum()) / (2 * n)
    chi2 = float(((observed - expected) ** 2 / expected.clamp(min=1e-9)).sum())
    return tvd, chi2, drafted


def test_constrained_sampling_keeps_the_masked_target_distribution(model: Model) -> None:
    """Seeded runs with n-gram drafts: the emitted tokens' ranks under the masked target
    distribution match their expectation (chi-square with 3 degrees of freedom below 21.1,
    p > 1e-4; TVD below 3 / sqrt(n)). Negative control (next test): every draft position
    masked with the first position's state fails it."""
    tvd, chi2, drafted = _tvd_and_chi2(model, NGRAM, range(SEEDS))
    assert drafted > 100, "n-gram drafts were hardly accepted: the test would not test them"
    assert chi2 < 21.1 and tvd < 3 / math.sqrt(SEEDS * 48), (chi2, tvd)


def test_the_distribution_check_fails_when_masks_are_off_by_one(
    model: Model, monkeypatch: pytest.MonkeyPatch
) -> None:
    from specserve.speculative import token_rules

    shape = token_rules.TokenRules.shape

    def wrong(
        self: token_rules.TokenRules, logits: torch.Tensor, drafts: list[int]
    ) -> torch.Tensor:
        if len(self._masks) > 1:
            self._masks = [self._masks[0]] * len(self._masks)  # every row: the first state
        return shape(self, logits, drafts)

    monkeypatch.setattr(token_rules.TokenRules, "shape", wrong)
    with pytest.raises((AssertionError, RuntimeError)):
        tvd, chi2, _ = _tvd_and_chi2(model, NGRAM, range(SEEDS))
        assert chi2 < 21.1 and tvd < 3 / math.sqrt(SEEDS * 48)
