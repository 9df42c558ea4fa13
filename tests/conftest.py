"""Shared fixtures and helpers: small image trees with every kind of bad file (fresh for each test), tiny data
and tiny trained models (once per session), official state-dict manifests, and running the CLI."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SPECS = REPO / "tests" / "specs"  # official state-dict manifests: parameter name, shape, dtype


def image_bytes(size=(40, 32), mode="RGB", fmt="JPEG", seed=0) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    img = Image.fromarray(pixels).convert(mode) if mode != "RGB" else Image.fromarray(pixels)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def run_d2c(*args, cwd=None, check=False, env=None) -> subprocess.CompletedProcess:
    """Run the CLI as a user would: `python -m d2ctool ...`."""
    proc = subprocess.run([sys.executable, "-m", "d2ctool", *map(str, args)], cwd=cwd or REPO,
                          capture_output=True, text=True, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"d2c {' '.join(map(str, args))} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module's many small tensor ops (an oversubscribed pool is much slower)."""
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture
def messy_tree(tmp_path) -> tuple[Path, dict]:
    """A class-per-folder tree with good images of every mode and each kind of bad file.

    Returns (root, expectations) where expectations lists the accepted and rejected relative paths.
    """
    root = tmp_path / "src"
    good, bad = {}, {}

    def put(rel, data, ok):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        (good if ok else bad)[rel] = data

    for c, cls in enumerate(["cat", "dog", "eel"]):
        for i in range(6):
            put(f"{cls}/{cls}_{i}.JPEG", image_bytes(seed=10 * c + i), True)
    put("cat/gray.jpg", image_bytes(mode="L", seed=1), True)
    put("cat/cmyk.jpg", image_bytes(mode="CMYK", seed=2), True)
    put("dog/palette.png", image_bytes(mode="P", fmt="PNG", seed=3), True)
    put("dog/alpha.png", image_bytes(mode="RGBA", fmt="PNG", seed=4), True)
    put("dog/png_named.JPEG", image_bytes(fmt="PNG", seed=5), True)  # ImageNet has one of these
    put("eel/nested/deep.jpg", image_bytes(seed=6), True)
    jpeg = image_bytes(size=(64, 64), seed=7)
    put("cat/truncated.JPEG", jpeg[: len(jpeg) // 2], False)
    put("cat/corrupt.JPEG", jpeg[:20] + b"\x00" * 200, False)
    put("dog/empty.JPEG", b"", False)
    put("dog/notes.txt", b"just some text, not an image\n", False)
    put("eel/fake.JPEG", b"<html><body>404 not found</body></html>", False)
    put("eel/anim.gif", image_bytes(fmt="GIF", seed=8), False)
    put("stray.jpg", image_bytes(seed=9), False)  # outside any class folder
    # ignored: hidden files and folders
    (root / "cat" / ".DS_Store").write_bytes(b"\x00\x01junk")
    (root / ".cache").mkdir()
    (root / ".cache" / "x.jpg").write_bytes(image_bytes(seed=11))
    # links: a file link and a folder link are followed; a dangling link is rejected; a loop is cut
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "linked.jpg").write_bytes(image_bytes(seed=12))
    os.symlink(outside / "linked.jpg", root / "eel" / "link.jpg")
    good["eel/link.jpg"] = (outside / "linked.jpg").read_bytes()
    os.symlink(outside, root / "dog" / "more")
    good["dog/more/linked.jpg"] = (outside / "linked.jpg").read_bytes()
    os.symlink(tmp_path / "missing.jpg", root / "eel" / "dangling.jpg")
    bad["eel/dangling.jpg"] = None
    os.symlink(root / "cat", root / "cat" / "loop")
    return root, {"good": good, "bad": bad, "classes": ["cat", "dog", "eel"]}


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """Synthetic image shards (40 images, 40 px, 3 shards), random tiny tokenizers of stride 4 and 8,
    and the images encoded at 32 px with the stride-4 pair (8x8 codes, 512-code vocabulary)."""
    import torch

    from d2ctool.data.prepare import prepare
    from d2ctool.recipe import load_recipe, recipe_yaml
    from d2ctool.tokenizers.encode import encode
    from d2ctool.tokenizers.load import build_tokenizer, preset_config, save_tokenizer

    root = tmp_path_factory.mktemp("tiny")
    recipe = load_recipe(None, ["synthetic.images_per_class=4", "synthetic.resolution=40", "shard_size=16",
                                "workers=1"], "prepare")
    prepare("synthetic", root / "shards", recipe.prepare, recipe_yaml(recipe))
    torch.manual_seed(0)
    for kind in ("vq", "kl"):
        for stride in (4, 8):
            name = f"{kind}-tiny-s{stride}"
            save_tokenizer(root / f"{name}.pt", build_tokenizer(kind, preset_config(kind, name)), kind, name)
    recipe = load_recipe(None, [f"tokenizers.vq.checkpoint={root / 'vq-tiny-s4.pt'}",
                                f"tokenizers.kl.checkpoint={root / 'kl-tiny-s4.pt'}", "encode.resolution=32"], "encode")
    encode(root / "shards", root / "encoded", recipe.tokenizers, recipe.encode, recipe_yaml(recipe))
    return root


def read_manifest(name: str) -> dict[str, list[int]]:
    """An official state-dict manifest in tests/specs: parameter name -> shape."""
    entries = {}
    for line in (SPECS / name).read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        key, shape, _dtype = line.split("\t")
        entries[key] = json.loads(shape)
    return entries


def perturbed(model):
    """Every weight given a value (output layers and adaLN modulations start at zero), in eval mode."""
    import torch

    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


@pytest.fixture(scope="session")
def tiny_models(tiny_data):
    """A stage-1 run, a fused (add) stage-2 run and a plain (none) stage-2 run, two steps each."""
    from d2ctool.config import to_dict
    from d2ctool.continuous.train import train_continuous
    from d2ctool.discrete.train import train_discrete
    from d2ctool.recipe import load_recipe, recipe_yaml

    common = ["train.global_batch_size=8", "train.steps=2", "train.num_workers=0", "train.sample_every=0"]
    recipe = load_recipe(None, [f"discrete.data={tiny_data / 'encoded'}", f"discrete.out={tiny_data / 'gpt'}",
                                "discrete.model=gpt-tiny", "discrete.sampling.top_k=0", "discrete.grid_classes=1",
                                *[f"discrete.{c}" for c in common]])
    train_discrete(recipe.discrete, to_dict(recipe.discrete), recipe_yaml(recipe))
    for fusion in ("add", "none"):
        recipe = load_recipe(None, [f"continuous.data={tiny_data / 'encoded'}", f"continuous.out={tiny_data / fusion}",
                                    "continuous.model=mar-tiny", f"continuous.fusion={fusion}",
                                    "continuous.sampling.num_iter=2", "continuous.sampling.num_sampling_steps=4",
                                    "continuous.grid_samples=1", *[f"continuous.{c}" for c in common]])
        train_continuous(recipe.continuous, to_dict(recipe.continuous), recipe_yaml(recipe))
    return tiny_data


def sample_overrides(root, mode="two-stage", *extra):
    """Recipe overrides that sample from the `tiny_models` runs in `mode`."""
    return [f"tokenizers.vq.checkpoint={root / 'vq-tiny-s4.pt'}", f"tokenizers.kl.checkpoint={root / 'kl-tiny-s4.pt'}",
            f"sample.mode={mode}", f"sample.discrete={root / 'gpt'}",
            f"sample.continuous={root / ('none' if mode == 'continuous-only' else 'add')}",
            f"sample.oracle_data={root / 'encoded'}", "sample.num_images=20", "sample.batch_size=8",
            "sample.stage1.top_k=0", "sample.stage2.num_iter=3", "sample.stage2.num_sampling_steps=4",
            "sample.grid_classes=3", "sample.grid_per_class=2", *extra]


# ----- kill and resume: one harness on the `D2C_KILL_AT_WRITE` hook of d2ctool.io.write_event -----------------

def _events(log: Path) -> list[tuple[str, str]]:
    lines = log.read_text().splitlines() if log.is_file() else []
    return [(phase, Path(path).name) for _, phase, path in (line.split(" ", 2) for line in lines)]


def write_events(run, log: Path):
    """Call `run()` in this process with D2C_WRITE_LOG=log; (its result, its write events in order as
    (phase, file name): a temporary complete ("written"), renamed into place, or a metrics line appended)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("D2C_WRITE_LOG", str(log))
        result = run()
    return result, _events(log)


def kill_at_write(k: int, *args, log: Path) -> list[tuple[str, str]]:
    """Run `d2c ARGS` in a subprocess that SIGKILLs itself at its k-th write event (D2C_KILL_AT_WRITE=k), check
    that it died there, and return its write events (the last one is the instant of the kill)."""
    import signal

    # the thread count is inherited, not forced: the killed run must compute exactly as the uninterrupted and the
    # resumed runs of this process do (CPU kernels may sum in another order at another thread count)
    proc = run_d2c(*args, env={**os.environ, "D2C_KILL_AT_WRITE": str(k), "D2C_WRITE_LOG": str(log)})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    events = _events(log)
    assert len(events) == k
    return events


def kill_at_metrics_line(n: int, events, args, log: Path) -> None:
    """Kill the training command `d2c ARGS` as it appends its n-th metrics line. `events`: the write events of
    the same run uninterrupted (`write_events`)."""
    line = [i for i, event in enumerate(events, 1) if event == ("appended", "metrics.jsonl")][n - 1]
    assert kill_at_write(line, *args, log=log)[-1] == ("appended", "metrics.jsonl")
