"""Benchmark stage 1: training tokens/s and KV-cache generation images/s.

    python bench/discrete.py                       # gpt-tiny, 8x8 tokens, on the CPU
    python bench/discrete.py --model gpt-b --grid 16 --vocab 16384 --classes 1000   # on a GPU (bf16)

Random weights; a training step is forward + backward + AdamW on random codes.
"""

from __future__ import annotations

import argparse
import json
import time
from contextlib import nullcontext

import torch

from d2ctool.discrete.config import SamplingConfig, preset
from d2ctool.discrete.generate import generate
from d2ctool.discrete.load import build_model, data_config
from d2ctool.discrete.blocks import code_loss


def timed(fn, device, repeat: int) -> float:
    fn()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeat


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gpt-tiny")
    parser.add_argument("--grid", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--train-batch", type=int, default=64)
    parser.add_argument("--gen-batch", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    torch.manual_seed(0)
    model = build_model(data_config(preset(args.model), args.vocab, args.grid, args.classes)).to(device)
    n = args.grid**2
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    codes = torch.randint(0, args.vocab, (args.train_batch, n), device=device)
    labels = torch.randint(0, args.classes, (args.train_batch,), device=device)

    def train_step():
        with autocast:
            loss = code_loss(model(codes, labels), codes)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step = timed(train_step, device, args.repeat)
    common = {"model": args.model, "tokens": n, "device": str(device), "threads": torch.get_num_threads(),
              "precision": "bf16" if device.type == "cuda" else "fp32"}
    print(json.dumps({**common, "train_batch": args.train_batch,
                      "train_tokens_per_s": round(args.train_batch * n / step, 1)}), flush=True)
    model.eval()
    sampling = SamplingConfig(cfg_scale=2.0, top_k=0)
    for batch in args.gen_batch:
        y = torch.randint(0, args.classes, (batch,), device=device)
        with autocast:
            seconds = timed(lambda: generate(model, y, sampling, torch.Generator(device).manual_seed(0)), device, 1)
        print(json.dumps({**common, "gen_batch": batch, "cfg": True, "images_per_s": round(batch / seconds, 2)}),
              flush=True)


if __name__ == "__main__":
    main()
