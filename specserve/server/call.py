"""One accepted request (where it runs, how its answer is named and counted), and engine
failures as OpenAI errors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from specserve.engine.job import EngineStoppedError
from specserve.server.errors import APIError, invalid
from specserve.server.metrics import Metrics
from specserve.server.served import ServedDeployment
from specserve.speculative.sampling import InvalidRequestError


@dataclass(frozen=True)
class Call:
    """One accepted request: where it runs and how its answer is named and counted."""

    kind: str  # "chat" or "text"
    served: ServedDeployment
    metrics: Metrics
    request_id: str

    @property
    def endpoint(self) -> str:
        return "chat.completions" if self.kind == "chat" else "completions"

    def record(self, outcome: str, result: Any = None) -> None:
        """Count the request once (n choices: their merged result, `choices.merge_results`)."""
        self.metrics.record_request(self.served.id, self.endpoint, outcome, result)


def engine_error(error: BaseException) -> APIError:
    """An engine failure as an OpenAI error (details of the unexpected ones stay in the log)."""
    if isinstance(error, EngineStoppedError):
        return APIError(503, str(error), "server_error", code="shutting_down")
    if isinstance(error, (InvalidRequestError, ValueError)):
        return invalid(str(error))
    return APIError(500, "internal server error (details are in the server log)", "server_error")
