"""The Hydra app (SPEC section 11): every config file composes, bad overrides fail at compose
time, and the console script trains, logs, samples, checkpoints, resumes and sweeps."""

from __future__ import annotations

import csv
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf import OmegaConf

import lightning_repa
import lightning_repa.apps.hydra_config  # noqa: F401  (registers the schemas)
from lightning_repa import RepaCallback
from lightning_repa.config import ScheduleKind, Teacher, ThresholdMode
from lightning_repa.models.families import FAMILIES
from lightning_repa.apps.train import alignment_callbacks, run

CONF = Path(lightning_repa.__file__).parent / "conf"
GROUPS = ("family", "encoder", "schedule", "decoder", "trainer", "logger", "experiment", "data", "model")
# Values a choice needs on top of itself to be complete (`???` in its file).
NEEDS = {
    ("encoder", "backbone"): ["repa.teacher_block_index=11"],
    ("encoder", "layersync"): ["repa.teacher_block_index=11"],
    ("decoder", "tae"): ["repa.tae_checkpoint=/weights/taesd.pth"],
}
# A few optimizer steps on small batches: the whole demo in seconds.
TINY = [
    "trainer.max_steps=4",
    "data.batch_size=8",
    "checkpoint.every_n_train_steps=2",
    "trainer.log_every_n_steps=1",
    "sample.per_class=1",
    "sample.steps=2",
]


def _compose(*overrides: str):
    with initialize_config_module(version_base="1.3", config_module="lightning_repa.conf"):
        return compose(config_name="config", overrides=list(overrides))


def _choices(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def _error_text(exc: BaseException) -> str:
    """The message of the exception and of every cause (Hydra wraps OmegaConf's error)."""
    parts = []
    while exc is not None:
        parts.append(str(exc))
        exc = exc.__cause__ or exc.__context__
    return "\n".join(parts)


# --- composing ------------------------------------------------------------------------------


def test_groups_ship_inside_the_package_and_the_top_level_link_points_there():
    for group in GROUPS:
        assert _choices(group), f"no configs in conf/{group}"
    link = Path(__file__).resolve().parents[1] / "conf"
    if link.exists():  # the repo layout lists conf/ at the top: a link to the package's files
        assert link.resolve() == CONF.resolve()


def test_default_config_is_the_demo():
    from lightning_repa.demo import FlowMatchingDiT

    cfg = _compose()
    assert cfg.repa.family == "pixart"
    assert cfg.repa.block_index < cfg.model.num_layers  # the demo DiT's block, not pixart's default 10
    assert cfg.repa.encoder == "vit_tiny_digits_patch2" and cfg.repa.decoder.value == "pixels"
    assert cfg.model._target_ == "lightning_repa.demo.FlowMatchingDiT"
    assert cfg.data._target_ == "lightning_repa.demo.DigitsDataModule"
    assert cfg.trainer.accelerator == "cpu" and cfg.trainer.devices == 1
    assert cfg.trainer.enable_progress_bar is True
    assert cfg.ckpt_path is None
    model_args = set(inspect.signature(FlowMatchingDiT.__init__).parameters) - {"self"}
    assert set(cfg.model) - {"_target_"} <= model_args  # every key of model/demo_dit.yaml is an argument
    demo = _compose("experiment=demo")
    assert demo.task_name == "demo" and demo.repa.lam == 0.5
    assert demo.trainer.max_steps % demo.checkpoint.every_n_train_steps == 0  # last.ckpt is the end
    assert demo.logger.wandb.mode in ("offline", os.environ.get("WANDB_MODE"))


def test_family_files_cover_every_family():
    assert set(_choices("family")) == set(FAMILIES), "one conf/family/<name>.yaml per entry of FAMILIES"


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_sets_family_and_its_default_block(family):
    cfg = _compose(f"family={family}", "~model")  # without the demo DiT, which picks its own block
    assert cfg.repa.family == family
    assert cfg.repa.block_index is None  # unset: the default lives in families.py only
    callback = RepaCallback.from_config(cfg.repa)  # builds nothing heavy: the encoder loads in setup
    assert callback.block_index == FAMILIES[family].default_block_index
    assert callback.config.family == family


def test_family_files_leave_the_block_to_families_py():
    for path in sorted((CONF / "family").glob("*.yaml")):
        node = OmegaConf.load(path)
        assert "block_index" not in node, f"{path.name} sets block_index; the default lives in families.py"
        assert "repa.block_index=N" in path.read_text(), f"{path.name} does not say how to override the block"


@pytest.mark.parametrize(
    "overrides,block",
    [
        (["experiment=demo"], 2),                          # model/demo_dit.yaml's block for its 8 blocks
        ([], 2),                                           # the default config is the demo
        (["experiment=demo", "family=flux"], 2),           # a family choice does not undo the model's block
        (["experiment=demo", "repa.block_index=5"], 5),    # the command line wins over every file
    ],
)
def test_demo_model_picks_its_block_after_the_family(overrides, block):
    cfg = _compose(*overrides)
    assert cfg.repa.block_index == block
    assert RepaCallback.from_config(cfg.repa).block_index == block


@pytest.mark.parametrize(
    "group,choice", [(g, c) for g in ("encoder", "schedule", "decoder", "trainer", "logger", "data", "model")
                     for c in _choices(g)]
)
def test_every_group_file_composes(group, choice):
    cfg = _compose(f"{group}={choice}", *NEEDS.get((group, choice), []))
    choices = OmegaConf.to_container(cfg, resolve=False)
    if group in ("encoder", "schedule", "decoder"):
        RepaCallback.from_config(cfg.repa)  # the node is a valid RepaConfig
    if group == "encoder" and choice.startswith("dinov2"):
        assert cfg.repa.encoder == choice and cfg.repa.teacher is Teacher.encoder
        assert cfg.repa.encoder_checkpoint is None and cfg.repa.encoder_image_size in (224, 518)
    if group == "encoder" and choice == "backbone":
        assert cfg.repa.teacher is Teacher.backbone and cfg.repa.teacher_block_index == 11
    if group == "schedule" and choice in {k.value for k in ScheduleKind}:
        assert cfg.repa.schedule.value == choice
    if group == "decoder":
        assert cfg.repa.decoder.value == choice
    if group == "trainer":
        assert cfg.trainer._target_ == "lightning.pytorch.Trainer"
        assert cfg.trainer.get("accelerator") == {"cpu": "cpu", "gpu": "gpu", "ddp": "gpu"}.get(choice)
    if group == "logger":
        assert set(choices["logger"] or {}) == ({choice} if choice != "none" else set())
    if group in ("data", "model"):
        assert cfg[group]._target_


def test_cpu_trainer_and_loggers_instantiate(tmp_path):
    from hydra.utils import instantiate
    from lightning.pytorch.loggers import CSVLogger, WandbLogger

    cfg = _compose("logger=[wandb,csv]", f"paths.output_dir={tmp_path}")
    trainer = instantiate(cfg.trainer, logger=False, enable_checkpointing=False)
    assert trainer.max_steps == cfg.trainer.max_steps
    loggers = {name: instantiate(node) for name, node in cfg.logger.items()}
    assert isinstance(loggers["wandb"], WandbLogger) and isinstance(loggers["csv"], CSVLogger)
    assert loggers["csv"].log_dir.startswith(str(tmp_path))
    checkpoint = instantiate(cfg.checkpoint)
    assert checkpoint.save_last and checkpoint.dirpath == str(tmp_path / "checkpoints")


def test_every_experiment_composes():
    for name in _choices("experiment"):
        cfg = _compose(f"experiment={name}")
        RepaCallback.from_config(cfg.repa)
        assert (CONF / "experiment" / f"{name}.yaml").read_text().startswith("# @package _global_")


def test_gpu_and_ddp_trainers_compose_from_the_default():
    gpu, ddp = _compose("trainer=gpu").trainer, _compose("trainer=ddp").trainer
    assert gpu.accelerator == ddp.accelerator == "gpu"
    assert ddp.strategy == "ddp" and ddp.max_steps == gpu.max_steps  # inherited, not copied


def test_video_schedule_presets_match_crepa_recommendations():
    t2v = _compose("schedule=t2v").repa
    assert (t2v.schedule, t2v.lam, t2v.warmup_steps, t2v.decay_steps, t2v.lambda_end) == (
        ScheduleKind.cosine, 0.5, 100, 0, 0.1)
    assert t2v.similarity_threshold == 0.85 and t2v.threshold_mode is ThresholdMode.permanent
    i2v = _compose("schedule=i2v").repa
    assert i2v.schedule is ScheduleKind.constant and i2v.lam == 0.5 and i2v.similarity_threshold is None


def test_command_line_values_reach_the_callback():
    cfg = _compose("family=sd3", "~model", "repa.lam=0.3", "schedule=cosine", "repa.warmup_steps=100",
                   "encoder=dinov2_vitb14")
    callback = RepaCallback.from_config(cfg.repa)
    assert callback.config.lam == 0.3 and callback.config.schedule is ScheduleKind.cosine
    assert callback.config.warmup_steps == 100 and callback.block_index == 8
    assert callback.config.encoder == "dinov2_vitb14"


def test_own_model_config_from_a_search_path_keeps_the_family_block(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "my_flux.yaml").write_text("_target_: my_pkg.MyFluxModule\nlr: 1.0e-4\n")
    cfg = _compose("family=flux", "model=my_flux", f"hydra.searchpath=[file://{tmp_path}]")
    assert cfg.model._target_ == "my_pkg.MyFluxModule" and cfg.model.lr == 1e-4
    assert cfg.repa.family == "flux" and cfg.repa.block_index is None
    assert RepaCallback.from_config(cfg.repa).block_index == FAMILIES["flux"].default_block_index


def test_demo_teacher_checkpoint_resolves_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = _compose("encoder=demo_vit")
    path = Path(cfg.repa.encoder_checkpoint)
    assert path.is_absolute() and path.is_file()
    from lightning_repa.demo import teacher_checkpoint_path

    assert path == teacher_checkpoint_path()


# --- bad overrides fail at compose time --------------------------------------------------------


@pytest.mark.parametrize(
    "override,message",
    [
        ("repa.schedule=foo", "Invalid value 'foo'"),
        ("repa.threshold_mode=sometimes", "Invalid value 'sometimes'"),
        ("repa.lam=abc", "could not be converted to Float"),
        ("repa.block_index=ten", "could not be converted to Integer"),
        ("repa.bogus=1", "Key 'bogus' not in 'RepaConfig'"),
        ("seed=abc", "could not be converted to Integer"),
        ("bogus=1", "Key 'bogus' not in 'AppConfig'"),
    ],
)
def test_bad_values_fail_with_hydra_errors(override, message):
    with pytest.raises(ConfigCompositionException) as info:
        _compose(override)
    assert message in _error_text(info.value)


def test_appended_unknown_repa_option_is_refused_by_the_callback():
    cfg = _compose("+repa.lamda=0.3")  # `+` forces the key in; the callback still names the right one
    with pytest.raises(TypeError, match="did you mean `lam`"):
        RepaCallback.from_config(cfg.repa)


@pytest.mark.parametrize("override", ["family=bogus", "schedule=foo", "encoder=dinov3", "experiment=nope"])
def test_unknown_choices_fail(override):
    group, choice = override.split("=")
    with pytest.raises(MissingConfigException, match=f"{group}/{choice}"):
        _compose(override)


@pytest.mark.parametrize("choice,key", [("encoder=backbone", "teacher_block_index"), ("decoder=tae", "tae_checkpoint")])
def test_values_a_choice_needs_are_refused_before_anything_is_built(tmp_path, choice, key):
    cfg = _compose(choice, f"paths.output_dir={tmp_path / 'out'}")
    with pytest.raises(ValueError, match=rf"needs `{key}`"):
        run(cfg)
    assert not (tmp_path / "out").exists()


def test_required_values_of_own_config_files_are_named(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "my_flux.yaml").write_text(
        "_target_: my_pkg.MyFluxModule\npretrained: ???   # required\n")
    cfg = _compose("model=my_flux", f"hydra.searchpath=[file://{tmp_path}]", f"paths.output_dir={tmp_path / 'out'}")
    with pytest.raises(ValueError) as info:
        run(cfg)
    msg = str(info.value)
    assert "required config values are not set (`???`" in msg and "e.g. model.pretrained=<value>" in msg
    assert not (tmp_path / "out").exists()


def test_a_family_typo_is_refused_before_anything_is_built(tmp_path, monkeypatch):
    import lightning_repa.apps.train as train

    built = []
    monkeypatch.setattr(train, "instantiate", lambda node, **kw: built.append(node._target_))
    monkeypatch.setattr(train.pl, "seed_everything", lambda *a, **kw: built.append("seed_everything"))
    cfg = _compose("repa.family=fluxx", f"paths.output_dir={tmp_path / 'out'}")  # a free string: composes
    with pytest.raises(ValueError) as info:
        run(cfg)
    msg = str(info.value)
    assert "`family`" in msg and "'fluxx'" in msg and "did you mean 'flux'" in msg
    assert built == [] and not (tmp_path / "out").exists()


def test_run_without_hydra_needs_an_output_dir():
    with pytest.raises(ValueError, match="paths.output_dir"):
        run(_compose())


# --- end to end -----------------------------------------------------------------------------------


def _script_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("WANDB_MODE", None)  # the app's own default: offline
    env["OMP_NUM_THREADS"] = "1"  # predictable on a shared machine
    env["HYDRA_FULL_ERROR"] = "1"
    return env


def _console_script() -> list[str]:
    script = shutil.which("lightning-repa-train")
    return [script] if script else [sys.executable, "-m", "lightning_repa.apps.train"]


def _read_csv(path: Path) -> dict[int, dict[str, float]]:
    """metrics.csv -> {step: {key: value}}, merging the rows of one step."""
    rows: dict[int, dict[str, float]] = {}
    with open(path) as f:
        for row in csv.DictReader(f):
            values = {k: float(v) for k, v in row.items() if v not in ("", None)}
            rows.setdefault(int(values.pop("step")), {}).update(values)
    return rows


def _global_step(ckpt: Path) -> int:
    return torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"]


@pytest.mark.slow
def test_console_script_runs_the_demo_offline_from_any_directory(tmp_path):
    out = tmp_path / "run"
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    proc = subprocess.run(
        [*_console_script(), "experiment=demo", *TINY, f"hydra.run.dir={out}"],
        cwd=cwd, env=_script_env(), capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "lightning-repa-train: done" in proc.stdout
    assert "Epoch 0: 100%" in proc.stdout  # the progress bar ran (Lightning's TQDM bar writes to stdout)

    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, list((out / "wandb").iterdir()) if (out / "wandb").exists() else "no wandb dir"
    history = next(runs[0].glob("run-*.wandb")).read_bytes()
    for key in (b"repa/similarity", b"repa/weight", b"repa/loss", b"train/loss"):
        assert key in history, f"{key!r} not in the W&B run file"
    assert list(runs[0].glob("files/media/images/samples_*.png")), "sample grid not logged to W&B"
    assert str(runs[0]) in proc.stdout  # printed where the logs went

    samples, last = out / "samples.png", out / "checkpoints" / "last.ckpt"
    assert samples.is_file() and str(samples) in proc.stdout
    assert last.is_file() and str(last) in proc.stdout
    assert _global_step(last) == 4
    assert (out / "checkpoints" / "step000002.ckpt").is_file()  # every N steps
    assert not (cwd / "outputs").exists()  # hydra.run.dir was honoured; nothing left in the cwd


@pytest.mark.slow
def test_resume_continues_the_step_count_and_the_schedule(tmp_path):
    common = ["experiment=demo", *TINY, "logger=csv", "sample.enabled=false", "schedule=linear",
              "repa.warmup_steps=8", "repa.decay_steps=4", "repa.lam=0.8"]
    with pytest.warns(UserWarning, match="warmup_steps=8 is not shorter than the run"):  # on purpose: both halves
        first = run(_compose(*common, f"paths.output_dir={tmp_path / 'a'}"))
    assert first["global_step"] == 4 and _global_step(first["checkpoint"]) == 4
    with pytest.warns(UserWarning, match="warmup_steps=8 is not shorter than the run"):
        second = run(_compose(*common, "trainer.max_steps=8", f"ckpt_path={first['checkpoint']}",
                              f"paths.output_dir={tmp_path / 'b'}"))
    assert second["global_step"] == 8 and _global_step(second["checkpoint"]) == 8

    a, b = _read_csv(first["csv"]), _read_csv(second["csv"])
    assert sorted(a) == [0, 1, 2, 3] and sorted(b) == [4, 5, 6, 7]
    for step, rows in (*a.items(), *b.items()):  # warm-up w = lam * s / 8 continues across the resume
        assert rows["repa/weight"] == pytest.approx(0.8 * step / 8), step
    # the similarity EMA was restored, not re-initialised by the first value after the resume
    assert b[4]["repa/similarity_ema"] != pytest.approx(b[4]["repa/similarity"])
    expected = 0.99 * a[3]["repa/similarity_ema"] + 0.01 * b[4]["repa/similarity"]
    assert b[4]["repa/similarity_ema"] == pytest.approx(expected)


@pytest.mark.slow
def test_multirun_sweeps_one_run_per_value(tmp_path):
    sweep = tmp_path / "sweep"
    proc = subprocess.run(
        [sys.executable, "-m", "lightning_repa.apps.train", "--multirun", "experiment=demo", "repa.lam=0.25,0.5",
         "logger=csv", "sample.enabled=false", *TINY[1:], "trainer.max_steps=2", f"hydra.sweep.dir={sweep}"],
        cwd=tmp_path, env=_script_env(), capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for job, lam in (("0", 0.25), ("1", 0.5)):
        assert f"repa.lam={lam}" in (sweep / job / ".hydra" / "overrides.yaml").read_text()
        assert _global_step(sweep / job / "checkpoints" / "last.ckpt") == 2
        rows = _read_csv(sweep / job / "csv" / "version_0" / "metrics.csv")
        assert {r["repa/weight"] for r in rows.values()} == {lam}
    assert proc.stdout.count("lightning-repa-train: done") == 2


# --- the tools explain themselves -------------------------------------------------------------------


def _tool(name: str, *args: str, cwd: Path, full_error: bool = False) -> subprocess.CompletedProcess:
    env = _script_env()
    if not full_error:
        env.pop("HYDRA_FULL_ERROR", None)
    script = shutil.which(name)
    assert script, f"{name} is not installed"
    return subprocess.run([script, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_each_tool_opens_its_help_with_what_it_does_and_an_example(tmp_path):
    for name in ("lightning-repa-train", "lightning-repa-probe", "lightning-repa-cache"):
        proc = _tool(name, "--help", cwd=tmp_path)
        head = proc.stdout.splitlines()[:15]
        assert proc.returncode == 0 and head[0].startswith(f"{name}: "), head
        assert any(line.strip().startswith(f"{name} ") or line.strip() == name for line in head[1:]), head
        assert "repa_schema" not in proc.stdout and "Every option" in proc.stdout
    probe = _tool("lightning-repa-probe", "--help", cwd=tmp_path).stdout
    assert "trainer" not in probe and "schedule" not in probe, "the probe's help lists the probe's options only"
    assert "logger=wandb" in probe, "the probe's own logger option (W&B plot and table) is listed"
    assert "cache_dir: null" not in _tool("lightning-repa-cache", "--help", cwd=tmp_path).stdout
    train = _tool("lightning-repa-train", "repa.lam=0.3", "--help", cwd=tmp_path).stdout
    assert re.search(r"repa\.lam=\.\.\. +0\.3 ", train), "the help shows this run's values"


@pytest.mark.slow
def test_a_refused_configuration_prints_its_message_alone_and_leaves_no_run_directory(tmp_path):
    proc = _tool("lightning-repa-train", "repa.family=fluxx", cwd=tmp_path)
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    assert proc.returncode != 0 and len(lines) <= 8, lines
    assert "Traceback" not in proc.stderr and "did you mean 'flux'" in proc.stderr
    assert not (tmp_path / "outputs").exists() and not list(tmp_path.iterdir())
    full = _tool("lightning-repa-train", "repa.family=fluxx", cwd=tmp_path, full_error=True)
    assert full.returncode != 0 and "Traceback" in full.stderr


# --- SimpleTuner settings in the app ----------------------------------------------------------------


def test_a_simpletuner_config_builds_the_callbacks_with_the_command_line_on_top(tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"model_family": "pixart_sigma", "crepa_enabled": True, "crepa_block_index": 2,
                                  "crepa_lambda": 0.7, "crepa_scheduler": "cosine", "crepa_decay_steps": 10,
                                  "crepa_encoder": "vit_tiny_digits_patch2", "layersync_enabled": True,
                                  "layersync_student_block": 2, "layersync_teacher_block": 6}))
    overrides = ["repa.decoder=pixels", "repa.encoder_image_size=16", "repa.lam=0.9"]
    cfg = _compose("experiment=demo", *TINY, "logger=none", "sample.enabled=false", f"simpletuner_config={config}",
                   *overrides, "repa.encoder_checkpoint=${repa_demo_teacher:}", f"paths.output_dir={tmp_path / 'out'}")
    with pytest.warns(UserWarning, match="crepa_encoder"):
        repa, layersync = alignment_callbacks(cfg, [*overrides, "repa.encoder_checkpoint=${repa_demo_teacher:}"])
    assert (repa.block_index, repa.config.lam, repa.config.schedule.value) == (2, 0.9, "cosine")
    assert repa.config.decoder.value == "pixels" and repa.config.encoder_image_size == 16
    assert (layersync.block_index, layersync.config.teacher_block_index, layersync.config.lam) == (1, 5, 0.9)
    assert layersync.config.projector.value == "identity"
    with pytest.warns(UserWarning):
        result = run(cfg, [*overrides, "repa.encoder_checkpoint=${repa_demo_teacher:}"])
    assert result["global_step"] == 4 and {"repa/vit_tiny_digits_patch2/similarity",
                                           "repa/backbone5/similarity"} <= set(result["metrics"])
