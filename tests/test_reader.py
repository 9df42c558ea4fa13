"""Reading shards back: (RGB image, label), equal sample counts on every DDP rank."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from d2ctool.data.prepare import prepare
from d2ctool.data.reader import ShardReader, decode_image, image_member, split_stream
from d2ctool.data.torch_dataset import ShardDataset
from d2ctool.recipe import load_recipe, recipe_yaml


@pytest.fixture(scope="module")
def uneven_shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    recipe = load_recipe(None, ["synthetic.images_per_class=7", "synthetic.resolution=16", "shard_size=9",
                                "workers=1"], "prepare")
    prepare("synthetic", out, recipe.prepare, recipe_yaml(recipe))
    return out


def test_split_stream_is_a_partition_with_equal_counts():
    counts = [9, 3, 11, 0, 7, 1]
    total = sum(counts)
    for world in range(1, 8):
        taken = []
        for rank in range(world):
            pieces = split_stream(counts, [4, 0, 2, 5, 1, 3], rank, world)
            assert sum(stop - start for _, start, stop in pieces) == total // world
            taken += [(shard, i) for shard, start, stop in pieces for i in range(start, stop)]
        assert len(taken) == len(set(taken)) == world * (total // world)
        assert all(0 <= i < counts[shard] for shard, i in taken)


def test_every_rank_gets_the_same_number_of_distinct_samples(uneven_shards):
    manifest = json.loads((uneven_shards / "manifest.json").read_text())
    assert len({s["samples"] for s in manifest["shards"]}) > 1  # really uneven
    total = manifest["num_samples"]
    for world in (1, 2, 3, 4):
        for epoch in (0, 1):
            keys = []
            for rank in range(world):
                reader = ShardReader(uneven_shards, rank, world, shuffle=True, seed=5, epoch=epoch, shuffle_buffer=4)
                rank_keys = [s.key for s in reader]
                assert len(rank_keys) == len(reader) == total // world
                keys += rank_keys
            assert len(keys) == len(set(keys))


def test_samples_are_rgb_images_with_their_labels(uneven_shards):
    reader = ShardReader(uneven_shards)
    for sample in reader:
        assert sample.image.mode == "RGB" and sample.image.size == (16, 16)
        meta = json.loads(sample.members["json"])
        assert reader.classes[sample.label] == meta["class"]


def test_rank_and_world_come_from_torchrun_environment(uneven_shards, monkeypatch):
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "3")
    reader = ShardReader(uneven_shards)
    assert (reader.rank, reader.world) == (2, 3)
    explicit = ShardReader(uneven_shards, 2, 3)
    assert [s.key for s in reader] == [s.key for s in explicit]


def test_shuffle_changes_order_per_epoch_but_not_per_run(uneven_shards):
    def keys(epoch):
        return [s.key for s in ShardReader(uneven_shards, 0, 1, shuffle=True, seed=1, epoch=epoch, shuffle_buffer=8)]

    assert keys(0) == keys(0)
    assert keys(0) != keys(1)
    assert sorted(keys(0)) == sorted(keys(1))


def test_skip_resumes_the_same_stream(uneven_shards):
    full = [s.key for s in ShardReader(uneven_shards, 1, 2, shuffle=True, seed=3, shuffle_buffer=5)]
    rest = [s.key for s in ShardReader(uneven_shards, 1, 2, shuffle=True, seed=3, shuffle_buffer=5, skip=13)]
    assert rest == full[13:]


@pytest.mark.parametrize("workers", [0, 2, 3])
def test_dataloader_batches_are_the_same_for_any_worker_count(uneven_shards, workers):
    def decode(members, rng):  # a random choice per sample, as training augmentations make
        image = np.asarray(decode_image(image_member(members)))
        flip = rng.random() < 0.5
        return torch.from_numpy((image[:, ::-1] if flip else image).copy()), int(members["cls"])

    def batches(num_workers, skip=0):
        reader = ShardReader(uneven_shards, 1, 3, shuffle=True, seed=2, shuffle_buffer=4)
        dataset = ShardDataset(reader, decode, batch_size=4, seed=9, skip_batches=skip)
        loader = DataLoader(dataset, batch_size=None, num_workers=num_workers)
        return [(x, y) for x, y in loader]

    reference = batches(0)
    reader = ShardReader(uneven_shards, 1, 3)
    assert len(reference) == len(reader) // 4 and reference[0][0].shape == (4, 16, 16, 3)
    got = batches(workers)
    assert len(got) == len(reference)
    for (x, y), (rx, ry) in zip(got, reference):
        assert torch.equal(x, rx) and torch.equal(y, ry)
    resumed = batches(workers, skip=2)
    assert all(torch.equal(x, rx) for (x, _), (rx, _) in zip(resumed, reference[2:]))
    assert len(resumed) == len(reference) - 2
