"""One `seed=N` varies the whole app run reproducibly (model init, data shuffle, noise) with any
logger on, and leaves the held-out split of the digits where the shipped teacher was scored."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from hydra import compose, initialize_config_module
from hydra.utils import instantiate

import lightning_repa.apps.hydra_config  # noqa: F401  (registers the schemas)
from lightning_repa.apps.train import run

# Two optimizer steps on batches of 8, no sample grid: about a second a run on one CPU thread.
TINY = [
    "experiment=demo",
    "trainer.max_steps=2",
    "checkpoint.every_n_train_steps=2",
    "data.batch_size=8",
    "sample.enabled=false",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
]


def _compose(*overrides: str):
    with initialize_config_module(version_base="1.3", config_module="lightning_repa.conf"):
        return compose(config_name="config", overrides=list(overrides))


def _train(out: Path, *overrides: str) -> dict:
    return run(_compose(*TINY, f"paths.output_dir={out}", *overrides))


def _weights(result: dict) -> dict[str, torch.Tensor]:
    return torch.load(result["checkpoint"], map_location="cpu", weights_only=False)["state_dict"]


def test_seed_reaches_model_and_shuffle_but_not_the_split():
    cfg = _compose("experiment=demo", "seed=1")
    assert cfg.model.seed == 1 and cfg.data.seed == 1
    assert cfg.data.split_seed == 0  # the split the shipped teacher was scored on
    run0, run1 = instantiate(_compose("experiment=demo").data), instantiate(cfg.data)
    for dm in (run0, run1):
        dm.setup()
    assert torch.equal(run0.val_set.ids, run1.val_set.ids)
    assert torch.equal(run0.train_set.ids, run1.train_set.ids)
    first0 = next(iter(run0.train_dataloader()))["ids"]
    first1 = next(iter(run1.train_dataloader()))["ids"]
    assert not torch.equal(first0, first1)  # the shuffle follows the run's seed


@pytest.mark.parametrize("logger", ["csv", "wandb"])
def test_a_seed_other_than_zero_trains_with_a_logger(tmp_path, monkeypatch, logger):
    monkeypatch.setenv("WANDB_MODE", "offline")  # a real (offline) W&B run, no account or network
    result = _train(tmp_path, "seed=1", f"logger={logger}")
    assert result["global_step"] == 2
    if logger == "csv":  # the hyperparameters Lightning logged: one `seed`, the run's
        hparams = yaml.safe_load((result["csv"].parent / "hparams.yaml").read_text())
        assert hparams["seed"] == 1 and hparams["data"]["seed"] == 1 and hparams["split_seed"] == 0
    else:
        assert result["wandb_dir"] is not None and result["wandb_dir"].is_dir()


def test_same_seed_same_weights_other_seed_other_weights(tmp_path):
    a = _weights(_train(tmp_path / "a", "seed=1", "logger=csv"))
    b = _weights(_train(tmp_path / "b", "seed=1", "logger=csv"))
    c = _weights(_train(tmp_path / "c", "seed=2", "logger=csv"))
    assert a.keys() == b.keys() == c.keys()
    same = [k for k in a if torch.equal(a[k], b[k])]
    assert same == list(a), f"seed=1 twice: {len(a) - len(same)} tensors differ"
    differ = [k for k in a if not torch.equal(a[k], c[k])]
    assert len(differ) > len(a) // 2, f"seed=1 vs seed=2: only {differ} differ"


def test_model_and_data_hyperparameters_of_one_name_must_agree(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"`model.seed`=3 and `data.seed`=1 differ"):
        run(_compose(*TINY, f"paths.output_dir={out}", "seed=1", "model.seed=3", "logger=csv"))
    assert not out.exists()  # refused before anything was built
