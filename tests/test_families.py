"""REPA on every image-DiT family, with the real diffusers classes at tiny sizes.

The image-stream reference below is written from the diffusers 0.42 source, independently of
`lightning_repa.models.families`: it slices by the *text* length where the package slices by the
image-token count, and it hooks the block objects by attribute path.
"""

from __future__ import annotations

from typing import Any, Callable

import lightning as L
import pytest
import torch

from helpers import Recorder, TinyFlow, loader, quick, trainer
from lightning_repa import FAMILIES as ALL_FAMILIES
from lightning_repa import RepaCallback
from lightning_repa.config import Method
from lightning_repa.models.capture import BlockCapture
from lightning_repa.testing.tiny_models import TEXT_LEN, TINY_FAMILIES

NEWER = ("dit", "flux3", "qwenimage", "z_image")  # tests/test_frontier_families.py
FAMILIES = {name: f for name, f in ALL_FAMILIES.items() if f.method is Method.repa and name not in NEWER}  # UNets: test_urepa.py

AURAFLOW_REGISTERS = 8  # AuraFlowTransformer2DModel prepends 8 register tokens to the text


def _text_len(call: dict[str, Any]) -> torch.Tensor:
    return call["encoder_attention_mask"].sum(1)


# family -> {block list: (output, call kwargs, n_image) -> image tokens (B, N, D)}
Reference = Callable[[Any, dict[str, Any], int], torch.Tensor]
REFERENCE: dict[str, dict[str, Reference]] = {
    "flux": {"transformer_blocks": lambda o, c, n: o[1], "single_transformer_blocks": lambda o, c, n: o[1]},
    "chroma": {"transformer_blocks": lambda o, c, n: o[1], "single_transformer_blocks": lambda o, c, n: o[:, TEXT_LEN:]},
    "flux2": {"transformer_blocks": lambda o, c, n: o[1], "single_transformer_blocks": lambda o, c, n: o[:, TEXT_LEN:]},
    "sd3": {"transformer_blocks": lambda o, c, n: o[1]},
    "auraflow": {
        "joint_transformer_blocks": lambda o, c, n: o[1],
        "single_transformer_blocks": lambda o, c, n: o[:, TEXT_LEN + AURAFLOW_REGISTERS:],
    },
    "hidream": {"double_stream_blocks": lambda o, c, n: o[0][:, :n], "single_stream_blocks": lambda o, c, n: o[:, :n]},
    "lumina2": {"layers": lambda o, c, n: torch.stack([o[b, int(s): int(s) + n] for b, s in enumerate(_text_len(c))])},
    "sana": {"transformer_blocks": lambda o, c, n: o},
    "pixart": {"transformer_blocks": lambda o, c, n: o},
}


def _blocks_by_path(model: torch.nn.Module, family: str) -> list[tuple[str, torch.nn.Module]]:
    return [(attr, block) for attr in REFERENCE[family] for block in getattr(model, attr)]


def test_reference_covers_every_family():
    assert set(REFERENCE) == set(FAMILIES)


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("hw", [(8, 8), (8, 16)], ids=["square", "wide"])
def test_capture_every_block_matches_reference(family: str, hw: tuple[int, int]):
    """BlockCapture of every block index == the independently sliced block output."""
    fam = TINY_FAMILIES[family]
    model = fam.build(seed=0)
    blocks = _blocks_by_path(model, family)
    capture = BlockCapture(model, FAMILIES[family], list(range(len(blocks))))
    reference: dict[int, torch.Tensor] = {}
    call: dict[str, Any] = {}
    handles = [model.register_forward_pre_hook(lambda m, a, k: call.update(k), with_kwargs=True)]
    grid = FAMILIES[family].grid((2, fam.latent_channels, *hw), model)
    n_image = grid[0] * grid[1]
    for i, (attr, block) in enumerate(blocks):
        ref = REFERENCE[family][attr]
        handles.append(block.register_forward_hook(
            lambda m, a, o, i=i, ref=ref: reference.__setitem__(i, ref(o, call, n_image).detach().clone())))
    capture.attach()
    capture.arm(n_image)
    x = torch.randn(2, fam.latent_channels, *hw)
    fam.forward(model, x, torch.rand(2), fam.make_cond(2, seed=0))
    hidden = FAMILIES[family].hidden_size(model)
    for i in range(len(blocks)):
        got = capture.take(i)
        assert got.shape == (2, n_image, hidden)
        torch.testing.assert_close(got, reference[i], rtol=0, atol=0)
    capture.detach()
    for h in handles:
        h.remove()
    assert not model._forward_hooks and not model._forward_pre_hooks


class _Reference(L.Callback):
    """Records the hooked block's image tokens by a second, independent hook (with gradients only)."""

    def __init__(self, attr: str, ref: Reference) -> None:
        self.attr, self.ref = attr, ref
        self.reference: list[torch.Tensor] = []

    def on_fit_start(self, trainer, pl_module):
        call: dict[str, Any] = {}
        model = pl_module.transformer
        model.register_forward_pre_hook(lambda m, a, k: call.update(k), with_kwargs=True)
        grid = TINY_FAMILIES[pl_module.family_name].token_grid(8, 16)

        def hook(m, a, o):
            if torch.is_grad_enabled():
                self.reference.append(self.ref(o, call, grid[0] * grid[1]).detach().clone())

        getattr(model, self.attr)[-1].register_forward_hook(hook)


class _Grads(L.Callback):
    def __init__(self) -> None:
        self.grads: dict[str, torch.Tensor] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step == 0:
            self.grads = {n: p.grad.detach().clone() for n, p in pl_module.transformer.named_parameters()
                          if p.grad is not None}


@pytest.mark.parametrize("family", quick(sorted(FAMILIES), {"flux", "pixart", "sd3"}))  # all: -m slow
def test_family_trains_with_repa(family: str, repa_options: dict):
    """3 steps on a 1:2 latent: capture == reference, projector learns, gradients change, logs."""
    attr = list(REFERENCE[family])[-1]
    model = TinyFlow(family)
    n_blocks = sum(len(getattr(model.transformer, a)) for a in REFERENCE[family])
    repa = RepaCallback(family=family, block_index=n_blocks - 1, lam=1.0, **repa_options)
    record, ref, grads = Recorder(repa), _Reference(attr, REFERENCE[family][attr]), _Grads()
    L.seed_everything(0)
    fit = trainer(3, [repa, record, ref, grads])
    fit.fit(model, loader(family))

    projector = model.repa_projector
    captured = [inputs["student"].detach() for inputs in record.inputs]  # what the projector was fed
    assert len(captured) == 3 and len(ref.reference) == 3
    hidden = FAMILIES[family].hidden_size(model.transformer)
    for got, want in zip(captured, ref.reference):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    grid = TINY_FAMILIES[family].token_grid(8, 16)
    assert captured[0].shape == (2, grid[0] * grid[1], hidden) and record.inputs[0]["grid_s"] == grid

    changed = [not torch.equal(v, record.initial[k]) for k, v in projector.state_dict().items()]
    assert all(changed), "every projector parameter must be updated"

    plain, plain_grads = TinyFlow(family), _Grads()
    L.seed_everything(0)
    trainer(1, [plain_grads]).fit(plain, loader(family))
    first = next(n for n in grads.grads if n.startswith(next(iter(REFERENCE[family])) + ".0."))
    assert not torch.allclose(grads.grads[first], plain_grads.grads[first]), "aux loss must reach the early blocks"
    untouched = [n for n in plain_grads.grads if n.startswith(("proj_out", "norm_out", "final_layer"))]
    assert untouched, "expected an output projection after the blocks"
    for n in untouched:  # the alignment loss cannot reach what comes after the hooked block
        torch.testing.assert_close(grads.grads[n], plain_grads.grads[n])

    metrics = fit.callback_metrics
    for key in ("repa/loss", "repa/similarity", "repa/weight", "repa/similarity_ema"):
        assert key in metrics, key
    assert -1.0 <= float(metrics["repa/similarity"]) <= 1.0
    torch.testing.assert_close(float(metrics["repa/loss"]), -1.0 * float(metrics["repa/similarity"]))
