"""Continuous batching: many requests of one target model share each forward pass.

The engine owns a KV cache with ``max_batch`` slots and runs in its own thread, so the HTTP
event loop never waits on model compute. Each iteration it

1. drops cancelled requests (a client that disconnected) and admits waiting ones into free
   slots — sequences join and leave between steps;
2. prefills one chunk of the oldest admitted prompt (long prompts do not stall the others),
   starting after the longest prefix its prefix cache keeps, if it has one; the last chunk
   also verifies a prediction's first drafts (engine/prefill.py);
3. runs one decode step for every sequence past its prefill: each contributes its last token
   plus its own drafts (its own proposers, its own self-tuned length), rows are packed (the
   native runtime) or padded to the longest feed, and one target forward verifies them all.

Rows of one forward do not influence each other (row-independent GEMMs, per-row attention
over position blocks), so a request's tokens do not depend on what it was batched with.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Sequence as Ids

import torch

from specserve.engine.batch_policy import SpeculationGuard, batch_feeds
from specserve.engine.job import (
    DoneSink,
    EngineStats,
    EngineStoppedError,
    Job,
    QueueFullError,
    StepRecord,
    TextSink,
)
from specserve.engine.prefill import prefill_chunk, start_sequence
from specserve.engine.sequence import Sequence, check_prompt
from specserve.model.kv_cache import POSITION_BLOCK
from specserve.model.loader import Model
from specserve.model.prefix_cache import PrefixCache
from specserve.model.qlinear import park_threads
from specserve.model.transformer import ForwardBatch
from specserve.speculative.config import PLAIN, SpeculationConfig
from specserve.speculative.draft_length import StepCosts
from specserve.speculative.limits import MAX_DRAFT_TOKEN_COUNT
from specserve.speculative.sampling import SamplingParams

log = logging.getLogger(__name__)

# A padded row writes up to this many positions past its own sequence (a longer feed of
# another row); the cache and RoPE tables keep that much room beyond the context limit.
PADDING_ROOM = POSITION_BLOCK
PREFILL_CHUNK = 512
# The native runtime's chunk while others decode: its kernels stream the weights once per
# 64 rows anyway (qmatmul.cpp's kRowChunk), so the prompt loses ~nothing and a running
# sequence waits a 64-token forward between steps, not a 512-token one (1.5B: 0.2 vs 1.4 s).
PREFILL_CHUNK_BESIDE_DECODES = 64


def run_engines(engines: list[Engine]) -> None:
    """The compute loop: step every engine with work, sleep when none has any.

    All torch compute of a server runs in the one thread that calls this (and that loaded
    the models): OpenMP keeps a thread team per calling thread, and a second thread's team
    competing with the first for 2 cores made steps 2-3x slower (measured).
    """
    if not engines:
        return
    cond = engines[0]._cond
    assert all(e._cond is cond for e in engines), "engines of one loop share a condition"
    torch.set_grad_enabled(False)
    while True:
        with cond:
            while not any(e._has_work() for e in engines):
                if all(e.stopped for e in engines):
                    return
                park_threads()
                cond.wait()
        for engine in engines:
            engine.step()


class Engine:
    """Runs the requests of one target model in continuous batches (see the module doc)."""

    def __init__(
        self,
        model: Model,
        max_batch: int = 8,
        max_context: int | None = None,
        max_queue: int = 64,
        prefill_chunk: int = PREFILL_CHUNK,
        condition: threading.Condition | None = None,
        start: bool = True,
        prefix_cache: PrefixCache | None = None,
        packed_batches: bool = True,
        prefill_chunk_busy: int = PREFILL_CHUNK_BESIDE_DECODES,
        drafts_in_prefill: bool = True,
    ) -> None:
        """``start``: run in a thread of its own; else the caller runs `run_engines` (one
        compute thread for several engines sharing ``condition``). ``prefix_cache``: prompts
        start their prefill after the longest prefix kept there (model/prefix_cache.py).
        ``packed_batches``: where the runtime allows, a batch's rows carry only their own
        tokens (False pads them to one width, as other runtimes do: for comparisons).
        ``prefill_chunk_busy``: the native runtime's prefill chunk while others decode.
        ``drafts_in_prefill``: a prompt's last chunk verifies its prediction's first drafts
        (engine/prefill.py; False gives them a forward of their own: for comparisons)."""
        if max_batch < 1 or max_queue < 0 or min(prefill_chunk, prefill_chunk_busy) < 1:
            raise ValueError("max_batch and prefill_chunk must be >= 1, max_queue >= 0")
        room = model.max_context - PADDING_ROOM - MAX_DRAFT_TOKEN_COUNT
        self.context_limit = min(max_context or room, room)
        if self.context_limit < 2:
            raise ValueError(f"{model.name}: its context is too short to serve")
        self.model = model
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.prefill_chunk = prefill_chunk
        self.prefix_cache = prefix_cache
        self.packed_batches = packed_batches
        self.prefill_chunk_busy = prefill_chunk_busy
        self.drafts_in_prefill = drafts_in_prefill
        self.cache = model.lm.new_cache(max_batch, self.context_limit + PADDING_ROOM)
        # Seconds per forward by batch size and width: the sequences' own tuners read the
        # batch-of-one table, the choice of a padded batch's width the table of its size. A
        # packed forward costs about what one sequence's forward of as many tokens costs, so
        # packed steps share the batch-of-one table, by their total tokens.
        self.costs: dict[int, StepCosts] = {}
        self.guards: dict[int, SpeculationGuard] = {}  # by batch size
        self.stats = EngineStats()
        self._free_slots = list(range(max_batch - 1, -1, -1))
        self._waiting: deque[Job] = deque()
        self._active: list[Job] = []
        self._ids = itertools.count(1)
        self._cond = condition or threading.Condition()
        self._stopping = False
        self.stopped = False
        self._thread: threading.Thread | None = None
        if start:
            self._thread = threading.Thread(
                target=run_engines, args=([self],), name=f"engine-{model.name}", daemon=True
            )
            self._thread.start()

    # -- called from other threads -------------------------------------------------------

    def submit(
        self,
        prompt_ids: Ids[int],
        params: SamplingParams,
        on_text: TextSink,
        on_done: DoneSink,
        speculation: SpeculationConfig = PLAIN,
        prediction_ids: Ids[int] | None = None,
        record_features: bool = False,
        share_prefill_with: Job | None = None,
    ) -> Job:
        """Queue a request; invalid prompts and a full queue raise here, before any compute.

        ``on_text`` and ``on_done`` are called from the engine thread. ``record_features``:
        the result also carries the target's features (``GenerationResult.features``).
        ``share_prefill_with``: a job of the same prompt (another choice of an ``n > 1``
        request) whose prompt KV this one copies instead of computing it again; it prefills
        on its own if that job is gone before its prefill is done.
        """
        check_prompt(self.model, prompt_ids, self.context_limit)
        job = Job(
            list(prompt_ids),
            params,
            speculation,
            None if prediction_ids is None else list(prediction_ids),
            on_text,
            on_done,
            record_features=record_features,
        )
        if share_prefill_with is not None and share_prefill_with.prompt_ids == job.prompt_ids:
            job.leader = share_prefill_with
        with self._cond:
            if self._stopping:
                raise EngineStoppedError("the server is shutting down")
            if len(self._waiting) >= self.max_queue:
                raise QueueFullError(
                    f"{self.model.name}: {len(self._waiting)} requests are already waiting "
                    f"(the queue bound); retry later"
                )
            job.id = next(self._ids)
            self._waiting.append(job)
            self._update_counts()
            self._cond.notify()
        return job

    def cancel(self, job: Job) -> None:
        """Stop a request (its client went away); its slot is freed before the next step."""
        with self._cond:
            job.cancelled = True
            self._cond.notify()

    def stop(self, timeout: float = 10.0) -> None:
        """Fail what is queued or running, and end the engine's loop."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    @property
    def running(self) -> int:
        with self._cond:
            return len(self._active)

    @property
    def waiting(self) -> int:
        with self._cond:
            return len(self._waiting)

    # -- the engine thread ---------------------------------------------------------------

    def _update_counts(self) -> None:
        self.stats.running = len(self._active)
        self.stats.waiting = len(self._waiting)

    def _has_work(self) -> bool:
        """Under the lock: anything to do (including shutting down)?"""
        return not self.stopped and (self._stopping or bool(self._waiting or self._active))

    def _schedule(self) -> bool:
        """Drop cancelled jobs, admit waiting ones; False once the engine has stopped."""
        with self._cond:
            if self.stopped:
                return False
            if self._stopping:
                jobs = [*self._waiting, *self._active]
                self._waiting.clear()
                self._active.clear()
                self.stopped = True
                self._update_counts()
                for job in jobs:
                    job.on_done(None, EngineStoppedError("the server is shutting down"))
                return False
            for job in [j for j in self._waiting if j.cancelled]:
                self._waiting.remove(job)
                self.stats.cancelled += 1
                job.on_done(None, None)
            for job in [j for j in self._active if j.cancelled]:
                self._release(job)
                self.stats.cancelled += 1
                job.on_done(job.seq.result() if job.seq else None, None)
            while self._waiting and self._free_slots:
                job = self._waiting.popleft()
                job.slot = self._free_slots.pop()
                self._active.append(job)
            self._update_counts()
            return bool(self._active)

    def _release(self, job: Job) -> None:
        self._active.remove(job)
        if job.slot is not None:
            self._free_slots.append(job.slot)
            job.slot = None
        self._update_counts()

    def step(self) -> None:
        """One iteration: schedule, then a prefill chunk and/or a decode step."""
        if not self._schedule():
            return
        try:
            self._iterate()
        except Exception as exc:  # a bug must not kill the server: fail the batch
            log.exception("engine step failed")
            with self._cond:
                for job in list(self._active):
                    self._release(job)
                    job.on_done(None, exc)

    def _iterate(self) -> None:
        with self._cond:
            active = [j for j in self._active if not j.cancelled]
        for job in active:
            if job.seq is None:
                try:
                    job.seq = self._new_sequence(job)
                    self._restore_prefix(job)
                except Exception as exc:  # e.g. a draft model that cannot serve this request
                    with self._cond:
                        self._release(job)
                    job.on_done(None, exc)
        active = [j for j in active if j.seq is not None]
        for job in active:
            if not job.started and self._can_share_prefill(job):
                self._share_prefill(job)
        prefilling = [j for j in active if not j.started and not self._waits_for_leader(j)]
        if prefilling:
            busy = any(j.started for j in active) and self.model.lm.packs_rows(self.cache)
            chunk = min(self.prefill_chunk, self.prefill_chunk_busy if busy else 1 << 30)
            self._prefill_chunk(prefilling[0], chunk)
            self._answer_finished(prefilling[:1])  # e.g. max_tokens=1: no wait for the decode
        decoding = [j for j in active if j.started and j.seq is not None and not j.seq.done]
        if decoding:
            self._decode_step(decoding)
        self._answer_finished(active)

    def _answer_finished(self, jobs: list[Job]) -> None:
        """Answer each job whose sequence is done and free its slot. Its last piece of text and
        its answer go first, back to back (a stream's end then travels with its last text, as
        one item behind Ray), and the prefix cache's copy of the KV after them."""
        for job in jobs:
            seq = job.seq
            if seq is None or not seq.done:
                continue  # still running: no lock taken in the decode loop
            with self._cond:
                if job not in self._active:
                    continue  # answered already, just after its prefill
            self.stats.finished += 1
            if job.last_piece and not job.cancelled:
                job.on_text(job.last_piece)
            job.on_done(seq.result(), None)
            self._keep_sequence(job)
            with self._cond:
                self._release(job)

    def _new_sequence(self, job: Job) -> Sequence:
        seq = Sequence(
            self.model,
            job.prompt_ids,
            job.params,
            job.speculation,
            job.prediction_ids,
            self.costs_for(1),
            self.context_limit,
            record_features=job.record_features,
        )
        seq.submitted_at = job.submitted_at  # time to first token includes the queueing
        return seq

    def _restore_prefix(self, job: Job) -> None:
        """Start a new job's prefill after the longest prefix the prefix cache keeps (not a
        follower's: it copies its leader's whole prompt)."""
        seq = job.seq
        if self.prefix_cache is None or job.leader is not None or seq is None:
            return
        assert job.slot is not None
        hit = seq.restore_prefix(self.prefix_cache, self.cache, job.slot)
        if hit is not None:
            job.prompt_features.append((0, hit.features))
            job.prefilled = hit.length

    def _can_share_prefill(self, job: Job) -> bool:
        leader = job.leader
        return leader is not None and leader.started and leader.slot is not None

    def _waits_for_leader(self, job: Job) -> bool:
        """A follower waits while its leader is queued or prefilling, not once it is gone."""
        leader = job.leader
        if leader is None or leader.started or leader.cancelled:
            return False
        with self._cond:
            return leader in self._waiting or leader in self._active

    def _share_prefill(self, job: Job) -> None:
        """Start a follower from its leader's prefill: the KV of the prompt is copied."""
        leader, seq = job.leader, job.seq
        assert leader is not None and leader.prompt_logits is not None and seq is not None
        assert leader.slot is not None and job.slot is not None
        self.cache.copy_prefix(leader.slot, job.slot, len(seq.prompt_ids))
        for start, features in leader.prompt_features:
            seq.add_prompt_features(start, features)
        job.prefilled, job.started = len(seq.prompt_ids), True
        self._deliver(job, seq.start(leader.prompt_logits))

    def costs_for(self, batch_size: int) -> StepCosts:
        return self.costs.setdefault(batch_size, StepCosts(rows=batch_size))

    def _record(
        self, kind: str, batch_size: int, tokens: int, seconds: float, packed: bool = False
    ) -> None:
        self.stats.steps += 1
        record = StepRecord(kind, batch_size, tokens, seconds, packed)
        for listener in self.stats.step_listeners:
            listener(record)

    def _prefill_chunk(self, job: Job, chunk: int) -> None:
        seq = job.seq
        assert seq is not None and job.slot is not None
        start, end = job.prefilled, min(job.prefilled + chunk, len(seq.prompt_ids))
        began = time.perf_counter()
        done = prefill_chunk(
            self.model.lm, self.cache, job.slot, seq, start, end, self.drafts_in_prefill
        )
        self._record("prefill", 1, done.features.shape[0], time.perf_counter() - began)
        if seq.source.feature_readers or self.prefix_cache is not None:
            job.prompt_features.append((start, done.prompt_features))  # followers', kept
        job.prefilled = end
        if end == len(seq.prompt_ids):
            self._keep_prompt(job)
            job.started = True
            job.prompt_logits = done.last_prompt_logits
            self._deliver(job, start_sequence(seq, done))
            if self.prefix_cache is not None and done.feed is not None:
                job.output_features.append(done.output_features(seq).clone())

    def _keep_prompt(self, job: Job) -> None:
        """A prefilled prompt into the prefix cache (requests with the same opening need not
        wait for this one to finish)."""
        seq = job.seq
        if self.prefix_cache is None or seq is None or job.slot is None:
            return
        features = torch.cat([f for _, f in job.prompt_features])
        self.prefix_cache.store(seq.prompt_ids, self.cache, job.slot, features)

    def _keep_sequence(self, job: Job) -> None:
        """A finished request's prompt and output into the prefix cache (all but the last
        token, whose KV no forward wrote): a chat's next turn repeats both."""
        seq = job.seq
        if self.prefix_cache is None or seq is None or job.slot is None or job.cancelled:
            return
        ids = seq.all_ids[:-1]
        features = [f for _, f in job.prompt_features] + job.output_features
        if features and sum(f.shape[0] for f in features) == len(ids):
            self.prefix_cache.store(ids, self.cache, job.slot, torch.cat(features))

    def _decode_step(self, jobs: list[Job]) -> None:
        seqs = [job.seq for job in jobs if job.seq is not None]
        for seq in seqs:
            seq.next_feed()  # each sequence proposes with its own self-tuned length
        guard = self.guards.setdefault(len(seqs), SpeculationGuard())
        proposing = any(seq.drafts for seq in seqs)
        fixed = any(not seq.source.adaptive for seq in seqs)  # --fixed-length: as asked
        speculate = proposing and (fixed or guard.allows_speculation())
        packed = len(seqs) > 1 and self.packed_batches and self.model.lm.packs_rows(self.cache)
        costs = self.costs_for(1 if packed else len(seqs))  # see self.costs
        feeds = batch_feeds(seqs, costs, speculate, packed)
        width = max(len(f) for f in feeds)
        # Padding repeats a row's last token; its logits are ignored, its cache writes land
        # past the row's own positions and are overwritten before they are ever read (a
        # packed forward computes none of it).
        rows = [f + [f[-1]] * (width - len(f)) for f in feeds]
        slots = [job.slot for job in jobs if job.slot is not None]
        starts = [seq.position for seq in seqs]
        lengths = [len(f) for f in feeds]
        began = time.perf_counter()
        batch = ForwardBatch(torch.tensor(rows), slots, starts, lengths if packed else None)
        logits, features = self.model.lm.forward_with_features(batch, self.cache)
        seconds = time.perf_counter() - began
        tokens = sum(lengths) if packed else width * len(rows)
        if packed:
            self.costs_for(1).observe(tokens, seconds)
        else:
            self.costs_for(len(rows)).observe(width, seconds)
            logits, features = logits.flatten(0, 1), features.flatten(0, 1)  # row b at b * width
        self._record("decode", len(rows), tokens, seconds, packed)
        sizes = lengths if packed else [width] * len(rows)
        firsts = [0, *itertools.accumulate(sizes)][:-1]  # each row's first output position
        emitted = 0
        for job, seq, n, at in zip(jobs, seqs, lengths, firsts, strict=True):
            before = len(seq.out)
            self._deliver(job, seq.accept(logits[at : at + n], features[at : at + n]))
            kept = len(seq.out) - before  # the positions whose KV this step wrote for good
            if self.prefix_cache is not None and kept:
                job.output_features.append(features[at : at + kept].clone())
            emitted += max(1, kept)  # an EOS still counts as one token
        if proposing:
            guard.observe(tokens > len(rows), emitted, seconds)

    @staticmethod
    def _deliver(job: Job, piece: str) -> None:
        """Stream a new piece of text; a finished sequence's last piece waits for its answer
        (`_answer_finished`), so that the two reach the handler together."""
        if job.seq is not None and job.seq.done:
            job.last_piece += piece
        elif piece and not job.cancelled:
            job.on_text(piece)
