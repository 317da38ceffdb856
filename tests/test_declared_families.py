"""Families declared as data for classes the package does not ship (CogView4 here), from Python and
from Hydra, and LayerSync (the backbone teacher with the identity projector)."""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from diffusers import CogView4Transformer2DModel
from hydra import compose, initialize_config_module
from torch.utils.data import DataLoader

from helpers import LatentData, Recorder, TinyFlow, loader, trainer
from lightning_repa import RepaCallback
from lightning_repa.models.families import BlockList, Family, family_from_dict

COGVIEW4 = {"name": "cogview4", "classes": ["CogView4Transformer2DModel"],
            "blocks": [{"attr": "transformer_blocks", "output": 0}], "default_block_index": 8}


class _CogView4(L.LightningModule):
    """Rectified flow on a tiny CogView4 (blocks return (image, text); patch 2), as its pipeline calls it."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.transformer = CogView4Transformer2DModel(
            patch_size=2, in_channels=4, out_channels=4, num_layers=3, attention_head_dim=16, num_attention_heads=2,
            text_embed_dim=32, time_embed_dim=32, condition_dim=8, pos_embed_max_size=16, sample_size=8,
            rope_axes_dim=(8, 8))

    def training_step(self, batch, batch_idx):
        x0 = batch["latents"]  # (B, 4, h, w)
        b = x0.shape[0]
        g = torch.Generator().manual_seed(self.global_step)
        noise, t = torch.randn(x0.shape, generator=g), torch.rand(b, generator=g)
        x_t = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * noise
        size = torch.tensor([[x0.shape[-2] * 8.0, x0.shape[-1] * 8.0]] * b)
        pred = self.transformer(hidden_states=x_t, encoder_hidden_states=torch.randn(b, 5, 32, generator=g),
                                timestep=t * 1000, original_size=size, target_size=size,
                                crop_coords=torch.zeros(b, 2), return_dict=False)[0]
        return F.mse_loss(pred, noise - x0)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-2)


class _ImageStream(L.Callback):
    def on_fit_start(self, trainer, pl_module):
        self.outputs = []
        pl_module.transformer.transformer_blocks[1].register_forward_hook(
            lambda m, a, out: self.outputs.append(out[0].detach().clone()))


@pytest.mark.parametrize("how", ["dict", "family"])
def test_a_declared_family_trains_a_class_the_package_does_not_ship(how, repa_options):
    family = COGVIEW4 if how == "dict" else Family(
        "cogview4", RepaCallback(family="flux").method, ("CogView4Transformer2DModel",),
        (BlockList("transformer_blocks", output=0),), 8)
    repa = RepaCallback(family=family, block_index=1, **repa_options)
    record, stream = Recorder(repa), _ImageStream()
    module = _CogView4()
    trainer(3, [repa, record, stream]).fit(module, DataLoader(LatentData("sd3", n=6), batch_size=2))
    assert len(record.inputs) == 3 and record.inputs[0]["grid_s"] == (4, 8)  # 8x16 latents, patch 2
    for inputs, out in zip(record.inputs, stream.outputs):
        torch.testing.assert_close(inputs["student"].detach(), out, rtol=0, atol=0)
    assert all(not torch.equal(v, record.initial[k]) for k, v in module.repa_projector.state_dict().items())
    assert repa.state_key.startswith("RepaCallback{'family': 'cogview4'")


def test_a_family_declared_in_a_hydra_file(tmp_path, repa_options):
    (tmp_path / "family").mkdir()
    (tmp_path / "family" / "cogview4.yaml").write_text(
        "# @package repa\n"
        "family:\n"
        "  name: cogview4\n"
        "  classes: [CogView4Transformer2DModel]\n"
        "  blocks:\n"
        "    - {attr: transformer_blocks, output: 0}   # (image, text): the image stream first\n"
        "  default_block_index: 8\n"
    )
    with initialize_config_module(version_base="1.3", config_module="lightning_repa.conf"):
        cfg = compose(config_name="config", overrides=[f"hydra.searchpath=[file://{tmp_path}]", "family=cogview4",
                                                       "repa.block_index=1"])
    repa = RepaCallback.from_config(cfg.repa)
    assert repa.family.name == "cogview4" and repa.family.blocks[0].output == 0
    module = _CogView4()
    trainer(1, [RepaCallback.from_config({**dict(cfg.repa), "family": dict(cfg.repa.family), **repa_options,
                                          "encoder_image_size": 56})]).fit(
        module, DataLoader(LatentData("sd3", n=2), batch_size=2))
    assert hasattr(module, "repa_projector")


def test_declaration_errors_list_what_exists(repa_options):
    with pytest.raises(ValueError, match=r"unknown selector \(`select`\) 'afer_text'; did you mean 'after_text'\?"):
        family_from_dict({**COGVIEW4, "blocks": [{"attr": "transformer_blocks", "select": "afer_text"}]})
    with pytest.raises(ValueError, match=r"missing keys \['classes'\]"):
        family_from_dict({k: v for k, v in COGVIEW4.items() if k != "classes"})
    steps = []

    class Steps(L.Callback):
        def on_train_batch_start(self, *args):
            steps.append(1)

    wrong = {**COGVIEW4, "blocks": [{"attr": "blocks", "output": 0}]}
    with pytest.raises(ValueError, match=r"CogView4Transformer2DModel has no block list `blocks`; its block lists "
                                         r"are: transformer_blocks \(3\)"):
        trainer(1, [RepaCallback(family=wrong, block_index=1, **repa_options), Steps()]).fit(
            _CogView4(), DataLoader(LatentData("sd3", n=2), batch_size=2))
    assert not steps


# --- LayerSync ------------------------------------------------------------------------------------------


def test_layersync_is_the_backbone_teacher_with_the_identity_projector():
    repa = RepaCallback(family="sd3", block_index=0, teacher="backbone", teacher_block_index=2, projector="identity",
                        lam=0.2)
    record = Recorder(repa)
    module = TinyFlow("sd3")
    trainer(2, [repa, record]).fit(module, loader("sd3"))
    assert list(module.repa_projector.parameters()) == []
    student, deeper = record.inputs[0]["student"].detach(), record.inputs[0]["teacher"]
    want = sum(float(F.cosine_similarity(student[b, n], deeper[b, n], dim=0))
               for b in range(2) for n in range(student.shape[1])) / (2 * student.shape[1])
    assert float(record.results[0].similarity) == pytest.approx(want, abs=1e-5)
    assert float(record.results[0].loss) == pytest.approx(-0.2 * want, abs=1e-5)


def test_identity_projector_is_refused_where_the_widths_differ(repa_options):
    with pytest.raises(ValueError, match=r"`projector=identity` needs the teacher's width to equal the student's, "
                                         r"got 32 -> 384"):
        trainer(1, [RepaCallback(family="sd3", block_index=0, projector="identity", **repa_options)]).fit(
            TinyFlow("sd3"), loader("sd3"))


def test_layersync_preset():
    with initialize_config_module(version_base="1.3", config_module="lightning_repa.conf"):
        cfg = compose(config_name="config", overrides=["encoder=layersync", "repa.teacher_block_index=6"])
    repa = RepaCallback.from_config(cfg.repa)
    assert (repa.config.teacher.value, repa.config.projector.value, repa.config.lam) == ("backbone", "identity", 0.2)
