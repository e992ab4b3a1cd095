"""Layer 4, the control plane: deployments (a model plus its speculation settings) kept in SQLite.

``rules`` holds the product's speculation flag rules (one function, used by the CLI, the
server and the store), ``vocab`` the tokenizer-only checks (same vocabulary, model family),
``store`` the SQLite records, ``service`` the validated operations and ``cli`` the
``specserve deployment ...`` subcommands. Nothing here imports torch or loads weights.

May import: ``specserve.model`` (catalog, tokenizers), ``specserve.speculative.limits``.
"""
