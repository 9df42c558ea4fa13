"""Class 11: `prepare` on real-world files. High-bit-depth images keep their range (not clipped to white) wherever
pixels are read; a file or folder name that is not valid UTF-8 is listed in rejected.jsonl and the run goes on; a
link to the source folder, an ancestor or another class never makes an image appear in two classes."""

from __future__ import annotations

import io
import json
import os
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from d2ctool.data.reader import decode_image

from faults import run_cli


def png16(pixels: np.ndarray) -> bytes:
    """A 16-bit PNG written by hand (Pillow cannot write 16-bit RGB): gray [H, W], gray+alpha [H, W, 2] or RGB [H, W, 3]."""
    h, w = pixels.shape[:2]
    channels = 1 if pixels.ndim == 2 else pixels.shape[2]
    color_type = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
    rows = pixels.astype(">u2").reshape(h, w * channels)
    raw = b"".join(b"\x00" + row.tobytes() for row in rows)

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


RAMP = (np.arange(16 * 16).reshape(16, 16) * 257).astype(np.uint16)  # 0 .. 65535 in steps of one 8-bit level


@pytest.mark.parametrize("layout", ["gray", "gray+alpha", "rgb", "rgba", "pillow I;16"])
def test_high_bit_depth_images_keep_their_range(layout):
    if layout == "pillow I;16":
        buf = io.BytesIO()
        Image.fromarray(RAMP).save(buf, format="PNG")
        data = buf.getvalue()
    else:
        planes = {"gray": [RAMP], "gray+alpha": [RAMP, np.full_like(RAMP, 65535)], "rgb": [RAMP, RAMP, RAMP],
                  "rgba": [RAMP, RAMP, RAMP, np.full_like(RAMP, 65535)]}[layout]
        data = png16(np.stack(planes, -1) if len(planes) > 1 else planes[0])
    rgb = np.asarray(decode_image(data))
    expected = (np.arange(256).reshape(16, 16)).astype(np.uint8)
    assert rgb.shape == (16, 16, 3)
    np.testing.assert_array_equal(rgb[..., 0], expected)  # the full ramp, not 255 everywhere above level 0


def test_a_16_bit_image_goes_through_prepare_and_fid_folders_with_its_range(tmp_path, monkeypatch, capsys):
    from d2ctool.evaluation.inputs import FolderImages

    src = tmp_path / "src"
    for cls in ("a", "b"):
        (src / cls).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.full((16, 16, 3), 60 * i, np.uint8)).save(src / cls / f"{i}.png")
    (src / "a" / "deep.png").write_bytes(png16(RAMP))
    code, err = run_cli(monkeypatch, capsys, "prepare", src, tmp_path / "out", "--workers", "1")
    assert code == 0, err
    assert not (tmp_path / "out" / "rejected.jsonl").read_text().strip()
    from d2ctool.data.reader import ShardReader, image_member

    decoded = [np.asarray(decode_image(image_member(m))) for _, m in ShardReader(tmp_path / "out").raw()]
    ramp = [d for d in decoded if d.std() > 10]
    assert len(ramp) == 1 and ramp[0].max() == 255 and ramp[0].min() == 0 and 120 < ramp[0].mean() < 135
    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "x.png").write_bytes(png16(RAMP))
    batch = next(FolderImages(folder).batches(1))
    assert 120 < batch.mean() < 135


def _tree(tmp_path):
    src = tmp_path / "src"
    for cls in ("cat", "dog", "eel"):
        (src / cls / "sub").mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.full((16, 16, 3), 20 * i + 100 * ord(cls[0]) % 256, np.uint8)).save(
                src / cls / f"{cls}{i}.png")
        Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(src / cls / "sub" / f"{cls}-deep.png")
    return src


@pytest.mark.parametrize("links", [
    {"cat/up": ".."}, {"cat/sub/upup": "../.."}, {"dog/root": "{src}"}, {"eel/parent": "{parent}"},
    {"cat/todog": "../dog"}, {"cat/sub/todogsub": "../../dog/sub"}, {"dog/self": "."},
    {"cat/up": "..", "dog/up": "..", "eel/up": ".."},
])
def test_links_to_ancestors_or_other_classes_never_put_an_image_in_two_classes(tmp_path, monkeypatch, capsys, links):
    src = _tree(tmp_path)
    for rel, target in links.items():
        os.symlink(target.format(src=src, parent=src.parent), src / rel)
    out = tmp_path / "out"
    code, err = run_cli(monkeypatch, capsys, "prepare", src, out, "--workers", "1")
    assert code == 0, err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["class_counts"] == [3, 3, 3] and manifest["num_samples"] == 9
    rejected = [json.loads(line) for line in (out / "rejected.jsonl").read_text().splitlines()]
    assert {r["path"] for r in rejected} >= {rel for rel in links if links[rel] != "."}
    assert all("not followed" in r["reason"] for r in rejected if r["path"] in links)


def test_a_link_to_a_folder_outside_the_tree_is_still_followed_once(tmp_path, monkeypatch, capsys):
    src = _tree(tmp_path)
    extra = tmp_path / "extra"
    extra.mkdir()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(extra / "x.png")
    os.symlink(extra, src / "cat" / "more")
    os.symlink(extra, src / "dog" / "same")  # the same real folder from a second class: read once, by the first
    code, err = run_cli(monkeypatch, capsys, "prepare", src, tmp_path / "out", "--workers", "1")
    assert code == 0, err
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["class_counts"] == [4, 3, 3]


def test_names_that_are_not_utf8_are_listed_and_the_run_goes_on(tmp_path, monkeypatch, capsys):
    src = _tree(tmp_path)
    good = (src / "cat" / "cat0.png").read_bytes()
    os.makedirs(os.fsencode(src / "dog") + b"/caf\xe9", exist_ok=True)  # latin-1 folder inside a class
    with open(os.fsencode(src / "dog") + b"/caf\xe9/x.png", "wb") as f:
        f.write(good)
    with open(os.fsencode(src / "cat") + b"/na\xefve\xff.png", "wb") as f:
        f.write(good)
    os.makedirs(os.fsencode(src) + b"/\xff\xfeclass")  # a class folder whose name is not text
    with open(os.fsencode(src) + b"/\xff\xfeclass/y.png", "wb") as f:
        f.write(good)
    out = tmp_path / "out"
    code, err = run_cli(monkeypatch, capsys, "prepare", src, out, "--workers", "1")
    assert code == 0, err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["classes"] == ["cat", "dog", "eel"] and manifest["num_samples"] == 9
    rejected = {r["path"]: r["reason"] for r in map(json.loads, (out / "rejected.jsonl").read_text().splitlines())}
    assert set(rejected) == {"cat/na\\xefve\\xff.png", "dog/caf\\xe9", "\\xff\\xfeclass"}
    assert all("not valid UTF-8" in reason for reason in rejected.values())
    code, err = run_cli(monkeypatch, capsys, "prepare", src, out, "--workers", "1")  # and resumes as finished
    assert code == 0, err


def test_flat_folders_get_the_same_rules(tmp_path, monkeypatch, capsys):
    src = tmp_path / "flat"
    src.mkdir()
    for i in range(3):
        Image.fromarray(np.full((16, 16, 3), 40 * i, np.uint8)).save(src / f"img{i}.png")
    (src / "labels.txt").write_text("".join(f"img{i}.png c{i % 2}\n" for i in range(3)))
    os.symlink("..", src / "up")
    with open(os.fsencode(src) + b"/\xffodd.png", "wb") as f:
        f.write((src / "img0.png").read_bytes())
    code, err = run_cli(monkeypatch, capsys, "prepare", src, tmp_path / "out", "--workers", "1",
                        "--set", f"prepare.labels={src / 'labels.txt'}")
    assert code == 0, err
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["num_samples"] == 3
