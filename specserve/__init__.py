"""specserve: a self-hosted speculative-decoding LLM server."""

__version__ = "0.1.0"
