"""Layer 1, the model runtime: weights (GGUF, safetensors), the native quantized kernels,
architectures, KV cache, tokenizer and chat template, the catalog and its chunked downloads.

May import: nothing else of specserve (the bottom layer).
"""
