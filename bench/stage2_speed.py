"""Stage-2 sampling speed at MAR-B size (random weights): images/s per head sampler and num_iter with the
time split (backbone, head), stage 1 (LlamaGen GPT-B codes) and decoding (KL-16) per image, and, in the same
run on the same weights, the official MAR sampler (LTH14/mar `sample_tokens`) at its defaults.

    python bench/stage2_speed.py --official /tmp/mar --batch 1 --out bench/out/stage2_speed.json
    python bench/stage2_speed.py --official /tmp/mar --settings 1:dpm-solver++:10 4:dpm-solver++:10 4:ddpm:25

`--official` is a checkout of github.com/LTH14/mar (its models/ import timm: put it on PYTHONPATH). Its code
is imported from there and run as is (on the CPU its `.cuda()` calls are made no-ops); nothing is copied.
The official model gets our fusion-none model's state dict (the same keys), so both sample the same network.
Every DDPM setting runs ours, then the official sampler (its head respaced to the same steps) on the same
weights, back to back, so that a noisy machine affects both alike.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from d2ctool.continuous.config import ContinuousSamplingConfig
from d2ctool.continuous.load import build_mar, preset_config
from d2ctool.continuous.sample import sample_latents
from d2ctool.discrete.config import SamplingConfig, preset as gpt_preset
from d2ctool.discrete.generate import generate
from d2ctool.discrete.load import data_config
from d2ctool.discrete.model import GPT
from d2ctool.tokenizers.load import build_tokenizer, preset_config as tokenizer_config

# num_iter:head sampler:its steps, cheapest first; the last is MAR's default
SETTINGS = ["1:dpm-solver++:10", "4:dpm-solver++:10", "4:ddpm:25", "16:ddpm:25", "64:ddpm:100"]
CFG = 2.9  # MAR-B's FID setting (linear schedule)


def ours(model, labels, num_iter, sampler, steps) -> dict:
    """Seconds of one batch, and of it the diffusion head's."""
    head_seconds, real = [0.0], model.diffloss.sample

    def timed(*args, **kw):
        t = time.perf_counter()
        out = real(*args, **kw)
        head_seconds[0] += time.perf_counter() - t
        return out

    model.diffloss.sample = timed
    try:
        t = time.perf_counter()
        sample_latents(model, labels, None, ContinuousSamplingConfig(num_iter=num_iter, sampler=sampler,
                                                                     num_sampling_steps=steps, cfg_scale=CFG),
                       generator=torch.Generator().manual_seed(0))
        total = time.perf_counter() - t
    finally:
        del model.diffloss.sample
    return {"seconds": total, "head_seconds": head_seconds[0], "backbone_seconds": total - head_seconds[0]}


def official_model(checkout: Path, state_dict: dict, steps: int):
    if str(checkout) not in sys.path:
        sys.path.insert(0, str(checkout))
    from models import mar as official  # noqa: E402 - from the checkout given

    torch.Tensor.cuda = lambda self, *a, **k: self  # its sampler calls .cuda(); this bench runs where it is
    model = official.mar_base(img_size=256, vae_stride=16, patch_size=1, vae_embed_dim=16, mask_ratio_min=0.7,
                              label_drop_prob=0.1, class_num=1000, attn_dropout=0.1, proj_dropout=0.1,
                              buffer_size=64, diffloss_d=6, diffloss_w=1024, num_sampling_steps=str(steps),
                              diffusion_batch_mul=4)
    model.load_state_dict(state_dict)
    return model.eval()


def official(model, labels, num_iter) -> dict:
    torch.manual_seed(0)
    t = time.perf_counter()
    with torch.no_grad():
        model.sample_tokens(labels.shape[0], num_iter=num_iter, cfg=CFG, cfg_schedule="linear", labels=labels,
                            temperature=1.0)
    return {"seconds": time.perf_counter() - t}


def parts(labels, record) -> None:
    """The parts outside stage 2, per batch: stage-1 codes (GPT-B, 16x16 of 16384, CFG 2.0) and KL-16 decoding."""
    gpt = GPT(data_config(gpt_preset("gpt-b"), 16384, 16, 1000)).eval()
    generate(gpt, labels, SamplingConfig(cfg_scale=2.0, top_k=0), torch.Generator().manual_seed(0))  # warm-up
    t = time.perf_counter()
    generate(gpt, labels, SamplingConfig(cfg_scale=2.0, top_k=0), torch.Generator().manual_seed(0))
    record({"part": "stage 1 (GPT-B, 256 codes, CFG)", "seconds": time.perf_counter() - t})
    kl = build_tokenizer("kl", tokenizer_config("kl", "kl-16")).eval()
    with torch.no_grad():
        latents = torch.randn(labels.shape[0], 16, 16, 16)
        kl.decode_latents(latents)  # warm-up
        t = time.perf_counter()
        kl.decode_latents(latents)
    record({"part": "decode (KL-16, 256 px)", "seconds": time.perf_counter() - t})
    del gpt, kl


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--official", type=Path, help="a checkout of LTH14/mar (omit: ours only)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--settings", nargs="+", default=SETTINGS, help="NUM_ITER:SAMPLER:STEPS ...")
    parser.add_argument("--no-parts", action="store_true", help="skip the stage-1 and decode timings")
    parser.add_argument("--out", type=Path, default=Path("bench/out/stage2_speed.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_mar(preset_config("mar-b")).eval()  # MAR-B, fusion none: the official state dict
    labels = torch.arange(args.batch) % 1000
    machine = {"device": "cpu", "processor": platform.processor() or platform.machine(), "threads": args.threads,
               "torch": torch.__version__, "batch": args.batch, "gpu_lent": torch.cuda.is_available()}
    print(json.dumps(machine), flush=True)
    rows = []

    def record(row):
        row["images_per_second"] = args.batch / row["seconds"]
        rows.append(row)
        print(json.dumps(row), flush=True)

    if not args.no_parts:
        parts(labels, record)

    ours(model, labels, 1, "dpm-solver++", 2)  # warm-up
    for setting in args.settings:
        num_iter, sampler, steps = setting.split(":")
        num_iter, steps = int(num_iter), int(steps)
        record({"part": "stage 2", "sampler": "d2c", "num_iter": num_iter, "head": f"{sampler} {steps}",
                **ours(model, labels, num_iter, sampler, steps)})
        if args.official and sampler == "ddpm":  # the official head samples with DDPM only
            mar = official_model(args.official, model.state_dict(), steps)
            record({"part": "stage 2", "sampler": "official MAR", "num_iter": num_iter, "head": f"ddpm {steps}",
                    **official(mar, labels, num_iter)})
            del mar
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": machine, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
