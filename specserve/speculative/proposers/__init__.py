"""Proposers: one module each, behind the ``Proposer`` Protocol, looked up in ``PROPOSERS``.

Importing this package imports every proposer module, which fills the registry.
"""

from specserve.speculative.proposers.base import (
    PROPOSERS,
    Proposal,
    Proposer,
    SequenceContext,
    register,
)
from specserve.speculative.proposers.draft_model import DraftModelProposer
from specserve.speculative.proposers.ngram import NgramProposer
from specserve.speculative.proposers.prediction import PredictionProposer, PredictionStats

__all__ = [
    "PROPOSERS",
    "DraftModelProposer",
    "NgramProposer",
    "PredictionProposer",
    "PredictionStats",
    "Proposal",
    "Proposer",
    "SequenceContext",
    "register",
]
