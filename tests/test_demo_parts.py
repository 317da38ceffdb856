"""The CPU demo's parts: digits data, the shipped ViT teacher, the flow-matching DiT."""

import hashlib
import warnings

import lightning as L
import pytest
import timm
import torch
from safetensors.torch import load_file
from timm.models.vision_transformer import checkpoint_filter_fn

from helpers import labelled_grid
from lightning_repa.demo import (
    TEACHER_MEAN,
    TEACHER_NAME,
    TEACHER_STD,
    DigitsDataModule,
    FlowMatchingDiT,
    load_digit_images,
    normalize_for_teacher,
    register_teacher,
    split_indices,
    teacher_checkpoint_path,
)
from lightning_repa.demo.pretrain_teacher import accuracy


# -- data ---------------------------------------------------------------------------------


def test_digits_batch_keys_shapes_and_ranges():
    dm = DigitsDataModule(image_size=16, batch_size=8)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"latents", "pixels", "labels", "ids"}
    assert batch["latents"].shape == (8, 1, 16, 16) and batch["latents"].dtype == torch.float32
    assert batch["pixels"].shape == (8, 3, 16, 16)
    assert batch["labels"].shape == (8,) and batch["labels"].dtype == torch.long
    assert batch["ids"].shape == (8,) and batch["ids"].dtype == torch.long
    assert batch["latents"].min() >= -1 and batch["latents"].max() <= 1
    assert batch["latents"].min() == -1 and batch["latents"].max() > 0.9  # background is -1, ink near +1
    assert batch["pixels"].min() >= 0 and batch["pixels"].max() <= 1
    torch.testing.assert_close(batch["latents"], batch["pixels"][:, :1] * 2 - 1)
    torch.testing.assert_close(batch["pixels"][:, 0], batch["pixels"][:, 2])
    assert ((batch["labels"] >= 0) & (batch["labels"] <= 9)).all()


def test_digits_ids_are_stable_sample_indices():
    from sklearn.datasets import load_digits

    images, labels = load_digit_images(8)
    target = torch.from_numpy(load_digits().target)
    dm = DigitsDataModule(image_size=8, batch_size=1000)
    dm.setup()
    batch = next(iter(dm.val_dataloader()))
    assert torch.equal(batch["labels"], target[batch["ids"]])
    torch.testing.assert_close(batch["pixels"][:, :1], images[batch["ids"]])
    # 8x8 is the raw data scaled from 0..16 to [0, 1]
    torch.testing.assert_close(images[:, 0] * 16, torch.from_numpy(load_digits().images).float())


def test_digits_split_is_deterministic_and_disjoint():
    a, b, c = DigitsDataModule(split_seed=0), DigitsDataModule(split_seed=0), DigitsDataModule(split_seed=1)
    for dm in (a, b, c):
        dm.setup()
    assert torch.equal(a.val_set.ids, b.val_set.ids) and torch.equal(a.train_set.ids, b.train_set.ids)
    assert not torch.equal(a.val_set.ids, c.val_set.ids)
    assert len(a.val_set) == 180 and len(a.train_set) == 1617
    all_ids = torch.cat([a.train_set.ids, a.val_set.ids])
    assert torch.equal(all_ids.sort().values, torch.arange(1797))
    # the training loader drops the partial batch, so every step sees batch_size samples
    assert len(a.train_dataloader()) == 1617 // 64


# -- teacher ------------------------------------------------------------------------------


def _shipped_state():
    path = teacher_checkpoint_path()
    assert path.is_file(), f"shipped teacher weights missing: {path}"
    return load_file(str(path))


def test_teacher_registration_is_idempotent():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # timm warns when a name is registered twice
        assert register_teacher() == TEACHER_NAME
        assert register_teacher() == TEACHER_NAME
    assert timm.is_model(TEACHER_NAME)


def test_teacher_loads_through_encoder_loader_path():
    model = timm.create_model(TEACHER_NAME, pretrained=False, num_classes=0, dynamic_img_size=True, img_size=16)
    sd = checkpoint_filter_fn(_shipped_state(), model)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert missing == []
    assert sorted(unexpected) == ["head.bias", "head.weight"]
    model.eval()
    tokens = model.forward_features(torch.rand(2, 3, 16, 16))
    assert tokens.shape == (2, 1 + 64, 64)  # CLS + 8x8 patch tokens
    assert model.num_prefix_tokens == 1 and model.patch_embed.patch_size == (2, 2)
    assert tuple(model.pretrained_cfg["mean"]) == TEACHER_MEAN
    assert tuple(model.pretrained_cfg["std"]) == TEACHER_STD


def test_teacher_mean_std_are_the_data_statistics():
    images, labels = load_digit_images(16)
    train_idx, _ = split_indices(len(labels), 0.1, 0)
    assert images[train_idx].mean().item() == pytest.approx(TEACHER_MEAN[0], abs=1e-3)
    assert images[train_idx].std().item() == pytest.approx(TEACHER_STD[0], abs=1e-3)


def test_shipped_teacher_accuracy_on_held_out_split_and_random_weights_fail():
    images, labels = load_digit_images(16)
    _, val_idx = split_indices(len(labels), 0.1, 0)
    x_va, y_va = images[val_idx], labels[val_idx]

    trained = timm.create_model(TEACHER_NAME, pretrained=False, num_classes=10)
    trained.load_state_dict(_shipped_state(), strict=True)
    acc = accuracy(trained, x_va, y_va)
    assert acc >= 0.95, f"shipped teacher held-out accuracy {acc:.3f}"

    torch.manual_seed(0)
    random_init = timm.create_model(TEACHER_NAME, pretrained=False, num_classes=10)
    assert accuracy(random_init, x_va, y_va) < 0.5


def test_shipped_teacher_patch_tokens_carry_the_class():
    """kNN on mean-pooled patch tokens (what REPA aligns to), loaded as the encoder loader does:
    ~0.99 for the shipped weights, ~0.4 for random ones."""
    from sklearn.neighbors import KNeighborsClassifier

    images, labels = load_digit_images(16)
    train_idx, val_idx = split_indices(len(labels), 0.1, 0)

    def knn_accuracy(model):
        with torch.no_grad():
            f = model.eval().forward_features(normalize_for_teacher(images))[:, model.num_prefix_tokens :].mean(1)
        knn = KNeighborsClassifier(5).fit(f[train_idx].numpy(), labels[train_idx].numpy())
        return knn.score(f[val_idx].numpy(), labels[val_idx].numpy())

    def encoder():
        return timm.create_model(TEACHER_NAME, pretrained=False, num_classes=0, dynamic_img_size=True, img_size=16)

    shipped = encoder()
    shipped.load_state_dict(checkpoint_filter_fn(_shipped_state(), shipped), strict=False)
    assert knn_accuracy(shipped) >= 0.95
    torch.manual_seed(0)
    assert knn_accuracy(encoder()) < 0.7


def test_teacher_pretrained_true_loads_the_shipped_file():
    model = timm.create_model(TEACHER_NAME, pretrained=True)
    shipped = _shipped_state()
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, shipped[k].to(v.dtype))


def test_teacher_weights_readme_matches_file():
    readme = (teacher_checkpoint_path().parent / "README.md").read_text()
    digest = hashlib.sha256(teacher_checkpoint_path().read_bytes()).hexdigest()
    assert digest in readme
    assert teacher_checkpoint_path().stat().st_size < 4 * 2**20


# -- flow-matching DiT --------------------------------------------------------------------


def test_dit_has_pixart_blocks_and_saves_hparams():
    model = FlowMatchingDiT()
    assert type(model.transformer).__name__ == "PixArtTransformer2DModel"
    assert len(model.transformer.transformer_blocks) == model.hparams.num_layers == 8
    assert model.hparams.image_size == 16
    # the pixart family default (block 10) is reachable with num_layers=12
    assert len(FlowMatchingDiT(num_layers=12).transformer.transformer_blocks) == 12
    x = torch.randn(3, 1, 16, 16)
    assert model(x, torch.rand(3), torch.tensor([0, 5, 10])).shape == x.shape


def test_dit_seed_fixes_init():
    a, b = FlowMatchingDiT(num_layers=1, seed=3), FlowMatchingDiT(num_layers=1, seed=3)
    c = FlowMatchingDiT(num_layers=1, seed=4)
    pa, pb, pc = (torch.cat([p.flatten() for p in m.parameters()]) for m in (a, b, c))
    assert torch.equal(pa, pb) and not torch.equal(pa, pc)


def test_optimizer_includes_modules_attached_before_configure_optimizers():
    model = FlowMatchingDiT(num_layers=1)
    model.repa_projector = torch.nn.Linear(64, 64)  # as the REPA callback does in setup
    opt = model.configure_optimizers()["optimizer"]
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert all(id(p) in in_opt for p in model.repa_projector.parameters())
    assert len(in_opt) == len(list(model.parameters()))


class _LossRecorder(L.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(outputs["loss"].item())


def test_training_lowers_the_flow_matching_loss():
    L.seed_everything(0, verbose=False)
    model = FlowMatchingDiT(num_layers=2, warmup_steps=5, lr=3e-3)
    rec = _LossRecorder()
    trainer = L.Trainer(
        accelerator="cpu", max_steps=30, enable_checkpointing=False, logger=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, callbacks=[rec],
    )
    trainer.fit(model, DigitsDataModule(batch_size=32))
    assert len(rec.losses) == 30
    first, last = sum(rec.losses[:5]) / 5, sum(rec.losses[-5:]) / 5
    assert last < 0.7 * first, f"loss {first:.3f} -> {last:.3f}"
    assert "train/loss" in trainer.callback_metrics


def test_sample_and_sample_grid(tmp_path):
    model = FlowMatchingDiT(num_layers=1)
    imgs = model.sample([0, 3, 7], steps=3, seed=1)
    assert imgs.shape == (3, 1, 16, 16) and imgs.min() >= 0 and imgs.max() <= 1
    torch.testing.assert_close(imgs, model.sample([0, 3, 7], steps=3, seed=1))
    assert not torch.equal(imgs, model.sample([0, 3, 7], steps=3, seed=2))
    assert model.training  # sample() restores the mode

    path = model.save_sample_grid(tmp_path / "grid.png", steps=2, per_class=3, scale=4, title="step 0, REPA")
    # 1-pixel gaps around 16-pixel cells, then 4x nearest upscaling; a class label left of each row
    labelled_grid(path, ((3 * 17 + 1) * 4, (10 * 17 + 1) * 4), rows=10, title=True)
