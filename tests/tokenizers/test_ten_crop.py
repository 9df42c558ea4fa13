"""`encode.views=ten-crop`: LlamaGen's ten-crop code extraction, checked against torchvision's TenCrop, and
read by both training stages (one view drawn at random per sample)."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import TenCrop

from conftest import REPO
from d2ctool.continuous.train import ContinuousTask
from d2ctool.data.encoded import VIEWS, EncodedManifest, first_samples, read_manifest
from d2ctool.data.reader import decode_image, image_member
from d2ctool.data.shards import iter_tar
from d2ctool.data.transforms import adm_center_crop, ten_crop, to_minus_one_one
from d2ctool.discrete.train import DiscreteTask
from d2ctool.errors import UserError
from d2ctool.plan import plan_recipe
from d2ctool.recipe import load_recipe, recipe_yaml
from d2ctool.tokenizers.encode import encode
from d2ctool.tokenizers.load import load_tokenizer


def npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


@pytest.mark.parametrize("size, crop", [((281, 281), 256), ((300, 291), 256), ((35, 35), 32), ((40, 33), 32)])
def test_ten_crop_is_torchvisions(size, crop):
    image = Image.fromarray(np.random.default_rng(sum(size)).integers(0, 256, (*size[::-1], 3), dtype=np.uint8))
    ours = ten_crop(np.asarray(image), crop)
    theirs = [np.asarray(view) for view in TenCrop(crop)(image)]
    assert ours.shape == (10, crop, crop, 3)
    for a, b in zip(ours, theirs):
        np.testing.assert_array_equal(a, b)


def test_ten_crop_refuses_a_smaller_image():
    with pytest.raises(ValueError, match="smaller than the 32 px crop"):
        ten_crop(np.zeros((40, 31, 3), np.uint8), 32)


@pytest.fixture(scope="module")
def ten_crop_data(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("ten-crop") / "encoded"
    recipe = load_recipe(None, [f"tokenizers.vq.checkpoint={tiny_data / 'vq-tiny-s4.pt'}",
                                f"tokenizers.kl.checkpoint={tiny_data / 'kl-tiny-s4.pt'}", "encode.resolution=32",
                                "encode.views=ten-crop", "encode.batch_size=7", "encode.moments_dtype=float32"],
                         "encode")
    encode(tiny_data / "shards", out, recipe.tokenizers, recipe.encode, recipe_yaml(recipe))
    return out


def test_every_view_holds_the_codes_and_moments_of_its_crop(tiny_data, ten_crop_data):
    manifest = json.loads((ten_crop_data / "manifest.json").read_text())
    assert manifest["codes"]["order"] == list(VIEWS["ten-crop"]) and manifest["codes"]["shape"] == [10, 64]
    assert manifest["moments"]["shape"] == [10, 8, 8, 8]
    record = read_manifest(ten_crop_data)
    assert record.num_views == 10 and record.views[record.main_view] == "center"

    vq, _ = load_tokenizer("vq", "", str(tiny_data / "vq-tiny-s4.pt"))
    kl, _ = load_tokenizer("kl", "", str(tiny_data / "kl-tiny-s4.pt"))
    source = json.loads((tiny_data / "shards" / "manifest.json").read_text())
    originals = {key: m for shard in source["shards"] for key, m in iter_tar(tiny_data / "shards" / shard["file"])}
    key, members = next(iter_tar(ten_crop_data / manifest["shards"][0]["file"]))
    # independently: LlamaGen's transform is an ADM crop to int(32 * 1.1) = 35 px, then torchvision's TenCrop(32)
    larger = adm_center_crop(decode_image(image_member(originals[key])), 35)
    x = torch.stack([torch.from_numpy(to_minus_one_one(view)) for view in TenCrop(32)(larger)])
    with torch.no_grad():
        expect_codes, expect_moments = vq.encode(x).reshape(10, 64).numpy(), kl.encode_moments(x).numpy()
    codes, moments = npy(members["codes.npy"]), npy(members["moments.npy"])
    assert (codes == expect_codes).mean() > 0.95  # a different batch may round near-tied codes the other way
    np.testing.assert_allclose(moments, expect_moments, rtol=1e-4, atol=1e-4)
    # the corner views differ from each other: the crops really moved
    assert not np.array_equal(moments[0], moments[3])

    codes, labels, main = first_samples(ten_crop_data, 1)
    np.testing.assert_array_equal(codes[0], npy(members["codes.npy"])[4])  # the centre crop stands for the image
    np.testing.assert_array_equal(main[0], moments[4])


def test_both_stages_draw_one_of_the_ten_views(tiny_data, ten_crop_data):
    common = ["train.global_batch_size=8", "train.num_workers=0"]
    discrete = DiscreteTask(load_recipe(None, [f"discrete.data={ten_crop_data}", "discrete.model=gpt-tiny",
                                               *common], "discrete").discrete)
    continuous = ContinuousTask(load_recipe(None, [f"continuous.data={ten_crop_data}", "continuous.model=mar-tiny",
                                                   "continuous.fusion=add", *common], "continuous").continuous)
    members = next(iter(discrete.reader(0, 0, 1, 0, 0).raw()))[1]
    stored = npy(members["codes.npy"])
    seen = set()
    for seed in range(60):
        codes, _ = discrete.decode(members, np.random.default_rng(seed))
        view = int(np.random.default_rng(seed).integers(10))
        np.testing.assert_array_equal(codes.numpy(), stored[view])
        _, _, stage2_codes = continuous.decode(members, np.random.default_rng(seed))
        np.testing.assert_array_equal(stage2_codes.numpy(), stored[view])  # latents and codes of one view
        seen.add(view)
    assert seen == set(range(10))


def test_a_manifest_whose_views_do_not_match_its_shapes_is_refused(ten_crop_data):
    manifest = json.loads((ten_crop_data / "manifest.json").read_text())
    manifest["codes"]["order"] = ["original", "hflip"]
    with pytest.raises(UserError, match="2 view name"):
        EncodedManifest.from_dict(manifest, ten_crop_data)
    manifest["codes"]["shape"] = []
    with pytest.raises(UserError, match=r"2 view name\(s\) but codes of shape \[\]"):
        EncodedManifest.from_dict(manifest, ten_crop_data)
    manifest["codes"]["shape"] = [10, 64]
    manifest["codes"]["order"] = [f"view-{i}" for i in range(10)]
    with pytest.raises(UserError, match="name none of original, center"):
        EncodedManifest.from_dict(manifest, ten_crop_data)


def test_the_plan_counts_every_view():
    def encode_stage(*overrides):
        recipe = load_recipe(REPO / "recipes" / "imagenet256" / "llamagen-b.yaml", list(overrides))
        (stage,) = [s for s in plan_recipe(recipe, "llamagen-b").stages if s.name == "encode"]
        return stage

    flip, ten = encode_stage(), encode_stage("encode.views=ten-crop")
    assert ten.forward_flops == pytest.approx(5 * flip.forward_flops)
    assert any("10 views" in note for note in ten.notes)
