"""Layer 2, speculative decoding: proposers guess the next tokens, the verifier keeps the
target's output.

- ``sampling``: the one function that turns logits into the target distribution;
- ``verify``: the lossless verifier (pure functions, no model calls);
- ``proposers/``: one module per way of guessing, behind one Protocol and a registry;
- ``draft_length``: the self-tuned draft length (measured cost per width);
- ``config`` / ``source``: a deployment's speculation settings and a request's proposers;
- ``eagle_head`` / ``head_artifact``: the trained EAGLE head and its on-disk format;
- ``limits``: the bounds every layer checks (no torch); ``stats``: acceptance counters;
- ``reference``: the one-screen speculative step, the test oracle. Start reading there.

May import: ``specserve.model``.
"""
