"""The speculation bounds every layer checks against (a leaf: no imports, no torch).

`deployments.rules` checks flags against them without importing PyTorch, so
`specserve deployment list` stays quick.
"""

# The bound of the model drafters (draft model, EAGLE head): --draft-token-count 1..32.
MAX_DRAFT_TOKEN_COUNT = 32
# Lookups (a request's prediction, and the n-gram proposals the product adds next to a model
# drafter) cost nothing to draft, so they are bounded apart: up to 64 tokens a step, the
# self-tuned length keeping the verify forward to what measured acceptance pays for.
MAX_LOOKUP_DRAFT = 64
MAX_NGRAM_LENGTH = 16  # --ngram-speculation-length 1..16
