"""Diagnose a trained stage-2 model's diffusion head: how wrong is its epsilon at each timestep, what x0
error does that imply, and how far do its sampled latents drift from the data (with and without a bound
on x0)?

    python bench/stage2_head.py runs/tiny/continuous-add runs/tiny/encoded-val
    python bench/stage2_head.py RUN DATA --clips 0 3 5 --num-images 100

For real images of DATA (encoded shards, original view): eps rms error of the head, conditioned as in
training (a random mask, the real codes), at chosen timesteps, and the x0 error it implies
(x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar)); then latents sampled on the same labels and codes, with
each x0 bound, against the data's per-channel std. Prints one JSON line per measurement.
"""

from __future__ import annotations

import argparse
import json

import torch

from d2ctool.continuous.load import load_mar
from d2ctool.continuous.config import ContinuousSamplingConfig
from d2ctool.continuous.sample import sample_latents
from d2ctool.data.encoded import first_samples, read_manifest
from d2ctool.tokenizers.kl import posterior_latents
from d2ctool.tokenizers.latent_norm import from_manifest


def real_batch(data: str, count: int):
    norm = from_manifest(read_manifest(data).data)
    codes, labels, moments = first_samples(data, count)
    latents = norm.apply(posterior_latents(torch.from_numpy(moments), None))
    return latents, torch.from_numpy(labels), torch.from_numpy(codes)


@torch.no_grad()
def eps_errors(model, latents, labels, codes, timesteps, generator):
    """rms(eps_pred - eps) and rms(x0_pred - x0) over masked tokens, per timestep."""
    tokens = model.patchify(latents)
    ctx = model.code_context(codes if model.cfg.fusion != "none" else None)
    orders = model.sample_orders(len(labels), latents.device, generator)
    mask = model.random_mask(orders, generator)
    z = model.decode(model.encode(tokens, mask, model.class_embedding(labels, len(labels)), ctx), mask, ctx)
    x0, z = tokens[mask], z[mask]
    head, s = model.diffloss, model.diffloss.train_schedule
    rows = []
    for step in timesteps:
        t = torch.full((len(x0),), step, dtype=torch.long)
        noise = torch.randn(x0.shape, generator=generator)
        xt = s.q_sample(x0, t, noise)
        eps = head.net(xt, t, z).float()[:, :head.channels]
        x0_pred = s.at("sqrt_recip_ac", t) * xt - s.at("sqrt_recipm1_ac", t) * eps
        rows.append({"t": step, "alpha_bar": float(s.alphas_cumprod[step]),
                     "eps_rms_error": round(float((eps - noise).pow(2).mean().sqrt()), 5),
                     "x0_rms_error": round(float((x0_pred - x0).pow(2).mean().sqrt()), 4)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="a train-continuous run folder (or checkpoint)")
    parser.add_argument("data", help="encoded shards of real images")
    parser.add_argument("--num-images", type=int, default=100)
    parser.add_argument("--timesteps", type=int, nargs="+", default=[0, 250, 500, 750, 900, 990, 999])
    parser.add_argument("--clips", type=float, nargs="+", default=[0.0, 3.0, 5.0])
    parser.add_argument("--num-iter", type=int, default=8)
    parser.add_argument("--sampling-steps", type=int, default=25)
    parser.add_argument("--cfg", type=float, default=1.0)
    args = parser.parse_args()

    model, info = load_mar("mar-tiny", args.run)
    model.eval()
    latents, labels, codes = real_batch(args.data, args.num_images)
    generator = torch.Generator().manual_seed(0)
    for row in eps_errors(model, latents, labels, codes, args.timesteps, generator):
        print(json.dumps({"run": args.run, **row}), flush=True)
    data_std = latents.std(dim=(0, 2, 3))
    print(json.dumps({"run": args.run, "data_latent_std": [round(float(v), 3) for v in data_std]}), flush=True)
    for clip in args.clips:
        sampled = sample_latents(model, labels, codes if model.cfg.fusion != "none" else None,
                                 ContinuousSamplingConfig(num_iter=args.num_iter, num_sampling_steps=args.sampling_steps,
                                                          cfg_scale=args.cfg, clip_x0=clip), generator=torch.Generator().manual_seed(1))
        std = sampled.std(dim=(0, 2, 3))
        print(json.dumps({"run": args.run, "clip_x0": clip, "sampled_latent_std": [round(float(v), 3) for v in std],
                          "sampled_mse_to_real": round(float((sampled - latents).pow(2).mean()), 4)}), flush=True)


if __name__ == "__main__":
    main()
