"""Is the tiny experiment bit-deterministic on this CPU and torch? One thread, fixed seeds: `train-discrete`
and `train-continuous` (fusion add) at reduced length and a two-stage `d2c sample`, each run twice into new
folders, then compared (weights tensor by tensor, samples.npz byte by byte).

    OMP_NUM_THREADS=1 python bench/determinism.py --work /tmp/d2c-determinism
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
from pathlib import Path

import torch

from d2ctool.config import to_dict
from d2ctool.continuous.train import train_continuous
from d2ctool.data.prepare import prepare
from d2ctool.discrete.train import train_discrete
from d2ctool.recipe import load_recipe, recipe_yaml
from d2ctool.sampling.run import sample
from d2ctool.tokenizers.encode import encode
from d2ctool.tokenizers.load import build_tokenizer, preset_config, save_tokenizer

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "tiny.yaml"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True, help="scratch folder (replaced)")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--images", type=int, default=50)
    args = parser.parse_args()
    torch.set_num_threads(1)
    root = args.work
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    r = load_recipe(RECIPE, ["prepare.synthetic.images_per_class=10", "prepare.workers=1"], "prepare")
    prepare("synthetic", root / "shards", r.prepare, recipe_yaml(r))
    torch.manual_seed(0)
    for kind in ("vq", "kl"):  # random tokenizers: the stages below are what is checked
        name = f"{kind}-tiny-s4"
        save_tokenizer(root / f"{kind}.pt", build_tokenizer(kind, preset_config(kind, name)), kind, name)
    tok = [f"tokenizers.vq.checkpoint={root / 'vq.pt'}", f"tokenizers.kl.checkpoint={root / 'kl.pt'}"]
    r = load_recipe(RECIPE, tok, "encode")
    encode(root / "shards", root / "encoded", r.tokenizers, r.encode, recipe_yaml(r))
    for x in "ab":
        r = load_recipe(RECIPE, [f"discrete.data={root / 'encoded'}", f"discrete.out={root / ('gpt-' + x)}",
                                 f"discrete.train.steps={args.steps}", "discrete.train.sample_every=0"], "discrete")
        train_discrete(r.discrete, to_dict(r.discrete), recipe_yaml(r))
        r = load_recipe(RECIPE, [f"continuous.data={root / 'encoded'}", f"continuous.out={root / ('add-' + x)}",
                                 f"continuous.train.steps={args.steps}", "continuous.train.sample_every=0"], "continuous")
        train_continuous(r.continuous, to_dict(r.continuous), recipe_yaml(r))
        r = load_recipe(RECIPE, tok + [f"sample.discrete={root / 'gpt-a'}", f"sample.continuous={root / 'add-a'}",
                                       f"sample.num_images={args.images}"], "sample")
        sample(r.sample, r.tokenizers, root / ("sample-" + x), recipe_yaml(r))
    report = {"torch": torch.__version__, "threads": torch.get_num_threads()}
    for run in ("gpt", "add"):
        a, b = (torch.load(root / f"{run}-{x}" / "checkpoints" / "last.pt", weights_only=False) for x in "ab")
        report[f"train {run} {args.steps} steps"] = {part: all(torch.equal(a[part][k], b[part][k]) for k in a[part])
                                                     for part in ("model", "ema")}
    digests = [hashlib.sha256((root / f"sample-{x}" / "samples.npz").read_bytes()).hexdigest() for x in "ab"]
    report[f"two-stage sample of {args.images} images"] = {"identical": digests[0] == digests[1],
                                                           "sha256": digests}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
