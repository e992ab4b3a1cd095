"""specserve: a self-hosted speculative-decoding LLM server."""

import os

__version__ = "0.1.0"

# Lossless speculation needs each row of a forward to come out the same bits whatever the
# number of rows. PyTorch's bfloat16 matmuls run on oneDNN, which on CPUs with AMX (Intel
# Sapphire Rapids and later) picks AMX kernels whose blocking changes a row's rounding with
# the row count (seen on an Emerald Rapids machine: one feature row of a 55-row forward off
# by 6e-5 from the same row in a 7-row forward). Capped at AVX-512 with BF16, the rows are
# invariant there as on other CPUs. oneDNN reads this when it first runs a kernel, so it is
# set on import, before any model runs; a value the user set is kept.
os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")
