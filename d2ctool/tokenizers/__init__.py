"""Tokenizers: the VQ model (discrete codes, LlamaGen) and the KL autoencoder (continuous latents, LDM/MAR)."""
