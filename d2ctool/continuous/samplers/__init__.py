"""Samplers of the diffusion head, chosen at sample time (`stage2.sampler`); one file each.

Each works on the trained eps-prediction head without retraining, over the training schedule respaced
to `stage2.num_sampling_steps` steps, and evaluates the network once per step (twice the rows where CFG
applies). Signature: (denoiser: GuidedDenoiser, noise [N, C], settings, generator) -> tokens [N, C].
"""

from d2ctool.continuous.samplers import ddim, ddpm, dpm_solver

# the names are those of continuous.config.HEAD_SAMPLERS (a test keeps the two equal)
HEAD_SAMPLERS = {"ddpm": ddpm.sample, "ddim": ddim.sample, "dpm-solver++": dpm_solver.sample}
