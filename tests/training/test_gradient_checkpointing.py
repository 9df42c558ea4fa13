"""One gradient-checkpointing switch: the trainer's `train.grad_checkpointing` reaches every model family
(GPT, RAR, MAR and its diffusion head, the VQ, MaskGIT and KL tokenizers), and changes no number."""

from __future__ import annotations

import pytest
import torch

from d2ctool.continuous.load import mar_from_preset
from d2ctool.discrete.load import stage1_from_preset
from d2ctool.tokenizers.load import tokenizer_from_preset


def _switch_on(model):
    # what Trainer.run does with train.grad_checkpointing
    for module in model.modules():
        if hasattr(module, "gradient_checkpointing"):
            module.gradient_checkpointing = True


def _models():
    yield "gpt", lambda: stage1_from_preset("gpt-tiny", 32, 4, 5), lambda m: m.loss(
        torch.randint(0, 32, (2, 16)), torch.tensor([0, 3]))
    yield "rar", lambda: stage1_from_preset("rar-tiny", 32, 4, 5), lambda m: m.loss(
        torch.randint(0, 32, (2, 16)), torch.tensor([0, 3]))
    yield "mar", lambda: mar_from_preset("mar-tiny", num_classes=5), lambda m: m(
        torch.randn(2, 4, 8, 8), torch.tensor([0, 3]), None, torch.Generator().manual_seed(0))
    for kind, preset in (("vq", "vq-tiny-s4"), ("vq", "maskgit-tiny-s4"), ("kl", "kl-tiny-s4")):
        yield preset, (lambda k=kind, p=preset: tokenizer_from_preset(k, p)), lambda m: m(
            torch.rand(2, 3, 32, 32) * 2 - 1)[0].square().mean()


@pytest.mark.parametrize("name, build, loss", list(_models()), ids=[m[0] for m in _models()])
def test_the_trainers_switch_recomputes_blocks_and_keeps_every_gradient(name, build, loss):
    grads, recomputed = [], []
    for on in (False, True):
        torch.manual_seed(0)
        model = build().train()
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0  # the same numbers with and without recomputation
        if on:
            _switch_on(model)
        calls = []
        hooks = [m.register_forward_hook(lambda *_: calls.append(1)) for m in model.modules() if m is not model]
        torch.manual_seed(1)
        loss(model).backward()
        for h in hooks:
            h.remove()
        recomputed.append(len(calls))
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    assert recomputed[1] > recomputed[0]  # blocks ran again in backward
    assert len(grads[0]) == len(grads[1])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
