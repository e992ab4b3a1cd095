"""Checkpoints of an EAGLE head's training (specserve.drafters.training): the trainable
weights and the AdamW moments in safetensors, the progress in JSON, so that a resumed run
reaches the same weights as an uninterrupted one."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from specserve.speculative.eagle_head import EagleHead

CHECKPOINT_JSON = "checkpoint.json"
CHECKPOINT_WEIGHTS = "checkpoint.safetensors"
ADAM_STATE = ("step", "exp_avg", "exp_avg_sq")


def trainable(head: EagleHead) -> dict[str, torch.nn.Parameter]:
    """The head's parameters that training updates, by name."""
    return {name: p for name, p in head.named_parameters() if p.requires_grad}


def save(
    directory: Path, head: EagleHead, optimizer: torch.optim.Optimizer, state: dict[str, Any]
) -> None:
    """Weights + AdamW moments in safetensors, progress in JSON; written through temporary
    names, weights first, and cross-checked by step on resume."""
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{n}": p.detach().clone() for n, p in trainable(head).items()}
    for name, param in trainable(head).items():
        for key, value in optimizer.state.get(param, {}).items():
            tensors[f"opt.{name}.{key}"] = value.detach().clone()
    weights_tmp = directory / (CHECKPOINT_WEIGHTS + ".tmp")
    save_file(tensors, str(weights_tmp), metadata={"step": str(state["step"])})
    os.replace(weights_tmp, directory / CHECKPOINT_WEIGHTS)
    json_tmp = directory / (CHECKPOINT_JSON + ".tmp")
    json_tmp.write_text(json.dumps(state, indent=2) + "\n")
    os.replace(json_tmp, directory / CHECKPOINT_JSON)


def load(
    directory: Path, head: EagleHead, optimizer: torch.optim.Optimizer, plan: dict[str, Any]
) -> dict[str, Any] | None:
    """Restore head and optimizer from ``directory``; the saved progress, or None if there is
    no checkpoint. Refuses a checkpoint of another training plan (data, seed, epochs...)."""
    json_path = directory / CHECKPOINT_JSON
    if not json_path.is_file():
        return None
    state: dict[str, Any] = json.loads(json_path.read_text())
    if state["plan"] != plan:
        raise ValueError(
            f"{directory}: the checkpoint is of another training run ({state['plan']} != "
            f"{plan}); resume with the same data and recipe, or start fresh without resume"
        )
    with safe_open(str(directory / CHECKPOINT_WEIGHTS), framework="pt") as handle:
        if (handle.metadata() or {}).get("step") != str(state["step"]):
            raise ValueError(f"{directory}: checkpoint files of different steps; start fresh")
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    head.load_state_dict({n[len("model.") :]: t for n, t in tensors.items() if n[:6] == "model."})
    params = list(trainable(head).items())
    adam = {
        index: {key: tensors[f"opt.{name}.{key}"] for key in ADAM_STATE}
        for index, (name, _) in enumerate(params)
        if f"opt.{name}.step" in tensors
    }
    groups = optimizer.state_dict()["param_groups"]
    optimizer.load_state_dict({"state": adam, "param_groups": groups})
    return state
