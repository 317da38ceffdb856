"""Every refusal says what happened and what to do, and nothing is a silent no-op (issue 19, items 4
and 6 to 11): options, reused callbacks, checkpoints with and without REPA, misleading messages."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.checkpoint import checkpoint

from helpers import Recorder, TinyFlow, loader, trainer
from lightning_repa import RepaCallback, RepaConfig, family_from_dict, strip_projectors


# --- options ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("option", ["lam", "lambda_end", "manifold_weight", "tau", "power", "irepa_alpha"])
@pytest.mark.parametrize("value", [math.inf, math.nan])
def test_non_finite_option_values_are_refused_at_construction(option, value):
    family = {"manifold_weight": "sdxl", "tau": "wan"}.get(option, "flux")
    with pytest.raises(ValueError, match=rf"`{option}` must be .*finite.*got {value}"):
        RepaConfig(family=family, **{option: value}, **({"irepa": True} if option == "irepa_alpha" else {}))


def test_batch_scope_manifold_at_batch_size_one_is_refused_before_the_first_step(repa_options):
    repa = RepaCallback(family="sdxl", manifold_scope="batch", warmup_steps=3, **repa_options)
    fit = trainer(4, [repa])  # the warm-up ends within the run (no warning); the weight is 0 at step 0
    with pytest.raises(ValueError, match=r"manifold_scope=.batch.*batch of 1.*manifold_scope=.tokens."):
        fit.fit(TinyFlow("sdxl"), loader("sdxl", batch_size=1, hw=(8, 8)))
    assert fit.global_step == 0


@pytest.mark.parametrize("kind", ["constant", "linear"])
def test_a_warm_up_longer_than_the_run_warns(kind, repa_options):
    extra = {"decay_steps": 10} if kind == "linear" else {}
    repa = RepaCallback(family="sd3", block_index=1, schedule=kind, warmup_steps=5, **extra, **repa_options)
    with pytest.warns(UserWarning, match=r"warmup_steps=5.*max_steps=2.*never reaches lam"):
        trainer(2, [repa]).fit(TinyFlow("sd3"), loader("sd3"))


def test_cknna_without_a_validation_loop_warns(repa_options):
    repa = RepaCallback(family="sd3", block_index=1, cknna_every_n_steps=1, **repa_options)
    with pytest.warns(UserWarning, match=r"cknna_every_n_steps.*no validation loop"):
        trainer(1, [repa]).fit(TinyFlow("sd3"), loader("sd3"))


# --- a callback used for a second fit -------------------------------------------------------------------


def test_a_reused_callback_starts_the_next_fit_fresh(repa_options):
    repa = RepaCallback(family="sd3", block_index=1, similarity_threshold=-1.0, **repa_options)  # trips at once
    record = Recorder(repa)
    trainer(2, [repa, record]).fit(TinyFlow("sd3"), loader("sd3"))
    assert repa.cutoff.tripped_at == 0 and [r.weight for r in record.results] == [0.5, 0.0]
    record = Recorder(repa)
    trainer(1, [repa, record]).fit(TinyFlow("sd3"), loader("sd3"))  # a new model, no checkpoint
    assert record.results[0].weight == 0.5 and record.results[0].measured


# --- checkpoints with and without REPA ------------------------------------------------------------------


def _checkpoint(tmp_path: Path, callbacks: list, steps: int = 2, name: str = "a") -> Path:
    ckpt = ModelCheckpoint(dirpath=tmp_path / name, save_last=True)
    trainer(steps, [*callbacks, ckpt], enable_checkpointing=True).fit(TinyFlow("sd3", optimizer="adamw"),
                                                                      loader("sd3", n=8))
    return Path(ckpt.last_model_path)


def test_a_plain_run_resumes_with_repa_and_a_fresh_projector(tmp_path, repa_options):
    plain = _checkpoint(tmp_path, [])
    repa = RepaCallback(family="sd3", block_index=1, **repa_options)
    record = Recorder(repa)
    with pytest.warns(UserWarning, match=r"no REPA projector.*repa_projector.*starts fresh"):
        trainer(4, [repa, record]).fit(TinyFlow("sd3", optimizer="adamw"), loader("sd3", n=8), ckpt_path=str(plain))
    assert [r.step for r in record.results] == [2, 3]


def test_a_repa_checkpoint_loads_without_the_callback_after_stripping(tmp_path, repa_options):
    path = _checkpoint(tmp_path, [RepaCallback(family="sd3", block_index=1, **repa_options)])
    with pytest.raises(RuntimeError, match=r"repa_projector"):
        TinyFlow.load_from_checkpoint(path, family="sd3")
    with pytest.warns(UserWarning, match=r"Found keys that are not in the model state dict.*repa_projector"):
        loaded = TinyFlow.load_from_checkpoint(path, family="sd3", strict=False)  # the documented fix, one
    stripped = strip_projectors(path, tmp_path / "plain.ckpt")  # the other
    again = TinyFlow.load_from_checkpoint(stripped, family="sd3")
    for key, value in loaded.state_dict().items():
        torch.testing.assert_close(again.state_dict()[key], value, rtol=0, atol=0)
    trainer(3, []).fit(TinyFlow("sd3", optimizer="adamw"), loader("sd3", n=8), ckpt_path=str(stripped))


@pytest.mark.parametrize("change, named", [(dict(encoder_image_size=56, projector="mlp"), "projector"),
                                           (dict(teacher="backbone", teacher_block_index=2, lam=0.1), "teacher")])
def test_a_changed_projector_or_teacher_is_a_clear_error(change, named, tmp_path, repa_options):
    path = _checkpoint(tmp_path, [RepaCallback(family="sd3", block_index=1, **repa_options)])
    options = {**repa_options, **change}
    if named == "teacher":
        options = {k: v for k, v in options.items() if k not in ("encoder", "encoder_checkpoint",
                                                                  "encoder_image_size", "decoder")}
    repa = RepaCallback(family="sd3", block_index=1, **options)
    with pytest.raises(ValueError, match=rf"repa_projector.*{named}.*strip_projectors"):
        trainer(3, [repa]).fit(TinyFlow("sd3", optimizer="adamw"), loader("sd3", n=8), ckpt_path=str(path))


def test_resuming_with_another_block_or_schedule_warns(tmp_path, repa_options):
    path = _checkpoint(tmp_path, [RepaCallback(family="sd3", block_index=1, **repa_options)])
    repa = RepaCallback(family="sd3", block_index=2, lam=0.2, schedule="cosine", decay_steps=5, **repa_options)
    with pytest.warns(UserWarning, match=r"block_index: 1 -> 2.*lam: 0\.5 -> 0\.2.*schedule: 'constant' -> 'cosine'"):
        trainer(3, [repa]).fit(TinyFlow("sd3", optimizer="adamw"), loader("sd3", n=8), ckpt_path=str(path))


def test_two_named_callbacks_on_one_block_and_encoder(tmp_path, repa_options):
    a = RepaCallback(family="sd3", block_index=1, name="a", **repa_options)
    b = RepaCallback(family="sd3", block_index=1, name="b", lam=0.1, **repa_options)
    fit = trainer(2, [a, b])
    fit.fit(TinyFlow("sd3"), loader("sd3"))
    assert a.state_key != b.state_key and {"repa/a/similarity", "repa/b/similarity"} <= set(fit.callback_metrics)


# --- messages that say what happened --------------------------------------------------------------------


class _TwoCalls(TinyFlow):
    def training_step(self, batch, batch_idx):
        x0 = batch["latents"]
        cond = self.fam.make_cond(x0.shape[0])
        t = torch.full((x0.shape[0],), 0.5)
        a = self.fam.forward(self.transformer, x0, t, cond)
        b = self.fam.forward(self.transformer, x0, t, cond)
        return (a - x0).pow(2).mean() + (b - x0).pow(2).mean()


def test_a_predicate_that_accepts_no_call(repa_options):
    repa = RepaCallback(family="sd3", block_index=1, align_call=lambda call: False, **repa_options)
    with pytest.raises(RuntimeError, match=r"align_call.*accepted none of the 2 denoiser calls"):
        trainer(1, [repa]).fit(_TwoCalls("sd3"), loader("sd3"))


def test_a_predicate_that_reads_a_missing_argument(repa_options):
    repa = RepaCallback(family="sd3", block_index=1, align_call=lambda call: call["guidance"] is None, **repa_options)
    with pytest.raises(KeyError, match=r"align_call.*'guidance'.*arguments of this call: .*hidden_states"):
        trainer(1, [repa]).fit(_TwoCalls("sd3"), loader("sd3"))


class _WholeCallCheckpointed(TinyFlow):
    def training_step(self, batch, batch_idx):
        x0 = batch["latents"]
        cond = self.fam.make_cond(x0.shape[0])
        t = torch.full((x0.shape[0],), 0.5)
        pred = checkpoint(lambda x: self.fam.forward(self.transformer, x, t, cond), x0, use_reentrant=True)
        return (pred - x0).pow(2).mean()


def test_a_reentrant_checkpoint_around_the_whole_denoiser_call(repa_options):
    repa = RepaCallback(family="sd3", block_index=1, **repa_options)
    with pytest.raises(RuntimeError, match=r"ran 1 time without gradients.*use_reentrant=False"), \
            pytest.warns(UserWarning, match=r"None of the inputs have requires_grad=True"):  # torch's, on that call
        trainer(1, [repa]).fit(_WholeCallCheckpointed("sd3"), loader("sd3"))


class _TwiceManual(TinyFlow):
    def __init__(self) -> None:
        super().__init__("sd3")
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        repa = next(cb for cb in self.trainer.callbacks if isinstance(cb, RepaCallback))
        loss = super().training_step(batch, batch_idx)
        loss = loss + repa.compute_loss(batch) + repa.compute_loss(batch)
        self.manual_backward(loss)
        return loss


def test_compute_loss_twice_in_one_step(repa_options):
    repa = RepaCallback(family="sd3", block_index=1, **repa_options)
    with pytest.raises(RuntimeError, match=r"compute_loss.*twice.*once per training_step"):
        trainer(1, [repa]).fit(_TwiceManual(), loader("sd3"))


# --- declared families ----------------------------------------------------------------------------------


def test_declared_family_errors_name_the_fix(repa_options):
    base = {"name": "mine", "classes": ["SD3Transformer2DModel"], "default_block_index": 1}
    with pytest.raises(ValueError, match=r"`blocks` must be a list.*\[\{'attr': 'transformer_blocks'"):
        family_from_dict({**base, "blocks": "transformer_blocks"})
    for block, what in (({"attr": "transformer_blocks"}, r"returns a tuple of 2.*set `output`"),
                        ({"attr": "transformer_blocks", "output": 5}, r"output=5.*tuple of 2.*0 or 1")):
        repa = RepaCallback(family={**base, "blocks": [block]}, **repa_options)
        with pytest.raises(ValueError, match=what):
            trainer(1, [repa]).fit(TinyFlow("sd3"), loader("sd3"))
