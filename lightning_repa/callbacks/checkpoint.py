"""Checkpoints with and without REPA. No Lightning import.

- The callback's identity: its teacher's name and state key, and the keys earlier versions wrote.
- A checkpoint without this callback's projector (a plain run resumed with REPA) gets a fresh one,
  in the model's state and in each optimizer's state, with a warning; a projector of other
  dimensions (another projector kind or teacher) is an error that names what changed.
- `strip_projectors` writes a checkpoint without the projectors and the callbacks' states, for
  inference (`load_from_checkpoint`) or training without the callback.
"""

from __future__ import annotations

import ast
import warnings
from pathlib import Path
from typing import Any, Iterable, Optional

import torch
from torch import nn

from lightning_repa.callbacks.attach import is_projector_key
from lightning_repa.choices import Teacher
from lightning_repa.config import RepaConfig

STATE_PREFIX = "RepaCallback"
RECORD = "repa_projectors"  # checkpoint key: projector attribute -> its optimizer positions


def teacher_name(cfg: RepaConfig) -> str:
    """The teacher's one name, in the logs and in the state key: the encoder, or `backbone<block>`."""
    return cfg.encoder if cfg.teacher is Teacher.encoder else f"backbone{cfg.teacher_block_index}"


def settings(repa: Any) -> dict[str, Any]:
    """What a resumed run should share with the run that wrote the checkpoint (warned about when not)."""
    cfg = repa.config
    return {"block_index": repa.block_index, "teacher": repa.teacher_name, "projector": cfg.projector.value,
            "lam": cfg.lam, "schedule": cfg.schedule.value, "warmup_steps": cfg.warmup_steps,
            "decay_steps": cfg.decay_steps, "lambda_end": cfg.lambda_end, "power": cfg.power}


def changes(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """`name: saved -> now` for each setting that differs (settings a checkpoint lacks are skipped)."""
    return [f"{k}: {saved[k]!r} -> {v!r}" for k, v in now.items() if k in saved and saved[k] != v]


def _key_settings(key: str) -> dict[str, Any]:
    """The family, block and teacher written in a state key `RepaCallback{...}` (0.1.0 named a backbone
    teacher `block <i>`)."""
    try:
        fields = ast.literal_eval(key[len(STATE_PREFIX):])
    except (ValueError, SyntaxError):
        return {}
    teacher = str(fields.get("teacher", ""))
    return {**fields, "teacher": f"backbone{teacher[6:]}" if teacher.startswith("block ") else teacher}


def find_state(repa: Any, states: dict[str, Any], sole: bool) -> Optional[str]:
    """The key of `repa`'s state in a checkpoint: its own; one an earlier version wrote (a backbone
    teacher named `block <i>`, no `name`); or, when `sole` (the only REPA callback) and the checkpoint
    holds one REPA state, that one (its settings changed)."""
    if repa.state_key in states:
        return repa.state_key
    ours = [k for k in states if k.startswith(STATE_PREFIX)]
    same = [k for k in ours if {**_key_settings(k), "name": None} == {
        "family": repa.family.name, "block_index": repa.block_index, "teacher": repa.teacher_name, "name": None}]
    if same:
        return same[0]
    return ours[0] if sole and len(ours) == 1 else None


def saved_settings(key: str, state: dict[str, Any]) -> dict[str, Any]:
    return {**{k: v for k, v in _key_settings(key).items() if k in ("block_index", "teacher")},
            **state.get("settings", {})}


def prepare_projector(repa: Any, module: nn.Module, checkpoint: dict[str, Any], sole: bool) -> bool:
    """Before the module's weights load: a checkpoint without `repa`'s projector gets the fresh one's
    weights (True: the optimizer entries follow at fit start); one of other dimensions is an error."""
    weights, attr = checkpoint.get("state_dict"), repa.projector_attr
    if weights is None:
        return False
    prefix = f"{attr}."
    saved = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
    current = getattr(module, attr).state_dict()
    if not saved:
        weights.update({prefix + k: v.detach().clone() for k, v in current.items()})
        warnings.warn(f"REPA: the checkpoint has no REPA projector `{attr}` (a run without this callback): it "
                      "starts fresh, with new optimizer state", UserWarning, stacklevel=2)
        return True
    if {k: tuple(v.shape) for k, v in saved.items()} != {k: tuple(v.shape) for k, v in current.items()}:
        states = checkpoint.get("callbacks") or {}
        key = find_state(repa, states, sole)
        changed = changes(saved_settings(key, states[key]), settings(repa)) if key else []
        what = "; ".join(c for c in changed if c.split(":")[0] in ("projector", "teacher")) or "its teacher or kind"
        raise ValueError(
            f"the checkpoint's `{attr}` was trained for another projector or teacher ({what}): its weights do not "
            "fit this fit's. Resume with the settings it was trained with, or drop the projector with "
            "lightning_repa.strip_projectors(ckpt_path) to train a fresh one"
        )
    return False


def _positions(optimizer: torch.optim.Optimizer, params: set[int]) -> list[int]:
    """Where `params` sit in the optimizer's state dict (its parameters numbered across groups)."""
    flat = [p for group in optimizer.param_groups for p in group["params"]]
    return [i for i, p in enumerate(flat) if id(p) in params]


def record_projectors(checkpoint: dict[str, Any], attr: str, projector: nn.Module,
                      optimizers: Iterable[torch.optim.Optimizer]) -> None:
    """Note in the checkpoint which optimizer entries are the projector's (for `strip_projectors`)."""
    ids = {id(p) for p in projector.parameters()}
    checkpoint.setdefault(RECORD, {})[attr] = [_positions(opt, ids) for opt in optimizers]


def add_optimizer_entries(checkpoint: dict[str, Any], projector: nn.Module,
                          optimizers: list[torch.optim.Optimizer]) -> None:
    """Give the projector fresh entries in each saved optimizer state, where today's optimizers hold it,
    so that a checkpoint written without it loads (its other entries keep their state)."""
    ids = {id(p) for p in projector.parameters()}
    for opt, saved in zip(optimizers, checkpoint.get("optimizer_states", [])):
        groups, free = saved["param_groups"], 1 + max((i for g in saved["param_groups"] for i in g["params"]), default=-1)
        for g, group in enumerate(opt.param_groups):
            theirs = [p for p in group["params"] if id(p) not in ids]
            if g >= len(groups) and not theirs:  # a group of the projector alone
                groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": []})
            if g >= len(groups) or len(groups[g]["params"]) != len(theirs):
                raise ValueError("the optimizer's parameter groups differ from the checkpoint's beyond the REPA "
                                 "projector: resume with the optimizer the checkpoint was written with")
            old = iter(groups[g]["params"])
            new = []
            for p in group["params"]:
                new.append(free if id(p) in ids else next(old))
                free += id(p) in ids
            groups[g]["params"] = new


def strip_projectors(checkpoint_path: str | Path, output_path: str | Path | None = None) -> Path:
    """Write the checkpoint without REPA: the projectors' weights and optimizer entries, and the REPA
    callbacks' states, removed. For `Module.load_from_checkpoint` (inference) or a fit without the
    callback (`load_from_checkpoint(path, strict=False)` also works for the weights). Returns the
    path written (default: `<name>.norepa.ckpt` beside the input).
    """
    path = Path(checkpoint_path)
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    weights = checkpoint.get("state_dict", {})
    dropped = [k for k in weights if is_projector_key(k)]
    for key in dropped:
        del weights[key]
    for key in [k for k in checkpoint.get("callbacks", {}) if str(k).startswith(STATE_PREFIX)]:
        del checkpoint["callbacks"][key]
    recorded = checkpoint.pop(RECORD, None)
    for i, saved in enumerate(checkpoint.get("optimizer_states", [])):
        if recorded:
            positions = {p for per_optimizer in recorded.values() for p in per_optimizer[i]}
        else:  # written before positions were recorded: the projectors are attached last
            flat = [p for g in saved["param_groups"] for p in g["params"]]
            positions = set(flat[len(flat) - len(dropped):]) if dropped else set()
            warnings.warn("strip_projectors: the checkpoint does not record the projectors' optimizer entries; "
                          "the last ones are taken (the projectors are attached after the model)", UserWarning,
                          stacklevel=2)
        _drop_entries(saved, positions)
    out = Path(output_path) if output_path is not None else path.with_suffix(".norepa.ckpt")
    torch.save(checkpoint, out)
    return out


def _drop_entries(saved: dict[str, Any], positions: set[int]) -> None:
    """Remove parameter entries from a saved optimizer state, renumbering the rest from 0; a group
    that held projector parameters only goes too."""
    keep = [i for g in saved["param_groups"] for i in g["params"] if i not in positions]
    renumber = {old: new for new, old in enumerate(keep)}
    saved["param_groups"] = [{**g, "params": [renumber[i] for i in g["params"] if i in renumber]}
                             for g in saved["param_groups"] if not g["params"] or set(g["params"]) - positions]
    saved["state"] = {renumber[i]: s for i, s in saved.get("state", {}).items() if i in renumber}
