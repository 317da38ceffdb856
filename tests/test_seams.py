"""The seams between the callback and its parts: pure modules free of Lightning, the teacher
protocol, the gate, the denoiser lookup, the batch options, and the cutoff's saved settings."""

from __future__ import annotations


import lightning as L
import pytest
import torch
from torch import nn

from helpers import LatentData, Recorder, TinyFlow, loader, trainer
from lightning_repa import RepaCallback
from lightning_repa.models.capture import Captured
from lightning_repa.config import Method, RepaConfig
from lightning_repa.objectives import OBJECTIVES, build_objective
from lightning_repa.schedule import Cutoff, Gate, WeightSchedule
from lightning_repa.models.surgery import find_denoiser
from lightning_repa.teachers import BackboneTeacher, EncoderTeacher
from test_decoders import _tiny_kl

def test_every_method_has_one_objective_and_declares_its_options():
    assert set(OBJECTIVES) == set(Method)
    owners = {}
    for method, objective in OBJECTIVES.items():
        for option in objective.options:
            assert option not in owners, f"{option} declared by {owners.get(option)} and {method}"
            owners[option] = method
    assert owners["manifold_weight"] is Method.urepa and owners["tau"] is Method.crepa
    with pytest.raises(ValueError, match=r"`tau` is a crepa option; it has no effect with method='urepa'"):
        RepaConfig(family="sd15", tau=2.0)
    assert build_objective(Method.urepa, RepaConfig(family="sd15", manifold_scope="batch")).manifold_scope == "batch"


def test_ranges_are_checked_in_one_place_with_one_wording():
    with pytest.raises(ValueError) as from_config:
        RepaConfig(warmup_steps=-1)
    with pytest.raises(ValueError) as from_schedule:
        WeightSchedule(warmup_steps=-1)
    assert str(from_config.value) == str(from_schedule.value) == "`warmup_steps` must be an integer >= 0, got -1"
    with pytest.raises(ValueError) as from_config:
        RepaConfig(similarity_ema_decay=1.0)
    with pytest.raises(ValueError) as from_cutoff:
        Cutoff(ema_decay=1.0)
    assert str(from_config.value) == str(from_cutoff.value)


def test_backbone_block_order_uses_the_family_default_without_a_model():
    with pytest.raises(ValueError, match=r"`teacher_block_index` \(8\) must be greater than `block_index` \(8 "
                                         r"\(the family default"):
        RepaConfig(family="flux", teacher="backbone", teacher_block_index=8)
    assert RepaConfig(family="pixart", teacher="backbone", teacher_block_index=11).teacher_block_index == 11


# --- the gate ---------------------------------------------------------------------------------------


def test_gate_decides_weight_and_measurement_in_one_place():
    schedule = WeightSchedule("linear", lam=1.0, warmup_steps=2, decay_steps=4, lambda_end=0.0)
    # weights: 0, 0.5, 1, 0.75, 0.5, 0.25, 0 ...
    step_cut = Gate(schedule, Cutoff(cutoff_step=4))
    assert [(p.weight, p.measure) for p in map(step_cut.plan, range(6))] == [
        (0.0, False), (0.5, True), (1.0, True), (0.75, True), (0.0, False), (0.0, False)]
    recoverable = Cutoff(threshold=0.5, ema_decay=0.5, mode="recoverable", cutoff_step=5)
    recoverable.update(0.9, step=0)  # EMA 0.9 >= 0.5: off, but it must keep measuring to come back
    gate = Gate(schedule, recoverable)
    assert [(p.weight, p.measure) for p in map(gate.plan, (0, 1, 4, 5))] == [
        (0.0, False), (0.0, True), (0.0, True), (0.0, False)]  # step 0: scheduled 0; step 5: step cutoff
    permanent = Cutoff(threshold=0.5, ema_decay=0.5)
    permanent.update(0.9, step=0)
    assert [(p.weight, p.measure) for p in map(Gate(schedule, permanent).plan, (1, 2))] == [(0.0, False)] * 2


# --- the teacher protocol -------------------------------------------------------------------------


def test_backbone_teacher_returns_the_deeper_block_detached_on_the_student_grid():
    deeper = torch.randn(2, 6, 8, requires_grad=True)
    out = BackboneTeacher(3)({}, torch.zeros(1), Captured({1: torch.zeros(2, 6, 8), 3: deeper}, (2, 3)))
    assert out.grid == (2, 3) and torch.equal(out.tokens, deeper) and not out.tokens.requires_grad
    assert out.frames_per_latent is None


class _Encoder(nn.Module):
    """Deterministic per-image encoder with batch-size-independent output: mean colour per 2x2 patch."""

    embed_dim = 3

    def grid_for(self, h, w):
        return h // 2, w // 2

    def forward(self, x):
        return nn.functional.avg_pool2d(x, 2).flatten(2).transpose(1, 2)  # (B, h/2*w/2, 3)


def test_encoder_teacher_chunks_give_the_same_tokens():
    pixels = torch.rand(5, 3, 4, 6)
    whole = EncoderTeacher(_Encoder(), None, batch_size=0)({"pixels": pixels}, torch.zeros(5, 4, 2, 3))
    chunked = EncoderTeacher(_Encoder(), None, batch_size=2)({"pixels": pixels}, torch.zeros(5, 4, 2, 3))
    assert whole.grid == chunked.grid == (2, 3)
    torch.testing.assert_close(whole.tokens, chunked.tokens, rtol=0, atol=0)


def _similarity(options: dict, module: L.LightningModule, data: torch.utils.data.Dataset) -> float:
    repa = RepaCallback(family="sd3", block_index=1, **options)
    record = Recorder(repa)
    L.seed_everything(0)
    trainer(1, [repa, record]).fit(module, torch.utils.data.DataLoader(data, batch_size=4))
    return float(record.results[0].similarity)


class _Scaled(torch.utils.data.Dataset):
    """LatentData with the pixels mapped to [-1, 1]."""

    def __init__(self) -> None:
        self.data = LatentData("sd3", n=4)

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        item = self.data[i]
        return {**item, "pixels": item["pixels"] * 2 - 1}


@pytest.mark.parametrize("chunk", [1, 3])
def test_encoder_batch_size_through_the_callback(chunk, repa_options):
    plain = _similarity(repa_options, TinyFlow("sd3", lr=0.0), LatentData("sd3", n=4))
    chunked = _similarity({**repa_options, "encoder_batch_size": chunk}, TinyFlow("sd3", lr=0.0), LatentData("sd3", n=4))
    assert chunked == pytest.approx(plain, abs=1e-6)


def test_pixels_range_minus_one_one_through_the_callback(repa_options):
    plain = _similarity(repa_options, TinyFlow("sd3", lr=0.0), LatentData("sd3", n=4))
    scaled = _similarity({**repa_options, "pixels_range": [-1, 1]}, TinyFlow("sd3", lr=0.0), _Scaled())
    assert scaled == pytest.approx(plain, abs=1e-5)
    with pytest.raises(ValueError, match=r"pixels_range=\[-1, 1\]"):  # [-1, 1] read as [0, 1] would be clipped
        _similarity(repa_options, TinyFlow("sd3", lr=0.0), _Scaled())


class _Nested(TinyFlow):
    """The VAE at a dotted path, `self.autoencoders.vae`."""

    def __init__(self) -> None:
        super().__init__("sd3", lr=0.0)
        self.autoencoders = nn.Module()
        self.autoencoders.vae = _tiny_kl(scaling_factor=1.3).requires_grad_(False)


def test_dotted_vae_attr_decodes_with_that_vae(repa_options):
    options = {**repa_options, "decoder": "vae", "vae_attr": "autoencoders.vae"}
    repa = RepaCallback(family="sd3", block_index=1, **options)
    module = _Nested()
    trainer(1, [repa]).fit(module, loader("sd3"))
    latents = torch.randn(2, 4, 8, 16)
    want = ((module.autoencoders.vae.decode(latents / 1.3).sample + 1) / 2).clamp(0, 1)
    torch.testing.assert_close(repa.teacher.images({}, latents), want)
    with pytest.raises(ValueError, match=r"`vae_attr`='autoencoders.vae2'"):
        trainer(1, [RepaCallback(family="sd3", block_index=1, **{**options, "vae_attr": "autoencoders.vae2"})]).fit(
            _Nested(), loader("sd3"))


# --- the denoiser lookup ------------------------------------------------------------------------


class _Two(TinyFlow):
    """An sd3 transformer at `transformer`, and other modules where the lookup would look later/earlier."""

    def __init__(self, first: str) -> None:
        super().__init__("sd3")
        self.model = TinyFlow("pixart").transformer  # looked at last
        if first == "denoiser":
            self.denoiser, self.transformer = self.transformer, TinyFlow("pixart").transformer
        elif first == "unet":
            self.unet = TinyFlow("pixart").transformer  # transformer comes before unet


@pytest.mark.parametrize("first", ["denoiser", "transformer", "unet"])
def test_denoiser_lookup_order(first):
    module = _Two(first)
    found, path = find_denoiser(module, None)
    want = {"denoiser": "denoiser", "transformer": "transformer", "unet": "transformer"}[first]
    assert path == want and found is getattr(module, want)
    assert type(found).__name__ == "SD3Transformer2DModel"


def test_dotted_denoiser_path_and_the_error_that_names_it(repa_options):
    module = TinyFlow("sd3")
    module.wrapper = nn.Module()
    module.wrapper.net = module.transformer
    assert find_denoiser(module, "wrapper.net")[0] is module.transformer
    with pytest.raises(ValueError, match=r"found no denoiser on TinyFlow \(looked at `wrapper.nett`\)"):
        trainer(1, [RepaCallback(family="sd3", block_index=1, denoiser="wrapper.nett", **repa_options)]).fit(
            module, loader("sd3"))


# --- saved cutoff settings --------------------------------------------------------------------------


def test_resuming_with_other_cutoff_settings_warns_and_says_what_changed(tmp_path, repa_options):
    from lightning.pytorch.callbacks import ModelCheckpoint

    def fit(threshold, steps, **kwargs):
        repa = RepaCallback(family="sd3", block_index=1, similarity_threshold=threshold, similarity_ema_decay=0.9,
                            **repa_options)
        ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_top_k=-1)
        record = Recorder(repa)
        trainer(steps, [repa, record, ckpt], enable_checkpointing=True).fit(TinyFlow("sd3"), loader("sd3", n=8),
                                                                            **kwargs)
        return repa, record

    first, _ = fit(0.95, 2)
    saved = torch.load(next(tmp_path.glob("*.ckpt")), weights_only=False)["callbacks"][first.state_key]
    assert saved["cutoff"]["settings"] == {"cutoff_step": 0, "threshold": 0.95, "ema_decay": 0.9, "mode": "permanent"}
    with pytest.warns(UserWarning, match=r"threshold: 0.95 -> 0.5"):
        resumed, record = fit(0.5, 3, ckpt_path=str(next(tmp_path.glob("*.ckpt"))))
    assert resumed.cutoff.threshold == 0.5 and [s["step"] for s in record.steps] == [2]
    # the saved EMA was kept and moved once: 0.9 * saved + 0.1 * step 2's similarity
    assert resumed.cutoff.ema == pytest.approx(0.9 * saved["cutoff"]["ema"] + 0.1 * record.steps[0]["similarity"])


def test_old_checkpoints_without_settings_load_silently():
    c = Cutoff(threshold=0.5)
    assert c.load_state_dict({"ema": 0.3, "tripped_at": None, "below": True}) == []
    assert c.ema == 0.3
