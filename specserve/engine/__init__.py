"""Layer 3, the engine: one request's step state (``sequence``), batch-of-one generation
(``generate``), continuous batching (``scheduler``), detokenizing and stop strings, results,
and prompt files.

Each step follows ``speculative/reference.py``: propose, one target forward over the fed
tokens, verify, keep the accepted tokens and roll back the KV cache past them.

May import: ``specserve.model``, ``specserve.speculative``.
"""
