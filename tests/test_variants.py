"""The loss path recomputed by hand, and the variants: iREPA, pooled alignment, backbone teacher,
manual optimization, gradient checkpointing, mixed precision, several callbacks."""

from __future__ import annotations

from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from helpers import Recorder, TinyFlow, loader, trainer
from lightning_repa import RepaCallback
from lightning_repa.teachers import BackboneTeacher


def _one_step(family: str, options: dict[str, Any]) -> tuple[RepaCallback, Recorder, TinyFlow]:
    repa = RepaCallback(family=family, **options)
    record = Recorder(repa)
    module = TinyFlow(family, lr=0.0)  # the projector stays at its initial weights
    trainer(1, [repa, record]).fit(module, loader(family))
    return repa, record, module


def _zscore(f: torch.Tensor, alpha: float) -> torch.Tensor:
    return (f - alpha * f.mean(1, keepdim=True)) / (f.std(1, keepdim=True) + 1e-6)


@pytest.mark.parametrize("variant", ["repa", "irepa", "pooled", "mlp"])
def test_logged_similarity_is_the_formula(variant, repa_options):
    """sd3, 8x16 latents -> 4x8 student grid; teacher 56 px on 64x128 images -> 3x6 grid."""
    options = {"block_index": 1, **repa_options,
               **{"repa": {}, "irepa": {"irepa": True}, "pooled": {"spatial_align": False},
                  "mlp": {"projector": "mlp", "projector_hidden": 64}}[variant]}
    repa, record, module = _one_step("sd3", options)
    student, teacher, grid_t = (record.inputs[0][k] for k in ("student", "teacher", "grid_t"))  # (2, 32, 32)
    assert grid_t == (3, 6) and teacher.shape == (2, 18, 384)
    p = module.repa_projector
    w = record.initial
    if variant == "irepa":
        maps = student.reshape(2, 4, 8, 32).permute(0, 3, 1, 2)
        proj = F.conv2d(maps, w["body.weight"], w["body.bias"], padding=1).flatten(2).transpose(1, 2)
        teacher = _zscore(teacher, 0.6)
    elif variant == "mlp":
        h = F.silu(F.linear(student, w["body.0.weight"], w["body.0.bias"]))
        h = F.silu(F.linear(h, w["body.2.weight"], w["body.2.bias"]))
        proj = F.linear(h, w["body.4.weight"], w["body.4.bias"])
    else:
        proj = F.linear(F.layer_norm(student, (32,), w["body.0.weight"], w["body.0.bias"]),
                        w["body.1.weight"], w["body.1.bias"])
    if variant == "pooled":
        proj, teacher = proj.mean(1, keepdim=True), teacher.mean(1, keepdim=True)
    else:
        maps = proj.reshape(2, 4, 8, -1).permute(0, 3, 1, 2)
        proj = F.interpolate(maps, size=(3, 6), mode="bilinear", antialias=True).flatten(2).transpose(1, 2)
    want = float(F.cosine_similarity(proj, teacher, dim=-1).mean().detach())
    assert float(record.results[0].similarity.detach()) == pytest.approx(want, abs=1e-5)
    assert float(record.steps[0]["logged"]["repa/similarity"]) == pytest.approx(want, abs=1e-5)
    assert type(p).__name__ == {"irepa": "ConvProjector", "mlp": "MLPProjector"}.get(variant, "LinearProjector")


def test_backbone_teacher_uses_a_deeper_block_and_no_encoder():
    repa, record, module = _one_step("sd3", dict(block_index=0, teacher="backbone", teacher_block_index=2))
    assert isinstance(repa.teacher, BackboneTeacher) and record.inputs[0]["grid_t"] == record.inputs[0]["grid_s"]
    student, deeper = record.inputs[0]["student"], record.inputs[0]["teacher"]
    assert not deeper.requires_grad
    assert student.shape == deeper.shape == (2, 32, 32)
    w = record.initial
    proj = F.linear(F.layer_norm(student, (32,), w["body.0.weight"], w["body.0.bias"]),
                    w["body.1.weight"], w["body.1.bias"])
    assert module.repa_projector.out_dim == 32
    want = float(F.cosine_similarity(proj, deeper, dim=-1).mean().detach())
    assert float(record.results[0].similarity.detach()) == pytest.approx(want, abs=1e-5)


class _Manual(TinyFlow):
    def __init__(self, call_repa: bool) -> None:
        super().__init__("sd3", lr=0.05)
        self.automatic_optimization, self.call_repa = False, call_repa

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        loss = super().training_step(batch, batch_idx)
        if self.call_repa:
            repa = next(cb for cb in self.trainer.callbacks if isinstance(cb, RepaCallback))
            loss = loss + repa.compute_loss(batch)
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()
        return loss


def test_manual_optimization_with_compute_loss(repa_options):
    module = _Manual(call_repa=True)
    repa = RepaCallback(family="sd3", block_index=1, **repa_options)
    record = Recorder(repa)
    trainer(2, [repa, record]).fit(module, loader("sd3"))
    changed = [not torch.equal(v, record.initial[k]) for k, v in module.repa_projector.state_dict().items()]
    assert all(changed) and record.measured_steps() == [0, 1]


def test_manual_optimization_without_compute_loss_is_an_error(repa_options):
    with pytest.raises(RuntimeError, match=r"repa.compute_loss\(batch\)"):
        trainer(2, [RepaCallback(family="sd3", block_index=1, **repa_options)]).fit(_Manual(False), loader("sd3"))


def _first_grads(gradient_checkpointing: bool, options: dict, **trainer_kwargs) -> dict[str, torch.Tensor]:
    module = TinyFlow("sd3")
    if gradient_checkpointing:
        module.transformer.enable_gradient_checkpointing()
    grads: dict[str, torch.Tensor] = {}

    class Grab(L.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            grads.update({n: p.grad.clone() for n, p in pl_module.named_parameters() if p.grad is not None})

    L.seed_everything(0)
    trainer(1, [RepaCallback(family="sd3", block_index=1, **options), Grab()], **trainer_kwargs).fit(
        module, loader("sd3"))
    return grads


def test_gradient_checkpointing_captures_once_and_gives_the_same_gradients(repa_options):
    plain, checkpointed = _first_grads(False, repa_options), _first_grads(True, repa_options)
    assert plain.keys() == checkpointed.keys() and any(k.startswith("repa_projector") for k in plain)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-4, atol=1e-6, msg=name)


def test_bf16_mixed_precision_runs_with_a_float32_projector(repa_options):
    grads = _first_grads(False, repa_options, precision="bf16-mixed")
    assert grads["repa_projector.body.1.weight"].dtype == torch.float32
    assert all(torch.isfinite(g).all() for g in grads.values())


def test_bf16_true_precision_keeps_the_projector_in_float32(repa_options):
    grads = _first_grads(False, repa_options, precision="bf16-true")
    assert grads["repa_projector.body.1.weight"].dtype == torch.float32
    assert grads["transformer.proj_out.weight"].dtype == torch.bfloat16
    assert all(torch.isfinite(g.float()).all() for g in grads.values())


class _SkipsDenoiser(TinyFlow):
    def training_step(self, batch, batch_idx):
        return self.transformer.proj_out.weight.sum() * 0.0


def test_block_that_never_ran_is_an_error(repa_options):
    with pytest.raises(RuntimeError, match=r"block 1 \(of 3\) of family=.sd3. did not run in this training step"):
        trainer(1, [RepaCallback(family="sd3", block_index=1, **repa_options)]).fit(_SkipsDenoiser("sd3"),
                                                                                     loader("sd3"))


def test_two_callbacks_get_two_projectors_and_two_states(repa_options):
    a = RepaCallback(family="sd3", block_index=0, **repa_options)
    b = RepaCallback(family="sd3", block_index=1, **repa_options)
    module = TinyFlow("sd3")
    trainer(2, [a, b]).fit(module, loader("sd3"))
    assert a.projector_attr == "repa_projector_0" and b.projector_attr == "repa_projector_1"
    assert module.repa_projector_0 is not module.repa_projector_1
    assert a.state_key != b.state_key
    same_block = [RepaCallback(family="sd3", block_index=0, **repa_options),
                  RepaCallback(family="sd3", block_index=0, teacher="backbone", teacher_block_index=2)]
    assert same_block[0].state_key != same_block[1].state_key  # two teachers on one block can coexist


class _NoGradFirst(TinyFlow):
    """Runs a no-grad forward of the denoiser (as self-conditioning does) before the real one."""

    def training_step(self, batch, batch_idx):
        with torch.no_grad():
            x0 = batch["latents"]
            self.fam.forward(self.transformer, x0, torch.rand(x0.shape[0]), self.fam.make_cond(x0.shape[0]))
        return super().training_step(batch, batch_idx)


def test_the_forward_with_gradients_is_captured(repa_options):
    repa = RepaCallback(family="sd3", block_index=1, **repa_options)
    record = Recorder(repa)
    trainer(1, [repa, record]).fit(_NoGradFirst("sd3"), loader("sd3"))
    assert record.inputs[0]["student"].requires_grad, "the no-grad pass must not be the one captured"


class _ValidatesWithTrainingStep(TinyFlow):
    def validation_step(self, batch, batch_idx):
        return self.training_step(batch, batch_idx)


def test_validation_through_training_step_is_not_aligned(repa_options):
    repa = RepaCallback(family="sd3", block_index=1, **repa_options)
    calls = []

    class Count(L.Callback):
        def on_fit_start(self, trainer, pl_module):
            repa.teacher.register_forward_hook(lambda *a: calls.append(trainer.state.stage))

    trainer(2, [repa, Count()], limit_val_batches=2, val_check_interval=1, num_sanity_val_steps=1).fit(
        _ValidatesWithTrainingStep("sd3"), loader("sd3"), loader("sd3"))
    assert [getattr(s, "value", s) for s in calls] == ["train", "train"]


class _BuildsLate(TinyFlow):
    """Builds its denoiser in `setup` or `configure_model` (after Callback.setup), as large models do."""

    def __init__(self, where: str) -> None:
        super().__init__("sd3")
        self.where = where
        del self.transformer

    def _build(self) -> None:
        if not hasattr(self, "transformer"):
            self.transformer = self.fam.build(0)

    def setup(self, stage: str) -> None:
        if self.where == "setup":
            self._build()

    def configure_model(self) -> None:
        if self.where == "configure_model":
            self._build()


class _BuildsInSetupOnly(TinyFlow):
    """Builds in LightningModule.setup and does not override configure_model."""

    def __init__(self) -> None:
        super().__init__("sd3")
        del self.transformer

    def setup(self, stage: str) -> None:
        self.transformer = self.fam.build(0)


@pytest.mark.parametrize("where", ["setup", "configure_model", "setup_only"])
def test_denoiser_built_after_callback_setup(where, repa_options):
    module = _BuildsInSetupOnly() if where == "setup_only" else _BuildsLate(where)
    repa = RepaCallback(family="sd3", block_index=1, **repa_options)
    t = trainer(2, [repa])
    t.fit(module, loader("sd3"))
    optimised = {id(p) for g in t.optimizers[0].param_groups for p in g["params"]}
    assert all(id(p) in optimised for p in module.repa_projector.parameters())
    assert "repa/similarity" in t.callback_metrics and "configure_model" not in module.__dict__
