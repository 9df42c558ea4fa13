"""Class 7: no setting silently ignored, and the safety messages fire with this torch."""

from __future__ import annotations

import os

import pytest
import torch

from d2ctool.checkpoints import load_file
from d2ctool.continuous.load import build_mar, load_mar, preset_config
from d2ctool.errors import UserError


class Payload:
    def __reduce__(self):  # what a malicious checkpoint does: call a function while unpickling
        return (os.system, ("echo this must never run",))


class Custom:
    pass


@pytest.mark.parametrize("obj, name", [(Payload(), "posix.system"), (Custom(), "test_settings.Custom")])
def test_a_pickled_object_is_named_not_loaded(tmp_path, obj, name):
    """torch 2.14 words a blocked module ("unsupported GLOBAL posix.system whose module posix is blocked") and an
    unknown class ("Unsupported global: GLOBAL mod.Name was not an allowed global") differently: both are named."""
    path = tmp_path / "evil.pt"
    torch.save({"model": {"w": torch.zeros(1)}, "extra": obj}, path)
    with pytest.raises(UserError) as caught:
        load_file(path)
    assert str(caught.value) == (f"{path}: holds a pickled Python object ({name}) that is not loaded for safety; "
                                 "re-save its state dict with torch.save({'model': state_dict})")


def test_sample_use_ema_false_takes_model_from_an_official_mar_file(tmp_path):
    cfg = preset_config("mar-tiny")
    torch.manual_seed(0)
    raw, ema = build_mar(cfg).state_dict(), build_mar(cfg).state_dict()
    path = tmp_path / "mar_tiny.pth"
    torch.save({"model": raw, "model_ema": ema}, path)  # MAR's release layout
    with_ema, info = load_mar("mar-tiny", path)
    assert info.weights == "model_ema"
    without, info = load_mar("mar-tiny", path, use_ema=False)
    assert info.weights == "model"
    for key, value in raw.items():
        assert torch.equal(without.state_dict()[key], value)
    some = next(k for k in raw if raw[k].dtype.is_floating_point and not torch.equal(raw[k], ema[k]))
    assert torch.equal(with_ema.state_dict()[some], ema[some])
    torch.save({"model_ema": ema}, path)  # no raw weights: use_ema=false cannot apply, which is an error
    with pytest.raises(UserError, match="no state dict found"):
        load_mar("mar-tiny", path, use_ema=False)
