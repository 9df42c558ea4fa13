"""Class 7 (continued): the JSON files commands read back (piece records of a resumable folder, a classes file)
go through the one JSON reader: a damaged piece record makes the piece redone, never trusted; a classes file that
is not a manifest is a one-line error."""

from __future__ import annotations


import pytest

from d2ctool.runstate import OutputFolder

from faults import assert_one_line_error, run_cli


@pytest.mark.parametrize("content", [b"", b"{\"file\": ", b"\xff\xfe", b"[1, 2]", b"{\"file\": 3}"])
def test_a_damaged_piece_record_means_the_piece_is_redone(tmp_path, content):
    folder = OutputFolder(tmp_path / "out", "encode", {"x": 1})
    folder.check()
    folder.start("x: 1\n")
    folder.write_record(0, {"file": None})
    assert folder.done(0)
    (folder.state / "000000.json").write_bytes(content)
    assert not folder.done(0)


@pytest.mark.parametrize("content, fragment", [(b"\xff\xfe binary", "not valid JSON"), (b"[1]", "expected a JSON object"),
                                               (b'{"classes": "cat"}', "no 'classes' list"),
                                               (b'{"classes": [1, 2]}', "no 'classes' list")])
def test_a_classes_file_that_is_no_manifest(tmp_path, monkeypatch, capsys, content, fragment):
    from PIL import Image

    src = tmp_path / "src" / "cat"
    src.mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(src / "a.png")
    (tmp_path / "classes.json").write_bytes(content)
    code, err = run_cli(monkeypatch, capsys, "prepare", tmp_path / "src", tmp_path / "out", "--workers", "1",
                        "--set", f"prepare.classes={tmp_path / 'classes.json'}")
    assert_one_line_error(code, err, "classes.json", fragment)
