"""The alignment probe (lightning_repa/probe.py): the demo DiT against the shipped digits teacher at a
tiny size, checked against a hand-made hook; the Hydra app, checkpoints, the block rule and errors."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_module

import lightning_repa.demo  # noqa: F401  (registers the digits teacher with timm)
from lightning_repa.demo import DigitsDataModule, FlowMatchingDiT, FlowMatchingUNet, teacher_checkpoint_path
from lightning_repa.demo.teacher import TEACHER_NAME
from lightning_repa.encoders import load_encoder
from lightning_repa.maths.kernel_alignment import cknna, linear_cka
from lightning_repa.apps.probe import run
from lightning_repa.diagnostics.probe import probe, suggest_block

LEVELS = (0.3, 0.8)


@pytest.fixture(autouse=True)
def one_thread():
    """The demo's small tensors run best on one thread (as the apps' `torch_threads: 1`); on a shared
    machine two threads can be ten times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def teacher():
    return load_encoder(TEACHER_NAME, image_size=16, checkpoint=teacher_checkpoint_path())


def _loader(batch_size: int = 8):
    data = DigitsDataModule(batch_size=batch_size)
    data.setup()
    return data.val_dataloader()  # the held-out digits


def _dit(**kwargs) -> FlowMatchingDiT:
    return FlowMatchingDiT(**{"num_layers": 4, **kwargs})


def _call(module):
    return lambda x_t, t, batch: module(x_t, t, batch["labels"])


def _compose(*overrides: str):
    with initialize_config_module(version_base="1.3", config_module="lightning_repa.conf"):
        return compose(config_name="probe", overrides=list(overrides))


# --- the Python function ------------------------------------------------------------------------


def test_probe_on_the_demo_dit_and_teacher(tmp_path, teacher):
    module = _dit()
    module.train()
    before = {name: p.detach().clone() for name, p in module.named_parameters()}
    result = probe(_call(module), module, "pixart", _loader(), teacher, LEVELS, k=5, num_samples=20, seed=3,
                   output_dir=tmp_path)

    assert result["num_blocks"] == 4 and result["num_samples"] == 20 and result["noise_levels"] == list(LEVELS)
    assert result["student_width"] == 64 and result["teacher_width"] == 64
    assert [b["index"] for b in result["blocks"]] == [0, 1, 2, 3]
    for block in result["blocks"]:
        assert len(block["cknna"]) == len(block["cka"]) == 2
        assert all(-1.0 <= v <= 1.0 for v in block["cknna"]) and all(0.0 <= v <= 1.0 for v in block["cka"])
        assert block["cknna_mean"] == pytest.approx(sum(block["cknna"]) / 2)
    assert result["suggested_block"] in (0, 1, 2)  # the first ceil(2/3 * 4) = 3 blocks
    means = [b["cknna_mean"] for b in result["blocks"]]
    assert means[result["suggested_block"]] == max(means[:3]) and means[result["best_block"]] == max(means)

    saved = json.loads(Path(result["files"]["json"]).read_text())
    assert saved["blocks"] == result["blocks"] and saved["suggested_block"] == result["suggested_block"]
    assert "files" not in saved
    assert Path(result["files"]["png"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # nothing trained, nothing left behind: no hooks, no gradients, the module's mode restored
    assert module.training and all(not b._forward_hooks for b in module.transformer.transformer_blocks)
    assert not module.transformer._forward_hooks and not module.transformer._forward_pre_hooks
    for name, p in module.named_parameters():
        assert p.grad is None and p.requires_grad and torch.equal(p, before[name]), name


def test_probe_matches_a_hand_made_hook(teacher):
    """The same numbers from a plain forward hook under no_grad, the documented noise and pooling."""
    module = _dit(seed=1)
    result = probe(_call(module), module, "pixart", _loader(), teacher, LEVELS, k=5, num_samples=20, seed=3)

    block = module.transformer.transformer_blocks[2]
    seen: list[torch.Tensor] = []
    handle = block.register_forward_hook(lambda m, args, out: seen.append(out.mean(dim=1)))
    generator, student, target, count = torch.Generator().manual_seed(3), [], [], 0
    module.eval()
    with torch.no_grad():
        for batch in _loader():
            n = min(len(batch["labels"]), 20 - count)
            if n <= 0:
                break
            x0, pixels, labels = batch["latents"][:n], batch["pixels"][:n], batch["labels"][:n]
            noise = torch.randn(x0.shape, generator=generator)
            target.append(teacher(pixels).mean(dim=1))
            for level in LEVELS:
                t = torch.full((n,), level)
                module((1 - level) * x0 + level * noise, t, labels)
            student.append(torch.stack(seen[-2:]))  # (levels, n, D)
            count += n
    handle.remove()
    student_at = torch.cat(student, dim=1)  # (levels, 20, D)
    teacher_features = torch.cat(target)
    for j in range(len(LEVELS)):
        expected = cknna(F.normalize(student_at[j], dim=-1), F.normalize(teacher_features, dim=-1), 5)
        assert result["blocks"][2]["cknna"][j] == pytest.approx(expected, rel=1e-5, abs=1e-6)
        assert result["blocks"][2]["cka"][j] == pytest.approx(linear_cka(student_at[j], teacher_features), rel=1e-5)
    again = probe(_call(module), module, "pixart", _loader(), teacher, LEVELS, k=5, num_samples=20, seed=3)
    assert again["blocks"] == result["blocks"]  # seeded


def test_probe_takes_a_unet_mid_block(teacher):
    module = FlowMatchingUNet(channels=(16, 16, 32), head_dim=16)
    result = probe(_call(module), module, "sdxl", _loader(), teacher, (0.5,), k=4, num_samples=12)
    assert result["num_blocks"] == 1 and result["suggested_block"] == 0 and "files" not in result
    assert -1.0 <= result["blocks"][0]["cknna"][0] <= 1.0


def test_probe_errors(teacher):
    module = _dit(num_layers=2)
    with pytest.raises(ValueError, match="family='flux' expects a denoiser of class FluxTransformer2DModel"):
        probe(_call(module), module.transformer, "flux", _loader(), teacher, LEVELS, k=4, num_samples=8)
    with pytest.raises(ValueError, match="expects a denoiser of class PixArtTransformer2DModel, got Linear"):
        probe(_call(module), torch.nn.Linear(2, 2), "pixart", _loader(), teacher, LEVELS)
    with pytest.raises(ValueError, match=r"flow times in \[0, 1\]"):
        probe(_call(module), module, "pixart", _loader(), teacher, (0.5, 1.5))
    with pytest.raises(ValueError, match="`k` must be an int >= 2"):
        probe(_call(module), module, "pixart", _loader(), teacher, LEVELS, k=1)
    with pytest.raises(ValueError, match="needs more than k samples, got num_samples=10"):
        probe(_call(module), module, "pixart", _loader(), teacher, LEVELS, k=10, num_samples=10)
    with pytest.raises(ValueError, match="the batches held 8"):
        probe(_call(module), module, "pixart", [next(iter(_loader()))], teacher, LEVELS, k=10)
    with pytest.raises(ValueError, match="unknown `family` 'pixar'; did you mean 'pixart'"):
        probe(_call(module), module, "pixar", _loader(), teacher, LEVELS)
    assert not module.transformer._forward_pre_hooks  # detached after a failure too


def test_suggested_block_rule():
    assert suggest_block([0.1, 0.5, 0.3, 0.9]) == 1  # block 3 is in the last third
    assert suggest_block([0.1, 0.5, 0.3, 0.9], depth_fraction=1.0) == 3
    assert suggest_block([0.1, 0.5, 0.5, 0.2, 0.9, 0.9]) == 1  # the earliest of equals (window: 4 of 6)
    assert suggest_block([math.nan, 0.2, 0.1]) == 1 and suggest_block([math.nan, math.nan, 0.5]) is None
    assert suggest_block([0.4]) == 0  # one block (a UNet's mid block)
    assert suggest_block([0.0] * 28, 2 / 3) == 0 and suggest_block(list(range(28))) == 18  # ceil(18.67) = 19 blocks
    with pytest.raises(ValueError, match="depth_fraction"):
        suggest_block([0.1], 0.0)


# --- the Hydra app --------------------------------------------------------------------------------

TINY = ["model.num_layers=3", "num_samples=16", "k=4", "noise_levels=[0.5]", "data.batch_size=8"]


def test_app_probes_the_demo_and_writes_json_and_png(tmp_path, capsys):
    cfg = _compose(*TINY, f"paths.output_dir={tmp_path}")
    assert cfg.repa.family == "pixart" and cfg.repa.encoder == TEACHER_NAME and cfg.ckpt_path is None
    result = run(cfg)
    out = capsys.readouterr().out
    assert result["num_blocks"] == 3 and result["num_samples"] == 16 and result["configured_block"] == 2
    assert (tmp_path / "probe.json").is_file() and (tmp_path / "probe.png").is_file()
    assert f"JSON        {tmp_path / 'probe.json'}" in out and f"plot        {tmp_path / 'probe.png'}" in out
    assert "<- suggested" in out and "CKNNA" in out and "t=0.50" in out
    assert f"suggested block: {result['suggested_block']}" in out


def test_app_logs_the_plot_and_the_table_to_wandb(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    result = run(_compose(*TINY, "logger=wandb", f"paths.output_dir={tmp_path}"))
    run_dir = result["wandb_dir"]
    assert run_dir is not None and str(run_dir) in capsys.readouterr().out
    assert list(run_dir.glob("files/media/images/probe_*.png")), "the plot is logged as an image"
    tables = list(run_dir.glob("files/media/table/probe_blocks_*.table.json"))
    assert tables, "the numbers are logged as a table"
    table = json.loads(tables[0].read_text())
    assert table["columns"][:2] == ["block", "cknna t=0.50"] and len(table["data"]) == result["num_blocks"]
    assert table["data"][1][1] == pytest.approx(result["blocks"][1]["cknna"][0])


def test_app_reads_a_training_checkpoint(tmp_path, capsys):
    trained = FlowMatchingDiT(num_layers=2, seed=7)  # the architecture comes from the checkpoint
    state = {**trained.state_dict(), "repa_projector.body.0.weight": torch.ones(3)}  # the callback's projector
    ckpt = tmp_path / "last.ckpt"
    torch.save({"state_dict": state, "hyper_parameters": dict(trained.hparams), "global_step": 400}, ckpt)
    common = [*TINY[1:], "repa.block_index=1", f"paths.output_dir={tmp_path / 'out'}"]
    result = run(_compose(*common, f"ckpt_path={ckpt}"))
    fresh = run(_compose(*TINY[1:], "model.num_layers=2", "repa.block_index=1", f"paths.output_dir={tmp_path / 'fresh'}"))
    assert result["num_blocks"] == 2 and result["checkpoint"] == str(ckpt)
    assert json.loads(Path(result["files"]["json"]).read_text())["checkpoint"] == str(ckpt)
    assert result["blocks"] != fresh["blocks"]  # other weights, other features
    assert str(ckpt) in capsys.readouterr().out

    del state["label_embedding.weight"]
    torch.save({"state_dict": state, "hyper_parameters": dict(trained.hparams)}, ckpt)
    with pytest.raises(ValueError, match=r"does not fit FlowMatchingDiT as configured: missing \['label_embedding"):
        run(_compose(*common, f"ckpt_path={ckpt}"))
    with pytest.raises(FileNotFoundError, match="no such file"):
        run(_compose(*common, f"ckpt_path={tmp_path / 'nope.ckpt'}"))


@pytest.mark.parametrize("block, error", [(99, r"repa.block_index=99 is out of range.*3 blocks; use 0..2"),
                                          (-1, r"`block_index` must be an integer >= 0")])
def test_app_refuses_a_block_the_model_does_not_have(block, error, tmp_path):
    with pytest.raises((IndexError, ValueError), match=error):
        run(_compose(*TINY, f"repa.block_index={block}", f"paths.output_dir={tmp_path}"))


def test_app_refuses_a_decoding_teacher(tmp_path):
    with pytest.raises(ValueError, match=r"reads the clean images from the batch \(decoder=pixels\)"):
        run(_compose(*TINY, "decoder=vae", f"paths.output_dir={tmp_path}"))


@pytest.mark.slow
def test_console_script_from_any_directory(tmp_path):
    script = shutil.which("lightning-repa-probe")
    command = [script] if script else [sys.executable, "-m", "lightning_repa.diagnostics.probe"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "1"}
    proc = subprocess.run([*command, *TINY, f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "lightning-repa-probe" in proc.stdout and str(tmp_path / "run" / "probe.json") in proc.stdout
    assert json.loads((tmp_path / "run" / "probe.json").read_text())["num_blocks"] == 3
