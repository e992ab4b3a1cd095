"""The continuous-batching engine: batched requests produce what each produces alone."""

from __future__ import annotations

import threading

import pytest

from specserve.engine.generate import generate
from specserve.engine.job import Job, QueueFullError
from specserve.engine.result import GenerationResult
from specserve.engine.scheduler import Engine
from specserve.model.loader import Model
from specserve.speculative.config import PLAIN, SpeculationConfig
from specserve.speculative.sampling import InvalidRequestError, SamplingParams
from tests.engaged import StepLog, assert_engaged, assert_engaged_overall

NGRAM = SpeculationConfig("ngram", 4, ngram_length=2, adaptive=False)  # never tuned off
FIXED = SpeculationConfig("ngram", 3, ngram_length=2, adaptive=False)


class Waiter:
    """Collects one job's streamed text and result, and lets a test wait for it."""

    def __init__(self) -> None:
        self.pieces: list[str] = []
        self.result: GenerationResult | None = None
        self.error: BaseException | None = None
        self.done = threading.Event()

    def on_text(self, piece: str) -> None:
        self.pieces.append(piece)

    def on_done(self, result: GenerationResult | None, error: BaseException | None) -> None:
        self.result, self.error = result, error
        self.done.set()

    def wait(self) -> GenerationResult:
        assert self.done.wait(60), "the engine did not finish the request"
        assert self.error is None, self.error
        assert self.result is not None
        return self.result


def _prompts() -> list[list[int]]:
    # Prompts of different lengths (some repeat themselves, so n-gram drafts get accepted).
    return [
        [5, 6, 7, 8] * 6,
        list(range(30, 41)),
        [9, 10, 11] * 9 + [12],
        list(range(100, 160)),
        [3] * 5,
    ]


def _submit(engine: Engine, prompt: list[int], params: SamplingParams, **kw: object) -> Waiter:
    waiter = Waiter()
    engine.submit(prompt, params, waiter.on_text, waiter.on_done, **kw)  # type: ignore[arg-type]
    return waiter


@pytest.mark.parametrize(
    ("params", "speculation"),
    [
        (SamplingParams(max_tokens=24, ignore_eos=True), NGRAM),
        (SamplingParams(max_tokens=24, ignore_eos=True), PLAIN),
        # Seeded sampling with a fixed draft length is reproducible: batching must not change it.
        (SamplingParams(temperature=0.25, top_k=4, seed=7, max_tokens=24, ignore_eos=True), FIXED),
    ],
)
@pytest.mark.parametrize("fmt", ["float32", "native"])
def test_batched_requests_equal_each_alone(
    request: pytest.FixtureRequest, fmt: str, params: SamplingParams, speculation: SpeculationConfig
) -> None:
    """Padded batches (float32) and packed ones (the native runtime: each row only its own
    tokens) give each request what it gives alone."""
    model: Model = request.getfixturevalue("tiny_model" if fmt == "float32" else "native_model")
    alone = [generate(model, p, params, speculation=speculation) for p in _prompts()]
    engine = Engine(model, max_batch=3, prefill_chunk=16)
    steps = StepLog(engine)
    try:
        waiters = [_submit(engine, p, params, speculation=speculation) for p in _prompts()]
        results = [w.wait() for w in waiters]
    finally:
        engine.stop()
    for one, batched, waiter in zip(alone, results, waiters, strict=True):
        assert batched.token_ids == one.token_ids
        assert batched.text == one.text == "".join(waiter.pieces)
        assert batched.finish_reason == "length"
    assert engine.stats.finished == len(alone)
    if speculation.method is not None:
        steps.assert_batched_drafts()
        assert_engaged_overall(results, speculation.method)
        if fmt == "native":
            steps.assert_packed_rows()


@pytest.mark.parametrize("fmt", ["float32", "native"])
def test_prediction_in_a_batch_is_fully_accepted(request: pytest.FixtureRequest, fmt: str) -> None:
    model: Model = request.getfixturevalue("tiny_model" if fmt == "float32" else "native_model")
    # Longer than the prefill's drafts cover (at most 64: engine/prefill.py), so that decode
    # steps carry the rest of the prediction beside the other request.
    params = SamplingParams(max_tokens=100, ignore_eos=True)
    prompt = list(range(40, 52))
    plain = generate(model, prompt, params)
    engine = Engine(model, max_batch=2)
    steps = StepLog(engine)
    try:
        other = _submit(engine, list(range(60, 70)), params, speculation=NGRAM)
        waiter = _submit(engine, prompt, params, speculation=NGRAM, prediction_ids=plain.token_ids)
        result = waiter.wait()
        other.wait()
    finally:
        engine.stop()
    assert result.token_ids == plain.token_ids
    assert result.prediction is not None
    assert result.prediction.rejected_prediction_tokens == 0
    assert result.prediction.accepted_prediction_tokens == len(plain.token_ids)
    assert_engaged(result, "prediction")  # by the verifier, not the text count above
    counts = result.stats.by_method["prediction"]
    assert counts.accepted == counts.proposed
    steps.assert_batched_drafts()
    if fmt == "native":
        steps.assert_packed_rows()


def test_cancel_frees_the_slot_for_the_next_request(tiny_model: Model) -> None:
    engine = Engine(tiny_model, max_batch=1)
    try:
        started = threading.Event()
        long_job = Waiter()
        job: Job = engine.submit(
            [5, 6, 7],
            SamplingParams(max_tokens=400, ignore_eos=True),
            lambda piece: started.set(),
            long_job.on_done,
        )
        queued = _submit(engine, [8, 9], SamplingParams(max_tokens=4, ignore_eos=True))
        assert started.wait(30)
        engine.cancel(job)
        assert long_job.done.wait(30)
        assert long_job.result is not None and long_job.result.finish_reason == "cancelled"
        assert len(long_job.result.token_ids) < 400
        assert len(queued.wait().token_ids) == 4  # it got the freed slot
        assert engine.running == 0 and engine.stats.cancelled == 1
    finally:
        engine.stop()


def test_queue_bound_and_context_limit_are_refused_up_front(tiny_model: Model) -> None:
    engine = Engine(tiny_model, max_batch=1, max_queue=1, max_context=64)
    blocker = threading.Event()
    try:
        params = SamplingParams(max_tokens=200, ignore_eos=True)
        first = engine.submit([5, 6], params, lambda piece: blocker.wait(5), lambda r, e: None)
        while engine.waiting:  # wait until it is admitted, so the next one waits
            pass
        engine.submit([5, 6], params, lambda piece: None, lambda r, e: None)
        with pytest.raises(QueueFullError, match="queue bound"):
            engine.submit([5, 6], params, lambda piece: None, lambda r, e: None)
        with pytest.raises(InvalidRequestError, match="context window"):
            engine.submit([5] * 64, params, lambda piece: None, lambda r, e: None)
        engine.cancel(first)
    finally:
        blocker.set()
        engine.stop()


@pytest.mark.parametrize("bad", [-1, 264, 10_000])
def test_out_of_vocabulary_prompt_ids_are_refused(tiny_model: Model, bad: int) -> None:
    """Ids outside [0, vocabulary) are refused before any compute, by generate and the engine."""
    assert tiny_model.lm.config.vocab_size == 264
    params = SamplingParams(max_tokens=4)
    with pytest.raises(InvalidRequestError, match=r"prompt token ids must be in \[0, 264\)"):
        generate(tiny_model, [5, bad, 6], params)
    engine = Engine(tiny_model, max_batch=1)
    try:
        with pytest.raises(InvalidRequestError, match="prompt token ids"):
            engine.submit([5, bad], params, lambda piece: None, lambda r, e: None)
        assert engine.waiting == 0 and engine.running == 0
    finally:
        engine.stop()


def test_choices_of_one_prompt_share_its_prefill(tiny_model: Model) -> None:
    """n > 1: followers copy the leader's prompt KV (one prefill forward for the group) and
    still produce exactly what each produces alone, seeded sampling and greedy alike."""
    prompt = list(range(30, 70))
    choices = [
        SamplingParams(max_tokens=20, temperature=0.8, seed=seed, ignore_eos=True)
        for seed in (1, 2, 3)
    ] + [SamplingParams(max_tokens=20, ignore_eos=True)]
    alone = [
        generate(tiny_model, prompt, params, speculation=NGRAM).token_ids for params in choices
    ]
    engine = Engine(tiny_model, max_batch=4, start=False)
    kinds: list[str] = []
    engine.stats.step_listeners.append(lambda record: kinds.append(record.kind))
    leader = Waiter()
    first = engine.submit(prompt, choices[0], leader.on_text, leader.on_done, speculation=NGRAM)
    waiters = [leader]
    for params in choices[1:]:
        waiter = Waiter()
        engine.submit(
            prompt,
            params,
            waiter.on_text,
            waiter.on_done,
            speculation=NGRAM,
            share_prefill_with=first,
        )
        waiters.append(waiter)
    while not all(w.done.is_set() for w in waiters):
        engine.step()
    assert [w.wait().token_ids for w in waiters] == alone
    assert kinds.count("prefill") == 1  # the followers computed no prompt forward
    assert len({tuple(ids) for ids in alone[:3]}) == 3  # the seeds gave different choices


def test_a_follower_prefills_itself_when_its_leader_is_cancelled(tiny_model: Model) -> None:
    prompt = list(range(30, 50))
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    engine = Engine(tiny_model, max_batch=2, start=False)
    leader, follower = Waiter(), Waiter()
    first = engine.submit(prompt, params, leader.on_text, leader.on_done)
    engine.submit(prompt, params, follower.on_text, follower.on_done, share_prefill_with=first)
    engine.cancel(first)
    while not follower.done.is_set():
        engine.step()
    assert follower.wait().token_ids == generate(tiny_model, prompt, params).token_ids


def test_a_prompt_beside_decodes_is_prefilled_in_short_chunks(native_model: Model) -> None:
    """On the native runtime a prompt that arrives while another sequence decodes is
    prefilled ``prefill_chunk_busy`` tokens at a time, so the decoding one waits a short
    forward between its steps; alone, a prompt takes the long chunks. Outputs: as alone."""
    params = SamplingParams(max_tokens=30, ignore_eos=True)
    prompts = [list(range(5, 45)), list(range(50, 110))]
    alone = [generate(native_model, p, params).token_ids for p in prompts]
    engine = Engine(native_model, max_batch=2, start=False, prefill_chunk=100, prefill_chunk_busy=8)
    steps = StepLog(engine)
    first = _submit(engine, prompts[0], params)
    engine.step()  # its whole prompt in one chunk: nothing else runs
    second = _submit(engine, prompts[1], params)
    while not (first.done.is_set() and second.done.is_set()):
        engine.step()
    prefills = [r.tokens for r in steps.records if r.kind == "prefill"]
    assert prefills == [40] + [8] * 7 + [4], prefills
    assert [first.wait().token_ids, second.wait().token_ids] == alone


def test_a_finished_sequence_sends_its_last_text_with_its_answer(tiny_model: Model) -> None:
    """A sequence's last piece of text and its answer reach the handler back to back, with
    no forward between (behind Ray: one streamed item, not two), even when it finishes at
    its prefill in a step where another sequence decodes."""
    engine = Engine(tiny_model, max_batch=2, start=False)
    events: list[tuple[str, str]] = []
    engine.stats.step_listeners.append(lambda record: events.append(("forward", record.kind)))

    def submit(name: str, prompt: list[int], max_tokens: int) -> None:
        params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
        engine.submit(
            prompt,
            params,
            lambda piece: events.append((name, "text")),
            lambda result, error: events.append((name, "done" if error is None else "error")),
        )

    submit("long", [5, 6, 7], 12)
    engine.step()  # prefilled: it decodes from now on
    submit("short", [8, 9, 10], 1)
    for _ in range(100):  # far more steps than 12 tokens need
        if sum(kind in ("done", "error") for _, kind in events) == 2:
            break
        engine.step()
    for name in ("long", "short"):
        done = events.index((name, "done"))
        last_text = max(i for i, event in enumerate(events) if event == (name, "text"))
        assert ("forward", "decode") not in events[last_text:done], events
        assert events[done - 1] == (name, "text"), events
