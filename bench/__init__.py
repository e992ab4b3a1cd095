"""Benchmark scripts (``python bench/<name>.py``) and their recorded results (``bench/results``)."""
