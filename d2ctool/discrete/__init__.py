"""Stage 1: the discrete autoregressive models over VQ codes (LlamaGen's class-conditional GPT in model.py,
RAR in rar.py, what both share in blocks.py), their presets and loading, generation with a KV cache, and
`d2c train-discrete`."""
