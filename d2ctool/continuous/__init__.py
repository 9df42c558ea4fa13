"""Stage 2: MAR-style masked autoregression over continuous VAE latents, conditioned on discrete VQ codes."""
