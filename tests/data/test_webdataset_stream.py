"""The documented way to stream our shards into a user's own pipeline: webdataset over `shard_paths`."""

from __future__ import annotations

import numpy as np
import webdataset as wds

from d2ctool.data.reader import ShardReader
from d2ctool.data.shards import read_npy, shard_paths


def test_image_shards_stream_through_webdataset_as_our_reader_reads_them(tiny_data):
    root = tiny_data / "shards"
    ours = {key: (np.asarray(sample_image), label) for key, sample_image, label in
            ((s.key, s.image, s.label) for s in ShardReader(root))}
    dataset = wds.WebDataset(shard_paths(root), shardshuffle=False).decode("pil").to_tuple("__key__", "jpg;png", "cls")
    theirs = {key: (np.asarray(image.convert("RGB")), label) for key, image, label in dataset}
    assert theirs.keys() == ours.keys() and len(theirs) == 40
    for key, (image, label) in ours.items():
        assert label == theirs[key][1] and np.array_equal(image, theirs[key][0])


def test_encoded_shards_stream_codes_and_moments(tiny_data):
    root = tiny_data / "encoded"
    dataset = wds.WebDataset(shard_paths(root, "d2c-encoded-shards"), shardshuffle=False).decode() \
        .to_tuple("codes.npy", "moments.npy", "cls")
    codes, moments, label = next(iter(dataset))
    first = next(ShardReader(root, manifest_kind="d2c-encoded-shards").raw())[1]
    assert np.array_equal(codes, read_npy(first["codes.npy"])) and np.array_equal(moments, read_npy(first["moments.npy"]))
    assert codes.shape == (2, 64) and label == int(first["cls"])
