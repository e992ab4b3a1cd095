"""Inference engines the runtime benchmark drives: specserve, HF transformers, llama.cpp.

Each implements ``Engine``: a plain greedy decode, and prefill / k-token forward / rollback
for timing multi-token forwards after a fixed context.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from specserve.engine.generate import generate
from specserve.model.catalog import resolve
from specserve.model.loader import load_model
from specserve.model.transformer import ForwardBatch
from specserve.speculative.sampling import SamplingParams

MODEL = "smollm2-135m-instruct"
KS = (1, 2, 4, 8, 16)  # forward sizes measured; the cache must fit context + max(KS)
# ----------------------------------------------------------------------------- engines


@dataclass
class DecodeSample:
    """One prompt's plain greedy decode: the first token comes from the prefill."""

    token_ids: list[int]
    ttft_s: float  # prefill and first token
    decode_s: float  # first token -> last token


class Engine(Protocol):
    """What the benchmark needs from an inference engine."""

    name: str
    fmt: str

    def decode(self, prompt_ids: list[int], max_tokens: int) -> DecodeSample: ...

    def prefill(self, context_ids: list[int]) -> None:
        """Fill the engine's cache with ``context_ids`` (for ``forward``)."""

    def forward(self, token_ids: list[int]) -> None:
        """One forward over ``token_ids`` right after the prefilled context, all logits."""

    def rollback(self) -> None:
        """Forget what ``forward`` added to the cache (untimed)."""


class SpecserveEngine:
    """specserve's own plain decoding loop and model, in one execution format."""

    name = "specserve"

    def __init__(self, fmt: str) -> None:
        self.fmt = fmt
        self.model = load_model(MODEL, dtype=fmt, progress=False)
        self.start = 0
        self.cache = self.model.lm.new_cache(1, 1)

    def decode(self, prompt_ids: list[int], max_tokens: int) -> DecodeSample:
        params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
        result = generate(self.model, prompt_ids, params)
        return DecodeSample(result.token_ids, result.time_to_first_token, result.decode_seconds)

    def prefill(self, context_ids: list[int]) -> None:
        self.start = len(context_ids)
        self.cache = self.model.lm.new_cache(1, self.start + max(KS) + 1)
        self.model.lm(ForwardBatch(torch.tensor([context_ids]), [0], [0]), self.cache)

    def forward(self, token_ids: list[int]) -> None:
        # Rewriting positions start.. each time is harmless: the cache is position-indexed.
        self.model.lm(ForwardBatch(torch.tensor([token_ids]), [0], [self.start]), self.cache)

    def rollback(self) -> None:
        pass


class _StepClock:
    """A transformers streamer that stamps the time of each ``put`` (prompt, then tokens)."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        self.stamps.append(time.perf_counter())

    def end(self) -> None:
        pass


class HFEngine:
    """Hugging Face transformers, float32, loaded from the same GGUF file."""

    name = "hf-transformers"
    fmt = "float32"

    def __init__(self) -> None:
        import transformers

        transformers.logging.set_verbosity_error()  # greedy-vs-sampling config chatter
        transformers.logging.disable_progress_bar()
        path, _ = resolve(MODEL)
        self.model = transformers.AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32
        ).eval()
        # The cache argument was renamed `past_key_values` -> `cache` in transformers 5.x.
        params = inspect.signature(self.model.forward).parameters
        self.cache_arg = "cache" if "cache" in params else "past_key_values"
        eos = self.model.generation_config.eos_token_id
        self.pad_id = eos[0] if isinstance(eos, list) else eos
        self.cache: Any = None
        self.context_len = 0

    @torch.inference_mode()
    def decode(self, prompt_ids: list[int], max_tokens: int) -> DecodeSample:
        clock = _StepClock()
        ids = torch.tensor([prompt_ids])
        begin = time.perf_counter()
        out = self.model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=max_tokens,
            min_new_tokens=max_tokens,  # ignore EOS, as the other engines do
            pad_token_id=self.pad_id,
            streamer=clock,
        )
        first, last = clock.stamps[1], clock.stamps[-1]  # stamps[0]: the prompt
        return DecodeSample(out[0, len(prompt_ids) :].tolist(), first - begin, last - first)

    @torch.inference_mode()
    def prefill(self, context_ids: list[int]) -> None:
        from transformers import DynamicCache

        self.cache = DynamicCache(config=self.model.config)
        self.context_len = len(context_ids)
        self.model(input_ids=torch.tensor([context_ids]), **{self.cache_arg: self.cache})

    @torch.inference_mode()
    def forward(self, token_ids: list[int]) -> None:
        self.model(input_ids=torch.tensor([token_ids]), **{self.cache_arg: self.cache})

    def rollback(self) -> None:
        extra = self.cache.get_seq_length() - self.context_len
        if extra > 0:
            self.cache.crop(-extra)  # negative: tokens to remove (the only form in 5.x)


class LlamaCppEngine:
    """llama.cpp (llama-cpp-python) running the GGUF's own Q4_1 kernels."""

    name = "llama.cpp"
    fmt = "Q4_1"

    def __init__(self, threads: int, n_ctx: int) -> None:
        import llama_cpp

        path, _ = resolve(MODEL)
        common = {"n_ctx": n_ctx, "n_threads": threads, "n_threads_batch": threads}
        # Plain decoding needs the last position's logits only; a verify forward needs all
        # k positions' (as specserve and transformers compute them), hence two contexts.
        self.llm = llama_cpp.Llama(model_path=str(path), verbose=False, **common)
        self.multi = llama_cpp.Llama(model_path=str(path), verbose=False, logits_all=True, **common)
        self.context_len = 0

    def decode(self, prompt_ids: list[int], max_tokens: int) -> DecodeSample:
        self.llm.reset()  # no prompt-prefix reuse from the previous call
        tokens: list[int] = []
        stamps: list[float] = []
        begin = time.perf_counter()
        for token in self.llm.generate(prompt_ids, temp=0.0, repeat_penalty=1.0, reset=True):
            stamps.append(time.perf_counter())
            tokens.append(int(token))
            if len(tokens) >= max_tokens:  # generate() itself never stops, EOS included
                break
        return DecodeSample(tokens, stamps[0] - begin, stamps[-1] - stamps[0])

    def prefill(self, context_ids: list[int]) -> None:
        self.multi.reset()
        self.multi.eval(context_ids)
        self.context_len = len(context_ids)

    def forward(self, token_ids: list[int]) -> None:
        self.multi.eval(token_ids)  # drops cache cells past n_tokens first

    def rollback(self) -> None:
        self.multi.n_tokens = self.context_len
