"""Model runtime: weights, architectures, KV cache, tokenizer, catalog."""
