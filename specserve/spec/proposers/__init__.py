"""Proposers: one module each, behind the ``Proposer`` Protocol, looked up in ``PROPOSERS``.

Importing this package imports every proposer module, which fills the registry.
"""

from specserve.spec.proposers.base import (
    PROPOSERS,
    Proposal,
    Proposer,
    SequenceContext,
    register,
)
from specserve.spec.proposers.draft_model import DraftModelProposer
from specserve.spec.proposers.ngram import NgramProposer
from specserve.spec.proposers.prediction import PredictionProposer, PredictionStats

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
