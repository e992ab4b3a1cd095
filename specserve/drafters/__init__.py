"""Layer 5, training drafters (`specserve drafter train`): self-distillation data from the
target, the training loop, the built-in prompts, and the shipped trained heads (``shipped/``).
The head itself and its format live in ``specserve.speculative`` (the engine loads them).

May import: ``model``, ``speculative``, ``engine``, ``deployments``.
"""
