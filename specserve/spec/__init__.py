"""Speculative decoding: proposers guess the next tokens, the verifier keeps the target's output.

``verify`` is the lossless verifier (pure functions, no model calls); ``proposers`` holds one
module per way of guessing, behind one Protocol and a registry keyed by method name.
"""
