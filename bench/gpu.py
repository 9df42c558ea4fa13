"""The GPU path, measured in one command: training throughput and MFU, sampling, encoding, peak memory, and
numerical checks, with random-weight models.

    python bench/gpu.py --out bench/gpu.json          # on a GPU: official sizes, bf16, within --budget seconds
    python bench/gpu.py --size tiny                   # on the CPU: tiny presets, fp32 (what CI runs)

Official sizes (GPT-B on VQ-16 codes, MAR-B on KL-16 latents, 256 px, 1000 classes):
- training: images/s of a full step (forward, backward, AdamW) under bf16 autocast at the shipped recipes'
  per-GPU micro-batch (GPT-B 32, MAR-B 64), for GPT-B and for MAR-B with fusion none and each fusion, eager
  and `torch.compile`d; MFU = images/s x training FLOPs per image (counted by `d2c plan` on the meta
  device) / the GPU's dense bf16 peak (known GPUs only: A100, H100, H200);
- sampling at batch 256: continuous-only (MAR-B, num_iter 64, 100 diffusion steps, linear CFG 2.9) and
  two-stage (GPT-B codes with CFG 2.0, then MAR-B with fusion add at the same settings); latents, not pixels;
- encoding: VQ-16 + KL-16 encoders on 256 px images and their flips (`d2c encode`'s computation), batch 64;
- peak GPU memory of each;
- checks: bf16 autocast vs fp32 losses of the same weights and batch (relative difference below
  BF16_TOLERANCE), and PyTorch SDPA vs its math backend (relative difference of the outputs below
  SDPA_TOLERANCE in fp32).
Items run in order and an item that would not fit in what remains of `--budget` is reported as skipped.
The tiny size runs the same code on the CPU in seconds (fp32; no compile, no MFU: no known peak).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from d2ctool.continuous.config import FUSIONS, ContinuousSamplingConfig
from d2ctool.continuous.load import build_mar, preset_config as mar_config
from d2ctool.continuous.sample import sample_latents
from d2ctool.discrete.blocks import code_loss
from d2ctool.discrete.config import SamplingConfig, preset as gpt_preset
from d2ctool.discrete.generate import generate
from d2ctool.discrete.load import data_config
from d2ctool.discrete.model import GPT
from d2ctool.io import write_json
from d2ctool.plan import GPUS
from d2ctool.tokenizers.encode import encode_images
from d2ctool.tokenizers.load import build_tokenizer, preset_config as tokenizer_config

BF16_TOLERANCE = 2e-2  # relative difference of bf16-autocast and fp32 losses
SDPA_TOLERANCE = 1e-3  # relative difference of SDPA's fused kernel and its math path, fp32 outputs
SIZES = {
    "official": dict(gpt="gpt-b", mar="mar-b", vq="vq-16", kl="kl-16", resolution=256, classes=1000, gpt_batch=32,
                     mar_batch=64, sample_batch=256, num_iter=64, diffusion_steps=100, encode_batch=64, steps=10),
    "tiny": dict(gpt="gpt-tiny", mar="mar-tiny", vq="vq-tiny-s4", kl="kl-tiny-s4", resolution=32, classes=10,
                 gpt_batch=8, mar_batch=8, sample_batch=4, num_iter=4, diffusion_steps=4, encode_batch=4, steps=2),
}


def randomize(model: torch.nn.Module) -> torch.nn.Module:
    """Random weights everywhere: the models zero-initialise their output layers, which would make the
    checks compare zeros."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.02 if p.dim() > 1 else 0.1) + (1.0 if p.dim() == 1 else 0.0))
    return model


class Bench:
    def __init__(self, size: str, device: torch.device, budget: float, compile_: bool):
        self.s, self.device, self.budget, self.compile = SIZES[size], device, budget, compile_
        self.cuda = device.type == "cuda"
        self.start = time.perf_counter()
        self.results: list[dict] = []
        name = torch.cuda.get_device_name(device) if self.cuda else platform.processor() or platform.machine()
        self.device_name = name
        self.peak = next((g.bf16_flops for key, g in GPUS.items() if self.cuda and key in name.lower()), None)
        vq_cfg = tokenizer_config("vq", self.s["vq"])
        kl_cfg = tokenizer_config("kl", self.s["kl"])
        self.grid = self.s["resolution"] // vq_cfg.stride
        self.vocab, self.channels = vq_cfg.codebook_size, kl_cfg.embed_dim
        self.vq_cfg, self.kl_cfg = vq_cfg, kl_cfg

    # ----- helpers ---------------------------------------------------------------------------------------
    def autocast(self, enabled: bool = True):
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if enabled and self.cuda else nullcontext()

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def run(self, name: str, estimate: float, fn, **info) -> None:
        """Run one item unless `estimate` seconds exceed the remaining budget; record its result."""
        left = self.budget - (time.perf_counter() - self.start)
        record = {"item": name, **info}
        if estimate > left:
            record["skipped"] = f"time budget: about {estimate:.0f} s needed, {max(left, 0):.0f} s left"
        else:
            if self.cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(self.device)
            t0 = time.perf_counter()
            record.update(fn())
            record["seconds"] = round(time.perf_counter() - t0, 1)
            if self.cuda:
                record["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(self.device) / 2**30, 2)
        self.results.append(record)
        print(json.dumps(record), flush=True)

    def gpt_model(self) -> GPT:
        return GPT(data_config(gpt_preset(self.s["gpt"]), self.vocab, self.grid, self.s["classes"]))

    def mar_model(self, fusion: str):
        return build_mar(mar_config(self.s["mar"], {
            "fusion": fusion, "latent_channels": self.channels, "latent_size": self.grid, "code_vocab": self.vocab,
            "code_size": self.grid, "num_classes": self.s["classes"]}))

    def gpt(self) -> GPT:
        return self.gpt_model().to(self.device)

    def mar(self, fusion: str):
        return self.mar_model(fusion).to(self.device)

    def batch(self, n: int, generator: torch.Generator):
        d, g = self.device, self.grid
        return (torch.randn(n, self.channels, g, g, device=d, generator=generator),
                torch.randint(0, self.s["classes"], (n,), device=d, generator=generator),
                torch.randint(0, self.vocab, (n, g * g), device=d, generator=generator))

    def train_flops(self, kind: str, fusion: str = "none") -> float:
        """Training FLOPs per image of the model at this size, counted on the meta device (as `d2c plan`)."""
        with torch.device("meta"):
            model = (self.gpt_model() if kind == "gpt" else self.mar_model(fusion)).train()
        return model.step_cost(2).train_flops


    # ----- items ---------------------------------------------------------------------------------------
    def train(self, kind: str, fusion: str, compiled: bool) -> dict:
        torch.manual_seed(0)
        model = (self.gpt() if kind == "gpt" else self.mar(fusion)).train()
        step_model = torch.compile(model) if compiled else model
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=self.cuda)
        n = self.s["gpt_batch" if kind == "gpt" else "mar_batch"]
        latents, labels, codes = self.batch(n, torch.Generator(self.device).manual_seed(0))

        def step():
            with self.autocast():
                if kind == "gpt":
                    loss = code_loss(step_model(codes, labels), codes)
                else:
                    loss = step_model(latents, labels, codes if fusion != "none" else None)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        t0 = time.perf_counter()
        for _ in range(2):  # warm-up (and compilation)
            step()
        self.sync()
        warmup = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(self.s["steps"]):
            step()
        self.sync()
        rate = n * self.s["steps"] / (time.perf_counter() - t0)
        flops = self.train_flops(kind, fusion)
        out = {"batch": n, "images_per_s": round(rate, 1), "warmup_s": round(warmup, 1),
               "train_gflop_per_image": round(flops / 1e9, 2), "achieved_tflop_s": round(rate * flops / 1e12, 2)}
        out["mfu"] = round(rate * flops / self.peak, 4) if self.peak else None
        return out

    def sample(self, two_stage: bool) -> dict:
        torch.manual_seed(0)
        n = self.s["sample_batch"]
        mar = self.mar("add" if two_stage else "none").eval()
        g = torch.Generator(self.device).manual_seed(0)
        labels = torch.randint(0, self.s["classes"], (n,), device=self.device, generator=g)
        out = {"batch": n, "num_iter": self.s["num_iter"], "diffusion_steps": self.s["diffusion_steps"],
               "cfg": 2.9, "output": "latents"}
        self.sync()
        t0 = time.perf_counter()
        codes = None
        with self.autocast():
            if two_stage:
                gpt = self.gpt().eval()
                codes = generate(gpt, labels, SamplingConfig(cfg_scale=2.0, top_k=0), g)
                self.sync()
                out["stage1_s"] = round(time.perf_counter() - t0, 2)
            sample_latents(mar, labels, codes, ContinuousSamplingConfig(
                num_iter=self.s["num_iter"], num_sampling_steps=self.s["diffusion_steps"], cfg_scale=2.9), generator=g)
        self.sync()
        seconds = time.perf_counter() - t0
        return {**out, "images_per_s": round(n / seconds, 2), "s_per_image": round(seconds / n, 4)}

    def encode(self) -> dict:
        with torch.device(self.device):
            vq = build_tokenizer("vq", self.vq_cfg).eval()
            kl = build_tokenizer("kl", self.kl_cfg).eval()
        n, r = self.s["encode_batch"], self.s["resolution"]
        image = np.random.default_rng(0).integers(0, 256, (n, r, r, 3), dtype=np.uint8)  # as decoded from shards
        images = np.stack([image, image[:, :, ::-1]], axis=1)  # and its h-flip: encode's default views
        encode_images(vq, kl, images, self.device, self.cuda)  # warm-up
        self.sync()
        t0 = time.perf_counter()
        repeat = 3
        for _ in range(repeat):
            encode_images(vq, kl, images, self.device, self.cuda)
        self.sync()
        return {"batch": n, "resolution": r, "images_per_s": round(n * repeat / (time.perf_counter() - t0), 1),
                "note": "each image and its h-flip"}

    def check_bf16(self) -> dict:
        """Same weights, batch and random draws: the loss under bf16 autocast vs in fp32."""
        out = {}
        for kind in ("gpt", "mar"):
            torch.manual_seed(0)
            model = randomize(self.gpt() if kind == "gpt" else self.mar("add")).eval()  # eval: no dropout
            latents, labels, codes = self.batch(8, torch.Generator(self.device).manual_seed(0))
            losses = []
            for bf16 in (False, True):
                autocast = torch.autocast(self.device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
                with torch.no_grad(), autocast:
                    if kind == "gpt":
                        loss = code_loss(model(codes, labels).float(), codes)
                    else:  # the training loss, its random draws from one seed
                        loss = model(latents, labels, codes, generator=torch.Generator(self.device).manual_seed(1))
                losses.append(float(loss))
            rel = abs(losses[1] - losses[0]) / abs(losses[0])
            out[kind] = {"fp32": round(losses[0], 6), "bf16": round(losses[1], 6), "relative_difference": rel,
                         "ok": rel < BF16_TOLERANCE}
        return {"tolerance": BF16_TOLERANCE, **out, "ok": all(v["ok"] for v in out.values())}

    def check_sdpa(self) -> dict:
        """The fused SDPA kernel PyTorch picks vs its math backend, fp32, GPT logits and MAR decoder output."""
        torch.manual_seed(0)
        gpt = randomize(self.gpt()).eval()
        mar = randomize(self.mar("crossattn")).eval()
        latents, labels, codes = self.batch(4, torch.Generator(self.device).manual_seed(0))
        mask = torch.zeros(4, mar.cfg.seq_len, dtype=torch.bool, device=self.device)
        mask[:, ::2] = True

        def outputs():
            with torch.no_grad():
                ctx = mar.code_context(codes)
                z = mar.decode(mar.encode(mar.patchify(latents), mask, mar.class_embedding(labels, 4), ctx), mask, ctx)
                return gpt(codes, labels), z

        fused = outputs()
        with sdpa_kernel(SDPBackend.MATH):
            math_ = outputs()
        out = {}
        for name, a, b in zip(("gpt_logits", "mar_decoder"), fused, math_):
            rel = float((a - b).abs().max() / b.abs().max())
            out[name] = {"relative_max_difference": rel, "ok": rel < SDPA_TOLERANCE}
        return {"tolerance": SDPA_TOLERANCE, **out, "ok": all(v["ok"] for v in out.values())}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=list(SIZES), help="default: official on a GPU, tiny on the CPU")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--budget", type=float, default=480, help="seconds for the whole run (items that would "
                                                                  "not fit are skipped)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile measurements")
    parser.add_argument("--out", type=Path, help="write every result as JSON here")
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    size = args.size or ("official" if device.type == "cuda" else "tiny")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 in the checks
    b = Bench(size, device, args.budget, compile_=not args.no_compile and device.type == "cuda")
    big = size == "official"
    # correctness first (cheap), then the items in order of importance; estimates are rough seconds on an H100
    b.run("check bf16 vs fp32 loss", 20 if big else 0, b.check_bf16)
    b.run("check SDPA vs math attention", 20 if big else 0, b.check_sdpa)
    b.run("train gpt", 20 if big else 0, lambda: b.train("gpt", "none", False), model=b.s["gpt"], compile=False)
    for fusion in FUSIONS:
        b.run("train mar", 25 if big else 0, lambda: b.train("mar", fusion, False), model=b.s["mar"], fusion=fusion,
              compile=False)
    b.run("sample continuous-only", 90 if big else 0, lambda: b.sample(False), model=b.s["mar"])
    b.run("sample two-stage", 100 if big else 0, lambda: b.sample(True), model=f"{b.s['gpt']} + {b.s['mar']} (add)")
    b.run("encode", 15 if big else 0, b.encode, model=f"{b.s['vq']} + {b.s['kl']}")
    if b.compile:
        b.run("train gpt", 60, lambda: b.train("gpt", "none", True), model=b.s["gpt"], compile=True)
        for fusion in FUSIONS:
            b.run("train mar", 70, lambda: b.train("mar", fusion, True), model=b.s["mar"], fusion=fusion, compile=True)
    summary = {"device": b.device_name, "size": size, "torch": torch.__version__,
               "precision": "bf16 autocast" if b.cuda else "fp32", "peak_bf16_flops": b.peak,
               "seconds": round(time.perf_counter() - b.start, 1), "results": b.results}
    if args.out:
        write_json(args.out, summary)
    return summary


if __name__ == "__main__":
    main()
