"""Class 10: no setting silently ignored, no check claimed that was not made. A sampling setting the mode cannot
honour is refused (explicit classes where the real images bring their labels; a CFG power without the schedule
that uses it), and `--verify` says what it checked."""

from __future__ import annotations

import pytest

from d2ctool.discrete.config import SamplingConfig
from d2ctool.errors import UserError

from faults import assert_one_line_error, copy_folder, rewrite_manifest, run_cli


@pytest.mark.parametrize("mode", ["vq-reconstruction", "kl-reconstruction"])
def test_explicit_classes_in_a_mode_that_takes_real_labels_are_refused(tiny_data, tmp_path, monkeypatch, capsys,
                                                                      mode):
    out = tmp_path / "samples"
    args = ["sample", out, "--set", f"sample.mode={mode}", "--set", f"sample.oracle_data={tiny_data / 'encoded'}",
            "--set", f"tokenizers.vq.checkpoint={tiny_data / 'vq-tiny-s4.pt'}",
            "--set", f"tokenizers.kl.checkpoint={tiny_data / 'kl-tiny-s4.pt'}", "--set", "sample.num_images=4",
            "--set", "sample.batch_size=4", "--set", "sample.device=cpu", "--set", "sample.grid_per_class=1"]
    code, err = run_cli(monkeypatch, capsys, *args, "--set", "sample.classes=[1, 2]")
    assert_one_line_error(code, err, "sample.classes", mode, "sample.oracle_data")
    assert not out.exists()
    code, err = run_cli(monkeypatch, capsys, *args)  # without it: the real images' labels, as documented
    assert code == 0, err


def test_make_labels_refuses_classes_whenever_real_images_give_the_labels():
    import types

    import torch

    from d2ctool.sampling.chain import make_labels
    from d2ctool.sampling.config import SampleConfig

    chain = types.SimpleNamespace(oracle=(torch.zeros(4, 16, dtype=torch.long), torch.tensor([0, 1, 2, 3])))
    assert make_labels(SampleConfig(mode="oracle-codes", num_images=4), 10, chain).tolist() == [0, 1, 2, 3]
    with pytest.raises(UserError, match="sample.classes is set, but mode oracle-codes"):
        make_labels(SampleConfig(mode="oracle-codes", num_images=4, classes=[3]), 10, chain)


def test_a_cfg_power_without_its_schedule_is_refused():
    with pytest.raises(UserError, match="cfg_power 2.0 is only used by cfg_schedule power-cosine"):
        SamplingConfig(cfg_power=2.0).resolved()
    assert SamplingConfig(cfg_power=2.0, cfg_schedule="power-cosine").resolved().cfg_power == 2.0


def test_the_cli_refuses_a_cfg_power_without_its_schedule_before_loading_models(tmp_path, monkeypatch, capsys):
    code, err = run_cli(monkeypatch, capsys, "sample", tmp_path / "s", "--set", "sample.mode=discrete-only",
                        "--set", "sample.stage1.cfg_power=2.0")
    assert_one_line_error(code, err, "cfg_power 2.0 is only used by cfg_schedule power-cosine")


def test_verify_does_not_claim_sha256_it_could_not_check(tiny_data, tmp_path, capsys):
    from d2ctool.cli import _verify_shards

    shards = copy_folder(tiny_data / "shards", tmp_path / "shards")
    _verify_shards(shards)
    assert "sha256" in capsys.readouterr().out
    rewrite_manifest(shards, lambda m: [entry.pop("sha256") for entry in m["shards"][:2]])
    _verify_shards(shards)
    said = capsys.readouterr().out
    assert "2 of 3 have no sha256" in said and "could not be verified" in said
    assert "(size and sha256)" not in said
