"""Benchmark scripts (``python -m bench.<name>``) and their recorded results (``bench/results``)."""
