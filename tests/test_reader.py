"""Reading shards back: (RGB image, label), equal sample counts on every DDP rank."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.data import DataLoader

from d2ctool.data.prepare import prepare
from d2ctool.data.reader import ShardReader, split_stream
from d2ctool.data.torch_dataset import ImageShardDataset
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


def test_dataloader_workers_split_a_rank_without_overlap(uneven_shards):
    to_tensor = lambda im: torch.tensor(list(im.getdata()), dtype=torch.uint8).view(16, 16, 3)
    reader = ShardReader(uneven_shards, 1, 3)
    expected = sorted(int(s.label) for s in reader)
    dataset = ImageShardDataset(ShardReader(uneven_shards, 1, 3), transform=to_tensor)
    loader = DataLoader(dataset, batch_size=4, num_workers=2)
    images, labels = [], []
    for x, y in loader:
        images.append(x)
        labels += y.tolist()
    assert sorted(labels) == expected and len(labels) == len(dataset)
    assert torch.cat(images).shape == (len(labels), 16, 16, 3)
