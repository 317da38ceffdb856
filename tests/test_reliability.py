"""The setups people really train with: bad batches, frozen modules (LoRA), gradient checkpointing,
several teachers, several denoiser calls, wrapped denoisers, failed fits, short runs."""

from __future__ import annotations

import csv as csv_module
import functools
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.checkpoint import checkpoint
from torch.utils.data import DataLoader

from helpers import LatentData, Recorder, TinyFlow, loader, quick, trainer
from lightning_repa import RepaCallback
from lightning_repa.encoders import load_encoder

UNET_HW = (16, 32)


class _Corrupt(torch.utils.data.Dataset):
    """LatentData whose pixels are `value` (NaN or inf) in one pixel of the chosen ids."""

    def __init__(self, family: str, ids: set[int], value: float, n: int = 6) -> None:
        self.data, self.ids, self.value = LatentData(family, n=n), ids, value

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int):
        item = self.data[i]
        if i in self.ids:
            item["pixels"][0, 3, 5] = self.value
        return item


def _fit_pixart(data, steps: int = 3, **options):
    module = TinyFlow("pixart")  # plain SGD
    repa = RepaCallback(family="pixart", block_index=1, **options)
    record = Recorder(repa)
    L.seed_everything(0)
    trainer(steps, [repa, record]).fit(module, DataLoader(data, batch_size=2))
    return module, repa, record


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nonfinite_teacher_skips_that_step_exactly(value, repa_options):
    """A NaN (or inf) in one sample's clean pixels at step 0: that step adds no alignment loss, and
    training ends with the weights of a run whose step-0 weight was 0 (warm-up 1), bit for bit."""
    with pytest.warns(UserWarning, match=r"the teacher tokens of optimizer step 0 are not finite") as warned:
        bad, repa, record = _fit_pixart(_Corrupt("pixart", {0}, value), **repa_options)
    assert sum("not finite" in str(w.message) for w in warned) == 1  # warned once
    clean, _, _ = _fit_pixart(LatentData("pixart", n=6), warmup_steps=1, **repa_options)
    for (name, a), b in zip(bad.named_parameters(), clean.parameters()):
        assert torch.isfinite(a).all() and torch.equal(a, b), name
    assert [r.skipped for r in record.results] == [True, False, False]
    assert [s["logged"]["repa/skipped"] for s in record.steps] == [1.0, 1.0, 1.0]
    assert repa.cutoff.ema is not None and torch.isfinite(torch.tensor(repa.cutoff.ema))


def test_too_many_nonfinite_steps_in_a_row_stop_the_run(repa_options):
    with pytest.raises(RuntimeError, match=r"skipped the alignment of 2 optimizer steps in a row \(up to step 1\) "
                                           r"because the teacher tokens were not finite"):
        with pytest.warns(UserWarning):
            _fit_pixart(_Corrupt("pixart", set(range(6)), float("nan")), steps=4, max_nonfinite_steps=2,
                        **repa_options)


class _Sdxl(TinyFlow):
    def __init__(self, freeze: str, optimizer_filter: bool = True) -> None:
        super().__init__("sdxl")
        self.freeze, self.optimizer_filter = freeze, optimizer_filter

    def _freeze_and_add_adapter(self) -> None:
        self.requires_grad_(False)  # as LoRA scripts do, then trainable adapters
        if not hasattr(self, "adapter"):
            self.adapter = nn.Linear(4, 4)
        self.adapter.requires_grad_(True)
        self.transformer.conv_in.requires_grad_(True)  # stands in for the LoRA layers inside the UNet

    def setup(self, stage):
        if self.freeze == "setup":
            self._freeze_and_add_adapter()

    def on_fit_start(self):
        if self.freeze == "on_fit_start":
            self._freeze_and_add_adapter()

    def configure_optimizers(self):
        if self.freeze == "configure_optimizers":
            self._freeze_and_add_adapter()
        params = [p for p in self.parameters() if p.requires_grad] if self.optimizer_filter else self.parameters()
        return torch.optim.SGD(params, lr=1e-2)


def test_freezing_in_setup_then_adding_adapters_keeps_the_projector_trainable(repa_options):
    module = _Sdxl("setup")
    repa = RepaCallback(family="sdxl", **repa_options)
    record = Recorder(repa)
    trainer(2, [repa, record]).fit(module, loader("sdxl", hw=UNET_HW))
    assert all(not torch.equal(v, record.initial[k]) for k, v in module.repa_projector.state_dict().items())


@pytest.mark.parametrize("where, match", [
    ("on_fit_start", r"received no gradient in the first aligned step: it is frozen"),
    ("configure_optimizers", r"has requires_grad=False \(body.0.weight, .*\): it is frozen"),
])
def test_a_frozen_projector_is_an_error_that_says_so(where, match, repa_options):
    with pytest.raises((ValueError, RuntimeError), match=match) as info:
        trainer(2, [RepaCallback(family="sdxl", **repa_options)]).fit(_Sdxl(where), loader("sdxl", hw=UNET_HW))
    assert "self.repa_projector.requires_grad_(True)" in str(info.value)
    assert "build the optimizer from" not in str(info.value)


def test_projector_left_out_of_the_optimizer_keeps_its_own_message(repa_options):
    class LeavesItOut(TinyFlow):
        def configure_optimizers(self):
            return torch.optim.SGD(self.transformer.parameters(), lr=1e-2)

    with pytest.raises(ValueError, match=r"is not in any optimizer: build the optimizer from `self.parameters\(\)`"):
        trainer(1, [RepaCallback(family="sd3", block_index=1, **repa_options)]).fit(LeavesItOut("sd3"), loader("sd3"))


# --- gradient checkpointing --------------------------------------------------------------------------


class _Checkpointed(TinyFlow):
    def __init__(self, family: str, mode: str) -> None:
        super().__init__(family)
        if mode == "reentrant":
            func = functools.partial(checkpoint, use_reentrant=True)
            self.transformer.enable_gradient_checkpointing(gradient_checkpointing_func=func)
        elif mode == "non_reentrant":
            self.transformer.enable_gradient_checkpointing()  # diffusers' default: use_reentrant=False


class _FirstGrads(L.Callback):
    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step == 0:
            self.grads = {n: p.grad.clone() for n, p in pl_module.transformer.named_parameters() if p.grad is not None}


def _grads(family: str, mode: str, lam: float, options: dict) -> dict[str, torch.Tensor]:
    unet = family in ("sdxl", "sd15", "kolors")
    block = {} if unet else {"block_index": 1}
    grads = _FirstGrads()
    L.seed_everything(0)
    trainer(1, [RepaCallback(family=family, lam=lam, **block, **options), grads]).fit(
        _Checkpointed(family, mode), loader(family, hw=UNET_HW if unet else (8, 16)))
    return grads.grads


CHECKPOINTED = ("flux", "flux2", "sd3", "chroma", "sana", "pixart", "hidream", "auraflow", "lumina2", "sd15", "sdxl",
                "kolors")  # the newer families: tests/test_frontier_families.py


@pytest.mark.parametrize("family", quick(CHECKPOINTED, {"flux", "kolors"}))  # a DiT and a UNet; all: -m slow
def test_gradient_checkpointing_keeps_the_alignment_gradient(family, repa_options):
    """The denoiser's gradients with REPA are the same with reentrant, non-reentrant or no
    checkpointing (reentrant: the block's first pass runs without gradients), and differ from lam 0."""
    plain = _grads(family, "none", 1.0, repa_options)
    for mode in ("reentrant", "non_reentrant"):
        got = _grads(family, mode, 1.0, repa_options)
        assert got.keys() == plain.keys(), mode
        for name in plain:
            torch.testing.assert_close(got[name], plain[name], rtol=1e-4, atol=1e-6, msg=f"{mode}: {name}")
    without = _grads(family, "reentrant", 0.0, repa_options)
    assert any(not torch.allclose(without[n], plain[n]) for n in plain), "lam 0 must differ from lam 1"


def test_a_block_run_without_gradients_is_a_clear_error(repa_options):
    """A block that runs without gradients inside the aligned call (here under torch.no_grad, as the
    first pass of a reentrant checkpoint that is not diffusers' own would): an error at the first
    step, never an alignment that silently gives the denoiser no gradient."""

    class NoGradBlock(TinyFlow):
        def on_fit_start(self):
            block = self.transformer.transformer_blocks[1]
            forward = block.forward

            def no_grad_forward(*args, **kwargs):
                with torch.no_grad():
                    return forward(*args, **kwargs)

            block.forward = no_grad_forward

    with pytest.raises(RuntimeError, match=r"block 1 of family='sd3' ran without gradients inside the aligned "
                                           r"denoiser call"):
        trainer(1, [RepaCallback(family="sd3", block_index=1, **repa_options)]).fit(NoGradBlock("sd3"), loader("sd3"))


# --- several callbacks, several calls ------------------------------------------------------------------


def test_two_teachers_log_under_their_own_names(tmp_path, repa_options):
    encoder = RepaCallback(family="sd3", block_index=0, **repa_options)
    backbone = RepaCallback(family="sd3", block_index=0, teacher="backbone", teacher_block_index=2)
    logger = CSVLogger(tmp_path, name="csv")
    trainer(2, [encoder, backbone], logger=logger, log_every_n_steps=1).fit(TinyFlow("sd3"), loader("sd3"))
    header = (Path(logger.log_dir) / "metrics.csv").read_text().splitlines()[0].split(",")
    for name in ("dinov2_vits14", "backbone2"):
        assert {f"repa/{name}/similarity", f"repa/{name}/loss", f"repa/{name}/weight"} <= set(header), header
    assert "repa/similarity" not in header
    same = [RepaCallback(family="sd3", block_index=b, **repa_options) for b in (0, 1)]
    t = trainer(1, same)
    t.fit(TinyFlow("sd3"), loader("sd3"))
    assert [cb.log_prefix for cb in same] == ["repa/dinov2_vits14_0", "repa/dinov2_vits14_1"]
    assert {"repa/dinov2_vits14_0/similarity", "repa/dinov2_vits14_1/similarity"} <= set(t.callback_metrics)
    named = RepaCallback(family="sd3", block_index=1, name="dino", **repa_options)
    t = trainer(1, [named])
    t.fit(TinyFlow("sd3"), loader("sd3"))
    assert "repa/dino/similarity" in t.callback_metrics


class _TwoCalls(TinyFlow):
    """A caption-dropout pass (no text) first, then the real pass: both with gradients."""

    def training_step(self, batch, batch_idx):
        x0 = batch["latents"]
        cond = self.fam.make_cond(x0.shape[0])
        dropped = {**cond, "encoder_hidden_states": torch.zeros_like(cond["encoder_hidden_states"])}
        t = torch.full((x0.shape[0],), 0.5)
        a = self.fam.forward(self.transformer, x0, t, dropped)
        b = self.fam.forward(self.transformer, x0, t, cond)
        return (a - x0).pow(2).mean() + (b - x0).pow(2).mean()


class _BlockOutputs(L.Callback):
    def on_fit_start(self, trainer, pl_module):
        self.outputs = []
        pl_module.transformer.transformer_blocks[1].register_forward_hook(
            lambda m, a, out: self.outputs.append(out[1].detach().clone()))


@pytest.mark.parametrize("align_call, expected", [
    ("first", 0), ("last", 1), (lambda call: bool(call["encoder_hidden_states"].abs().sum() > 0), 1)])
def test_which_call_is_aligned(align_call, expected, repa_options):
    repa = RepaCallback(family="sd3", block_index=1, align_call=align_call, **repa_options)
    record, outputs = Recorder(repa), _BlockOutputs()
    if align_call == "first":
        with pytest.warns(UserWarning, match=r"ran 2 times with gradients in one training step; the first call"):
            trainer(1, [repa, record, outputs]).fit(_TwoCalls("sd3"), loader("sd3"))
    else:
        trainer(1, [repa, record, outputs]).fit(_TwoCalls("sd3"), loader("sd3"))
    assert len(outputs.outputs) == 2 and not torch.equal(outputs.outputs[0], outputs.outputs[1])
    torch.testing.assert_close(record.inputs[0]["student"].detach(), outputs.outputs[expected], rtol=0, atol=0)


# --- wrapped denoisers, failed fits, short runs --------------------------------------------------------


class PeftModel(nn.Module):
    """The layout of peft's PeftModel (`base_model.model` is the wrapped model), for the unwrapping test."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.base_model = nn.Module()
        self.base_model.model = model

    def forward(self, *args, **kwargs):
        return self.base_model.model(*args, **kwargs)


@pytest.mark.parametrize("wrap", ["compile", "peft"])
def test_wrapped_denoisers_are_unwrapped(wrap, repa_options):
    module = TinyFlow("sd3")
    inner = module.transformer
    module.transformer = torch.compile(inner, backend="eager") if wrap == "compile" else PeftModel(inner)
    repa = RepaCallback(family="sd3", block_index=1, **repa_options)
    record = Recorder(repa)
    trainer(2, [repa, record]).fit(module, loader("sd3"))
    assert repa.denoiser is inner and len(record.inputs) == 2
    assert all(not torch.equal(v, record.initial[k]) for k, v in module.repa_projector.state_dict().items())


def test_another_class_names_the_attribute_the_search_picked(repa_options):
    module = TinyFlow("sd3")
    module.denoiser = nn.Linear(2, 2)  # found first by the default search
    with pytest.raises(ValueError, match=r"found at `denoiser` by the default search .* set `denoiser` to the dotted "
                                         r"path of the SD3Transformer2DModel"):
        trainer(1, [RepaCallback(family="sd3", block_index=1, **repa_options)]).fit(module, loader("sd3"))


def test_a_failed_fit_leaves_the_module_as_it_was(repa_options):
    module = TinyFlow("sd3")
    with pytest.raises(KeyError, match="batch has no 'clean'"):
        trainer(1, [RepaCallback(family="sd3", block_index=1, latents_key="clean", **repa_options)]).fit(
            module, loader("sd3"))
    assert not hasattr(module, "repa_projector") and "training_step" not in module.__dict__
    backbone = RepaCallback(family="sd3", block_index=0, teacher="backbone", teacher_block_index=2)
    trainer(1, [backbone]).fit(module, loader("sd3"))  # the corrected fit, with another teacher
    assert module.repa_projector.out_dim == 32


def test_repa_values_reach_the_loggers_as_lightning_decides_for_the_modules_own(tmp_path, repa_options):
    """`repa/*` goes through `pl_module.log`: every step into `callback_metrics`, and into the loggers on the
    steps Lightning writes (every `log_every_n_steps`), exactly like the module's own `train/loss`."""
    for every, steps in ((2, 5), (50, 3)):
        csv = CSVLogger(tmp_path, name=f"csv{every}")
        repa = RepaCallback(family="sd3", block_index=1, **repa_options)
        t = trainer(steps, [repa], logger=[csv], log_every_n_steps=every)
        t.fit(TinyFlow("sd3"), loader("sd3", n=12))
        assert float(t.callback_metrics["repa/similarity"]) == pytest.approx(float(repa.last_result.similarity))
        path = Path(csv.log_dir) / "metrics.csv"
        rows = list(csv_module.DictReader(path.open())) if path.exists() else []
        repa_steps = [r["step"] for r in rows if r.get("repa/similarity")]
        own_steps = [r["step"] for r in rows if r.get("train/loss")]
        assert repa_steps == own_steps and len(repa_steps) == steps // every


class _Validates(TinyFlow):
    def validation_step(self, batch, batch_idx):
        x0 = batch["latents"]
        pred = self.fam.forward(self.transformer, x0, torch.full((x0.shape[0],), 0.5), self.fam.make_cond(x0.shape[0]))
        self.log("val/loss", (pred - x0).pow(2).mean())


def test_cknna_on_a_held_out_batch_every_n_steps(repa_options):
    """`cknna_every_n_steps`: the CKNNA of the pooled projected tokens vs the pooled teacher tokens of the
    first validation batch, equal to the formula on the tokens the objective aligns."""
    from lightning_repa.maths.kernel_alignment import cknna

    repa = RepaCallback(family="sd3", block_index=1, cknna_every_n_steps=2, **repa_options)
    logged = []

    class Read(L.Callback):
        def on_validation_end(self, trainer, pl_module):
            if "repa/cknna" in trainer.callback_metrics:
                logged.append((trainer.global_step, float(trainer.callback_metrics["repa/cknna"])))

    module = _Validates("sd3", lr=0.0)
    trainer(4, [repa, Read()], val_check_interval=1, limit_val_batches=2, num_sanity_val_steps=0,
            check_val_every_n_epoch=None).fit(module, loader("sd3", n=16, batch_size=8), loader("sd3", n=8, batch_size=8))
    assert [s for s, _ in logged][:1] == [1] and len({v for _, v in logged}) >= 1
    batch = next(iter(loader("sd3", n=8, batch_size=8)))
    student = []
    h = module.transformer.transformer_blocks[1].register_forward_hook(lambda m, a, o: student.append(o[1]))
    encoder = load_encoder("dinov2_vits14", image_size=56, checkpoint=repa_options["encoder_checkpoint"])
    with torch.no_grad():  # the expected value from the encoder, the projector and torch alone
        x0 = batch["latents"]
        module.fam.forward(module.transformer, x0, torch.full((8,), 0.5), module.fam.make_cond(8))
        f = encoder(batch["pixels"])  # (B, M, D)
        gh, gw = encoder.grid_for(*batch["pixels"].shape[-2:])
        p = module.repa_projector(student[0], (4, 8))  # (B, 32, D) on the 4x8 student grid
        p = torch.nn.functional.interpolate(p.transpose(1, 2).reshape(8, -1, 4, 8), size=(gh, gw), mode="bilinear",
                                            align_corners=False, antialias=gh < 4 or gw < 8).flatten(2).transpose(1, 2)
    h.remove()
    unit = lambda x: x / x.norm(dim=-1, keepdim=True)
    assert logged[-1][1] == pytest.approx(cknna(unit(p.mean(1)), unit(f.mean(1)), k=7), abs=1e-6)
