"""Stage 1: the discrete autoregressive model (LlamaGen's class-conditional GPT) over VQ codes."""
