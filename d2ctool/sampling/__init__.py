"""`d2c sample`: class labels -> stage-1 codes -> stage-2 latents -> images, and the baselines as modes."""
