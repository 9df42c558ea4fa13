"""Benchmark stage 2 per fusion: training images/s and sampling images/s.

    python bench/continuous.py                                    # mar-tiny, every fusion, on the CPU
    python bench/continuous.py --model mar-b --latent-size 16 --channels 16 --vocab 16384 \\
        --batch 256 --num-iter 64 --steps 100 --fusions none add   # on a GPU (bf16)

Random weights; a training step is forward + backward + AdamW on random latents and codes.
"""

from __future__ import annotations

import argparse
import json
import time
from contextlib import nullcontext

import torch

from d2ctool.continuous.config import FUSIONS, ContinuousSamplingConfig
from d2ctool.continuous.load import build_mar, preset_config
from d2ctool.continuous.sample import sample_latents


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mar-tiny")
    parser.add_argument("--latent-size", type=int, default=8)
    parser.add_argument("--channels", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--sample-batch", type=int, default=32)
    parser.add_argument("--num-iter", type=int, default=8)
    parser.add_argument("--steps", type=int, default=25, help="diffusion sampling steps")
    parser.add_argument("--fusions", nargs="+", default=list(FUSIONS))
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    for fusion in args.fusions:
        torch.manual_seed(0)
        cfg = preset_config(args.model, {"fusion": fusion, "latent_size": args.latent_size, "code_size": args.latent_size,
                                         "latent_channels": args.channels, "code_vocab": args.vocab,
                                         "num_classes": args.classes})
        model = build_mar(cfg).to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        b, n = args.batch, args.latent_size**2
        latents = torch.randn(b, args.channels, args.latent_size, args.latent_size, device=device)
        labels = torch.randint(0, args.classes, (b,), device=device)
        codes = torch.randint(0, args.vocab, (b, n), device=device) if fusion != "none" else None

        def step():
            with autocast:
                loss = model(latents, labels, codes)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        step()
        start = time.perf_counter()
        for _ in range(args.repeat):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        train_rate = b * args.repeat / (time.perf_counter() - start)
        sb = args.sample_batch
        y = torch.randint(0, args.classes, (sb,), device=device)
        c = torch.randint(0, args.vocab, (sb, n), device=device) if fusion != "none" else None
        start = time.perf_counter()
        with autocast:
            sample_latents(model, y, c, ContinuousSamplingConfig(num_iter=args.num_iter, num_sampling_steps=args.steps,
                                                                 cfg_scale=2.0), generator=torch.Generator(device).manual_seed(0))
        if device.type == "cuda":
            torch.cuda.synchronize()
        sample_rate = sb / (time.perf_counter() - start)
        print(json.dumps({"model": args.model, "fusion": fusion, "tokens": n, "device": str(device),
                          "threads": torch.get_num_threads(), "train_batch": b,
                          "train_images_per_s": round(train_rate, 1), "sample_batch": sb, "num_iter": args.num_iter,
                          "diffusion_steps": args.steps, "cfg": 2.0, "sample_images_per_s": round(sample_rate, 2)}),
              flush=True)


if __name__ == "__main__":
    main()
