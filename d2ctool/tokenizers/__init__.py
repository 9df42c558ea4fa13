"""Tokenizers: the VQ models (discrete codes: LlamaGen's VQ in vq.py, the MaskGIT VQGAN in maskgit.py, one
nearest-code search in quantize.py) and the KL autoencoders (continuous latents: LDM/MAR's kl-16, VA-VAE in
kl.py), the latent normalisation, `d2c encode` and `d2c train-tokenizer`."""
