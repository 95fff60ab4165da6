"""Resumable training checkpoints: model + AdamW state in safetensors, the rest in json.

A checkpoint directory holds `train_state.safetensors` (every parameter under `model.<name>`,
tied parameters once; AdamW moments under `optim.<index>.<key>`; the torch CPU RNG state) and
`train_state.json` (step, best validation loss, optimizer hyper-parameters, run config). The
data position is the step itself (llama/train/data.py's Batches is a pure function of the step), so
loading one restores the run exactly: the same next batch, the same next update.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

WEIGHTS = "train_state.safetensors"
META = "train_state.json"


class TrainStateError(ValueError):
    """A training checkpoint is missing, incomplete or does not fit the model/optimizer."""


def save_state(
    directory: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    meta: dict[str, Any],
) -> Path:
    """Write the checkpoint atomically (temp files, then rename). Returns the directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{n}": p.detach().cpu().contiguous() for n, p in model.named_parameters()}
    opt = optimizer.state_dict()
    for idx, state in opt["state"].items():
        for key, value in state.items():
            tensors[f"optim.{idx}.{key}"] = torch.as_tensor(value).detach().cpu().unsqueeze(0)
    tensors["rng.cpu"] = torch.get_rng_state()
    groups = [{k: v for k, v in g.items()} for g in opt["param_groups"]]
    full_meta = {**meta, "param_groups": groups}
    tmp_w, tmp_m = directory / (WEIGHTS + ".tmp"), directory / (META + ".tmp")
    save_file(tensors, str(tmp_w))
    tmp_m.write_text(json.dumps(full_meta, indent=2) + "\n")
    os.replace(tmp_w, directory / WEIGHTS)
    os.replace(tmp_m, directory / META)
    return directory


def has_state(directory: str | Path) -> bool:
    d = Path(directory)
    return (d / WEIGHTS).is_file() and (d / META).is_file()


def load_state(
    directory: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer
) -> dict[str, Any]:
    """Restore model, optimizer and RNG in place from `directory`; return the json meta."""
    directory = Path(directory)
    if not has_state(directory):
        raise TrainStateError(f"{directory}: no {WEIGHTS} + {META} to resume from")
    tensors = load_file(str(directory / WEIGHTS))
    meta = json.loads((directory / META).read_text())
    _copy_params(tensors, model, directory / WEIGHTS)
    optimizer.load_state_dict(_optimizer_dict(tensors, meta, directory))
    torch.set_rng_state(tensors["rng.cpu"])
    return meta


def load_weights(directory: str | Path, model: nn.Module) -> None:
    """Copy only the model weights of the checkpoint in `directory` into `model`."""
    directory = Path(directory)
    if not (directory / WEIGHTS).is_file():
        raise TrainStateError(f"{directory}: no {WEIGHTS} to take weights from")
    _copy_params(load_file(str(directory / WEIGHTS)), model, directory / WEIGHTS)


def _copy_params(tensors: dict, model: nn.Module, source: Path) -> None:
    params = dict(model.named_parameters())
    missing = [n for n in params if f"model.{n}" not in tensors]
    if missing:
        raise TrainStateError(f"{source}: missing parameters {missing[:5]}")
    with torch.no_grad():
        for name, p in params.items():
            t = tensors[f"model.{name}"]
            if t.shape != p.shape:
                raise TrainStateError(
                    f"{source}: model.{name} has shape {tuple(t.shape)}, "
                    f"the model expects {tuple(p.shape)}"
                )
            p.copy_(t)


def _optimizer_dict(tensors: dict, meta: dict[str, Any], directory: Path) -> dict[str, Any]:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, idx, name = key.split(".", 2)
            entry = state.setdefault(int(idx), {})
            entry[name] = value[0].clone()  # saved with a leading axis of 1 (0-d safe)
    if "param_groups" not in meta:
        raise TrainStateError(f"{directory / META}: missing 'param_groups'")
    return {"state": state, "param_groups": meta["param_groups"]}
