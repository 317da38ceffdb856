"""Bad input fails with a clear error that names the option and the fix, before any optimizer step."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from helpers import TinyFlow, loader, trainer
from lightning_repa import RepaCallback
from lightning_repa.config import RepaConfig


class _NoStep(L.Callback):
    """Fails the test if an optimizer step is ever reached."""

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        raise AssertionError("an optimizer step ran before the error")


def _fit_error(module: L.LightningModule, repa: RepaCallback, family: str = "flux", **data) -> pytest.ExceptionInfo:
    with pytest.raises(Exception) as info:
        trainer(2, [repa, _NoStep()]).fit(module, loader(family, **data))
    assert not isinstance(info.value, AssertionError), info.value
    return info


# --- at construction ------------------------------------------------------------------------
def test_unknown_family_names_the_closest():
    with pytest.raises(ValueError, match=r"unknown `family` 'fluxx'.*did you mean 'flux'"):
        RepaCallback(family="fluxx")


def test_unknown_option_names_the_closest():
    with pytest.raises(TypeError, match=r"unknown RepaCallback option `block_idx`.*`block_index`"):
        RepaCallback(family="flux", block_idx=3)


def test_method_that_does_not_fit_the_family_names_the_right_one():
    with pytest.raises(ValueError, match=r"method='urepa' does not fit family='flux'; use method='repa'"):
        RepaCallback(family="flux", method="urepa")


@pytest.mark.parametrize("options,match", [
    (dict(schedule="exponential"), r"`schedule` must be one of .*'cosine'.*got 'exponential'"),
    (dict(threshold_mode="sometimes"), r"`threshold_mode` must be one of"),
    (dict(lam=-1.0), r"`lam` must be a weight >= 0"),
    (dict(manifold_weight=-0.5), r"`manifold_weight`"),
    (dict(similarity_threshold=1.5), r"`similarity_threshold`"),
    (dict(teacher="backbone"), r"needs `teacher_block_index`"),
    (dict(teacher="backbone", block_index=4, teacher_block_index=4), r"must be greater than `block_index`"),
    (dict(teacher_block_index=6), r"only used with `teacher=backbone`"),
    (dict(decoder="tae"), r"`decoder=tae` needs `tae_checkpoint`"),
    (dict(irepa=True, projector="mlp"), r"irepa=True.*conv projector"),
    (dict(pixels_range=[0, 255]), r"`pixels_range`"),
    # options the chosen method, decoder, teacher or projector never reads: errors, not no-ops
    (dict(distance=3), r"`distance` is a crepa option; it has no effect with method='repa'"),
    (dict(manifold_weight=1.0), r"`manifold_weight` is a urepa option"),
    (dict(tae_checkpoint="taef2_decoder.pth"), r"`tae_checkpoint` is only read with decoder=tae"),
    (dict(teacher="backbone", block_index=1, teacher_block_index=2, encoder_checkpoint="w.pth"),
     r"`encoder_checkpoint` is only read with teacher=encoder"),
    (dict(projector_hidden=512), r"`projector_hidden` is only read with projector=mlp"),
    (dict(decoder="vae", pixels_key="images"), r"`pixels_key` is only read with decoder=pixels"),
    (dict(irepa_alpha=0.5), r"`irepa_alpha` is only read with irepa=True"),
    (dict(ids_key="index"), r"`ids_key` is only read with a teacher cache"),
    (dict(cache="disk"), r"`cache=disk` needs `cache_dir`"),
    (dict(cache_dir="/tmp/x"), r"`cache_dir` is only read with cache=disk"),
])
def test_bad_values_are_refused_at_construction(options, match):
    with pytest.raises(ValueError, match=match):
        RepaCallback(family="flux", **options)


def test_explicit_zero_means_zero():
    cfg = RepaConfig(family="sd15", manifold_weight=0.0, lam=0.0)
    assert cfg.manifold_weight == 0.0 and cfg.lam == 0.0
    assert RepaCallback(cfg).objective.manifold_weight == 0.0


# --- at fit start, before any optimizer step -----------------------------------------------
def test_block_index_out_of_range_says_how_many_blocks(repa_options):
    info = _fit_error(TinyFlow("flux"), RepaCallback(family="flux", block_index=4, **repa_options))
    assert isinstance(info.value, IndexError)
    assert "block index 4" in str(info.value) and "has 4 blocks" in str(info.value)
    assert "transformer_blocks: 2" in str(info.value) and "use 0..3" in str(info.value)


def test_denoiser_of_another_family(repa_options):
    info = _fit_error(TinyFlow("sd3"), RepaCallback(family="flux", block_index=1, **repa_options), family="sd3")
    assert "family='flux' expects a denoiser of class FluxTransformer2DModel" in str(info.value)
    assert "set family=sd3" in str(info.value)


class _Hidden(TinyFlow):
    def __init__(self) -> None:
        super().__init__("flux")
        self.net = self.transformer
        del self.transformer

    def training_step(self, batch, batch_idx):
        self.transformer = self.net
        return super().training_step(batch, batch_idx)


def test_denoiser_not_found_names_the_option(repa_options):
    info = _fit_error(_Hidden(), RepaCallback(family="flux", block_index=1, **repa_options))
    assert "found no denoiser" in str(info.value) and "set `denoiser`" in str(info.value)
    # and the documented fix works
    module = _Hidden()
    trainer(1, [RepaCallback(family="flux", block_index=1, denoiser="net", **repa_options)]).fit(module, loader("flux"))
    assert module.repa_projector is not None


def test_missing_latents_key(repa_options):
    info = _fit_error(TinyFlow("flux"), RepaCallback(family="flux", block_index=1, latents_key="z", **repa_options))
    assert isinstance(info.value, KeyError)
    assert "batch has no 'z'" in str(info.value) and "set `latents_key`" in str(info.value)


def test_missing_pixels_key(repa_options):
    repa = RepaCallback(family="flux", block_index=1, **{**repa_options, "pixels_key": "images"})
    info = _fit_error(TinyFlow("flux"), repa)
    assert "decoder=pixels reads batch['images']" in str(info.value)


def test_missing_vae_for_decoder_vae(repa_options):
    repa = RepaCallback(family="flux", block_index=1, **{**repa_options, "decoder": "vae"})
    info = _fit_error(TinyFlow("flux"), repa)
    assert "needs the VAE at `vae_attr`='vae'" in str(info.value)


def test_encoder_image_size_that_does_not_fit_the_patch(repa_options):
    repa = RepaCallback(family="flux", block_index=1, **{**repa_options, "encoder_image_size": 50})
    info = _fit_error(TinyFlow("flux"), repa)
    assert "encoder_image_size" in str(info.value)


def test_projector_of_another_encoder_dimension(repa_options):
    module = TinyFlow("flux")
    trainer(1, [RepaCallback(family="flux", block_index=1, **repa_options)]).fit(module, loader("flux"))
    module.repa_projector = type(module.repa_projector)(32, 768)  # as if trained against a ViT-B
    info = _fit_error(module, RepaCallback(family="flux", block_index=1, **repa_options))
    assert "maps 32 -> 768" in str(info.value) and "dimension 384" in str(info.value)


class _OwnOptimizer(TinyFlow):
    def configure_optimizers(self):
        return torch.optim.SGD(self.transformer.parameters(), lr=0.1)


def test_projector_left_out_of_the_optimizer(repa_options):
    info = _fit_error(_OwnOptimizer("flux"), RepaCallback(family="flux", block_index=1, **repa_options))
    assert "is not in any optimizer" in str(info.value) and "self.parameters()" in str(info.value)


def test_hooks_and_wrapper_are_removed_after_an_error(repa_options):
    module = TinyFlow("flux")
    _fit_error(module, RepaCallback(family="flux", block_index=1, latents_key="z", **repa_options))
    assert "training_step" not in module.__dict__
    blocks = list(module.transformer.transformer_blocks) + list(module.transformer.single_transformer_blocks)
    assert not module.transformer._forward_pre_hooks and not any(b._forward_hooks for b in blocks)
