"""Layer 5, the OpenAI-compatible HTTP server (FastAPI + uvicorn) over the continuous-batching
engine, one process (``run``) or Ray Serve replicas (``ray_*``).

May import: ``model``, ``speculative``, ``engine``, ``deployments``.
"""
