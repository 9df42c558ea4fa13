"""The built-in synthetic source: deterministic, class-structured, with continuous detail."""

from __future__ import annotations

import numpy as np
import pytest

from d2ctool.data import synthetic


def test_deterministic_given_seed_and_index():
    a, la = synthetic.render(17, 10, 32, seed=0)
    b, lb = synthetic.render(17, 10, 32, seed=0)
    c, _ = synthetic.render(17, 10, 32, seed=1)
    assert la == lb == 7 and np.array_equal(a, b) and not np.array_equal(a, c)
    assert synthetic.render_png(3, 10, 24, 0) == synthetic.render_png(3, 10, 24, 0)


@pytest.mark.parametrize("resolution", [8, 33, 128])
def test_any_resolution(resolution):
    pixels, _ = synthetic.render(0, 10, resolution, 0)
    assert pixels.shape == (resolution, resolution, 3) and pixels.dtype == np.uint8


def test_class_names_sort_in_index_order():
    names = synthetic.class_names(synthetic.MAX_CLASSES)
    assert names == sorted(names) and len(set(names)) == synthetic.MAX_CLASSES
    with pytest.raises(ValueError):
        synthetic.class_names(synthetic.MAX_CLASSES + 1)


def test_class_decides_structure_and_images_vary_within_a_class():
    """The object mask alone identifies the class (leave-one-out nearest class mean, chance is 10%),
    yet two images of a class differ: structure comes from the class, detail from the image."""
    res, n = 48, 12

    def blurred(img):  # 8x8 box average: the coarse layout
        return img.reshape(res // 8, 8, res // 8, 8, 3).mean(axis=(1, 3))

    def object_mask(img):  # objects are saturated colours, the background is greyish
        f = img.astype(np.float32)
        return ((f.max(-1) - f.min(-1)) / (f.max(-1) + 1e-3) > 0.45).ravel()

    masks = np.stack([object_mask(synthetic.render(i, 10, res, 0)[0]) for i in range(10 * n)]).astype(np.float32)
    labels = np.arange(10 * n) % 10
    correct = 0
    for k in range(len(masks)):
        others = np.arange(len(masks)) != k
        means = np.stack([masks[others & (labels == c)].mean(0) for c in range(10)])
        correct += int(np.argmin(((means - masks[k]) ** 2).sum(1)) == labels[k])
    assert correct / len(masks) > 0.6

    a = synthetic.render(0, 10, res, 0)[0].astype(np.float32)
    b = synthetic.render(10, 10, res, 0)[0].astype(np.float32)
    assert np.abs(a - b).mean() > 5  # same class, different lighting, colours and texture
    # continuous detail: many distinct colours, smooth gradients rather than flat fills
    assert len(np.unique(a.reshape(-1, 3), axis=0)) > res * res // 4
    assert blurred(a).std() > 1


def test_adm_center_crop_matches_its_definition():
    """Check against the definition written out step by step with numpy indexing."""
    from PIL import Image

    from d2ctool.data.transforms import adm_center_crop, to_minus_one_one

    rng = np.random.default_rng(0)
    for width, height, size in [(500, 375, 64), (130, 300, 64), (64, 64, 64), (1000, 90, 32)]:
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        ref = image
        while min(ref.size) >= 2 * size:
            ref = ref.resize((ref.size[0] // 2, ref.size[1] // 2), resample=Image.BOX)
        scale = size / min(ref.size)
        ref = np.asarray(ref.resize((round(ref.size[0] * scale), round(ref.size[1] * scale)), resample=Image.BICUBIC))
        top, left = (ref.shape[0] - size) // 2, (ref.shape[1] - size) // 2
        expected = ref[top:top + size, left:left + size]
        got = np.asarray(adm_center_crop(image, size))
        assert got.shape == (size, size, 3) and np.array_equal(got, expected)
        scaled = to_minus_one_one(adm_center_crop(image, size))
        assert scaled.shape == (3, size, size) and scaled.min() >= -1 and scaled.max() <= 1
