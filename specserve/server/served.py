"""Deployments made runnable: loaded models, one engine per target model, drafters attached.

Deployments that name the same model share its weights and its engine (so their requests
batch together, each with its own drafter); a draft model is loaded once for all of them.
A request names a deployment id, or a catalog model name served by that model's default
deployment; it can never name a file path.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from specserve.deployments.rules import EffectiveDrafter
from specserve.deployments.store import Deployment
from specserve.engine.scheduler import Engine
from specserve.model.loader import Model
from specserve.model.prefix_cache import MIB, PrefixCache
from specserve.server.errors import model_not_found
from specserve.speculative.config import SpeculationConfig, speculation_for_drafter


@dataclass(frozen=True)
class EngineOptions:
    max_batch: int = 8
    max_queue: int = 64
    max_context: int | None = 4096
    prefill_chunk: int = 512
    prefix_cache_mb: int = 256  # recent prompts' KV, per model (0: off)


@dataclass
class ServedDeployment:
    id: str
    model: str  # as the deployment names it: a catalog name or a local path
    engine: Engine
    speculation: SpeculationConfig
    drafter: EffectiveDrafter
    created: int

    def describe(self) -> dict[str, Any]:
        """The ``/v1/models`` entry (OpenAI's fields, then ours)."""
        return {
            "id": self.id,
            "object": "model",
            "created": self.created,
            "owned_by": "specserve",
            "root": self.engine.model.name,
            "context_window": self.engine.context_limit,
            "drafter": self.drafter.as_dict(),
        }


class ServedDeployments:
    """Lookup of the deployments this server runs."""

    def __init__(self, served: Iterable[ServedDeployment]) -> None:
        self.by_id = {s.id: s for s in served}
        self.default_for_model: dict[str, ServedDeployment] = {}
        for s in sorted(self.by_id.values(), key=lambda s: s.created):
            # A deployment whose id is the model's name is that model's default; else the oldest.
            if s.id == s.model or s.model not in self.default_for_model:
                self.default_for_model[s.model] = s

    def lookup(self, name: str) -> ServedDeployment:
        found = self.by_id.get(name) or self.default_for_model.get(name)
        if found is None or (found.id != name and "/" in name):
            raise model_not_found(name, self.by_id)
        return found

    def engines(self) -> dict[str, Engine]:
        """The distinct engines, by their model's name."""
        return {s.engine.model.name: s.engine for s in self.by_id.values()}

    def stop(self) -> None:
        for engine in self.engines().values():
            engine.stop()


def load_deployments(
    deployments: Iterable[Deployment],
    load: Callable[[str], Model],
    options: EngineOptions = EngineOptions(),
    start: bool = True,
) -> ServedDeployments:
    """Load each deployment's model (once per distinct model) and drafter, make engines.

    ``start``: each engine runs in a thread of its own (tests); else they share one
    condition and the caller runs them all with `run_engines` in the loading thread.
    """
    models: dict[str, Model] = {}
    engines: dict[str, Engine] = {}
    condition = threading.Condition()

    def model(name: str) -> Model:
        if name not in models:
            models[name] = load(name)
        return models[name]

    served = []
    for deployment in deployments:
        target = model(deployment.model)
        drafter = deployment.effective_drafter()
        speculation = speculation_for_drafter(**drafter.fields(), target=target, load=model)
        if speculation.draft_model is not None and options.prefix_cache_mb > 0:
            draft_cache = PrefixCache(options.prefix_cache_mb * MIB)
            speculation = dataclasses.replace(speculation, draft_prefix_cache=draft_cache)
        if deployment.model not in engines:
            engines[deployment.model] = Engine(
                target,
                max_batch=options.max_batch,
                max_context=options.max_context,
                max_queue=options.max_queue,
                prefill_chunk=options.prefill_chunk,
                condition=None if start else condition,
                start=start,
                prefix_cache=PrefixCache(options.prefix_cache_mb * MIB)
                if options.prefix_cache_mb > 0
                else None,
            )
        created = int(deployment.created_at or time.time())
        served.append(
            ServedDeployment(
                deployment.id,
                deployment.model,
                engines[deployment.model],
                speculation,
                drafter,
                created,
            )
        )
    return ServedDeployments(served)
