"""Layer 5, `specserve tune`: measure speculation settings on the user's prompts, rank them
(bootstrap) and recommend one, with a report.

May import: ``model``, ``speculative``, ``engine``, ``deployments``.
"""
