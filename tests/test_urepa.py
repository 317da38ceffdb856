"""U-REPA on the UNet families (sdxl, sd15, kolors): mid-block capture, geometry, the loss formula
recomputed by hand, iREPA, and the errors (SPEC sections 3, 6.2 and 9)."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from helpers import Recorder, TinyFlow, loader, trainer
from reference import manifold_reference
from lightning_repa import RepaCallback
from lightning_repa.testing.tiny_models import TINY_FAMILIES

UNETS = ("sdxl", "sd15", "kolors")


class _MidBlock(L.Callback):
    """The UNet's mid-block output by an independent hook (forwards with gradients only), and the
    UNet's gradients at the first optimizer step."""

    def __init__(self) -> None:
        self.outputs: list[torch.Tensor] = []
        self.grads: dict[str, torch.Tensor] = {}

    def on_fit_start(self, trainer, pl_module):
        def hook(module, args, output):
            if torch.is_grad_enabled():
                self.outputs.append(output.detach().clone())  # (B, C, H, W)

        pl_module.transformer.mid_block.register_forward_hook(hook)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step == 0:
            self.grads = {n: p.grad.detach().clone() for n, p in pl_module.transformer.named_parameters()
                          if p.grad is not None}


def _fit(family: str, steps: int, callbacks: list, hw=(16, 32), image_hw=(64, 128), lr=1e-2):
    module = TinyFlow(family, lr=lr)
    L.seed_everything(0)
    trainer(steps, callbacks).fit(module, loader(family, hw=hw, image_hw=image_hw))
    return module


@pytest.mark.parametrize("family", UNETS)
def test_unet_family_trains_with_urepa(family, repa_options):
    """3 steps: the projector is fed the mid block flattened row-major; projector and UNet learn;
    the UNet's gradients change; `repa/manifold` is logged."""
    repa = RepaCallback(family=family, lam=1.0, **repa_options)
    record, mid = Recorder(repa), _MidBlock()
    module = _fit(family, 3, [repa, record, mid])
    assert repa.method.value == "urepa" and len(record.inputs) == 3 and len(mid.outputs) == 3
    factor = {"sd15": 8, "sdxl": 4, "kolors": 4}[family]
    for inputs, out in zip(record.inputs, mid.outputs):
        b, c, h, w = out.shape
        assert (h, w) == (16 // factor, 32 // factor) and inputs["grid_s"] == (h, w)
        flat = torch.stack([out[:, :, i, j] for i in range(h) for j in range(w)], dim=1)  # (B, H*W, C), row-major
        torch.testing.assert_close(inputs["student"].detach(), flat, rtol=0, atol=0)
    changed = [not torch.equal(v, record.initial[k]) for k, v in module.repa_projector.state_dict().items()]
    assert all(changed), "every projector parameter must be updated"

    plain = _MidBlock()
    _fit(family, 1, [plain])
    first = next(n for n in plain.grads if n.startswith("down_blocks.0."))
    assert not torch.allclose(mid.grads[first], plain.grads[first]), "the alignment loss must reach the UNet"
    for n in [n for n in plain.grads if n.startswith(("up_blocks", "conv_out"))]:  # after the mid block
        torch.testing.assert_close(mid.grads[n], plain.grads[n])
    logged = record.steps[-1]["logged"]
    assert {"repa/manifold", "repa/similarity", "repa/loss"} <= set(logged)
    assert logged["repa/manifold"] > 0


@pytest.mark.parametrize("hw, image_hw", [((32, 16), (128, 64)), ((16, 32), (64, 128))])
def test_non_square_latents_keep_their_geometry(hw, image_hw, repa_options):
    repa = RepaCallback(family="sdxl", **repa_options)
    record = Recorder(repa)
    _fit("sdxl", 1, [repa, record], hw=hw, image_hw=image_hw)
    (gh, gw), (th, tw) = record.inputs[0]["grid_s"], record.inputs[0]["grid_t"]
    assert (gh, gw) == (hw[0] // 4, hw[1] // 4)
    assert gh / gw == th / tw == hw[0] / hw[1]  # both 2:1 (or 1:2)


@pytest.mark.parametrize("scope, manifold_weight", [("tokens", 3.0), ("batch", 3.0), ("tokens", 0.0)])
def test_urepa_loss_is_the_formula(scope, manifold_weight, repa_options):
    """lam * (-mean cosine + manifold_weight * M), recomputed from the tokens the objective was handed."""
    lam = 0.7
    repa = RepaCallback(family="sd15", lam=lam, manifold_weight=manifold_weight, manifold_scope=scope, **repa_options)
    record = Recorder(repa)
    _fit("sd15", 1, [repa, record], hw=(32, 16), image_hw=(128, 64), lr=0.0)
    inputs, w = record.inputs[0], record.initial
    student, teacher = inputs["student"].detach().double(), inputs["teacher"].double()  # (2, 8, 16), (2, 18, 384)
    (gh, gw), (th, tw) = inputs["grid_s"], inputs["grid_t"]
    proj = F.linear(F.layer_norm(student, (student.shape[-1],), w["body.0.weight"].double(), w["body.0.bias"].double()),
                    w["body.1.weight"].double(), w["body.1.bias"].double())  # (2, 8, 384)
    maps = proj.reshape(2, gh, gw, -1).permute(0, 3, 1, 2)
    proj = F.interpolate(maps, size=(th, tw), mode="bilinear", antialias=(th < gh or tw < gw)).flatten(2).transpose(1, 2)
    cos = sum(float(proj[b, n] @ teacher[b, n]) / float(proj[b, n].norm() * teacher[b, n].norm())
              for b in range(2) for n in range(th * tw)) / (2 * th * tw)
    manifold = manifold_reference(proj, teacher, scope)
    result = record.results[0]
    assert float(result.similarity) == pytest.approx(cos, abs=1e-5)
    assert float(result.terms["manifold"]) == pytest.approx(manifold, rel=1e-4, abs=1e-7)
    assert float(result.loss) == pytest.approx(lam * (-cos + manifold_weight * manifold), rel=1e-4, abs=1e-6)
    assert math.isfinite(manifold) and manifold > 0


def test_irepa_on_a_unet_trains(repa_options):
    repa = RepaCallback(family="kolors", irepa=True, **repa_options)
    record = Recorder(repa)
    module = _fit("kolors", 2, [repa, record])
    assert type(module.repa_projector).__name__ == "ConvProjector"
    assert all(not torch.equal(v, record.initial[k]) for k, v in module.repa_projector.state_dict().items())
    teacher = record.inputs[0]["teacher"]  # the raw teacher tokens; the objective z-scores them
    assert teacher.shape[1] == 18 and "repa/manifold" in record.steps[-1]["logged"]


def test_methods_and_families_name_each_other():
    with pytest.raises(ValueError, match=r"method='repa' does not fit family='sdxl'; use method='urepa'"):
        RepaCallback(family="sdxl", method="repa")
    with pytest.raises(ValueError, match=r"method='urepa' does not fit family='pixart'; use method='repa'"):
        RepaCallback(family="pixart", method="urepa")
    with pytest.raises(ValueError, match=r"U-REPA aligns the UNet's mid block only"):
        RepaCallback(family="sd15", teacher="backbone", teacher_block_index=1)


def test_a_unet_on_a_dit_family_names_the_unet_families(repa_options):
    module = TinyFlow("sd15")
    with pytest.raises(ValueError, match=r"expects a denoiser of class FluxTransformer2DModel, got "
                                         r"UNet2DConditionModel; it belongs to family 'sdxl' or 'sd15' or 'kolors'"):
        trainer(1, [RepaCallback(family="flux", **repa_options)]).fit(module, loader("sd15", hw=(16, 32)))


def test_a_unet_without_mid_block_is_refused_at_fit_start(repa_options):
    module = TinyFlow("sd15")
    fam = TINY_FAMILIES["sd15"]
    with torch.random.fork_rng(devices=[]):
        module.transformer = fam.model_class(**{**fam.config, "mid_block_type": None})
    assert module.transformer.mid_block is None
    steps = []

    class Steps(L.Callback):
        def on_train_batch_start(self, *args):
            steps.append(1)

    with pytest.raises(ValueError, match=r"`mid_block` of UNet2DConditionModel is None, so there is no block to align"):
        trainer(1, [RepaCallback(family="sd15", **repa_options), Steps()]).fit(module, loader("sd15", hw=(16, 32)))
    assert not steps


def test_demo_unet_experiment_runs_at_a_tiny_size(tmp_path):
    """`experiment=demo_unet`: U-REPA on the digits UNet towards the shipped teacher, a few steps."""
    from hydra import compose, initialize_config_module

    from lightning_repa.apps.train import run

    overrides = ["experiment=demo_unet", "trainer.max_steps=3", "data.batch_size=8", "checkpoint.every_n_train_steps=3",
                 "trainer.log_every_n_steps=1", "sample.per_class=1", "sample.steps=2", "logger=csv",
                 f"paths.output_dir={tmp_path}"]
    with initialize_config_module(version_base="1.3", config_module="lightning_repa.conf"):
        cfg = compose(config_name="config", overrides=overrides)
    assert cfg.repa.family == "sdxl" and cfg.repa.method.value == "urepa" and cfg.repa.block_index is None
    result = run(cfg)
    assert result["global_step"] == 3 and result["samples"].is_file()
    for key in ("repa/similarity", "repa/manifold", "repa/loss", "train/loss"):
        assert key in result["metrics"], key
    assert -1 <= result["metrics"]["repa/similarity"] <= 1
