"""Training checkpoints shared by ``train-sam`` and ``train-deform``.

A checkpoint holds the network, optimiser, loss scaler, every random generator's state and the
iteration, so a resumed run continues as if it had not stopped. Files are written under a
temporary name and renamed, read with ``weights_only=True``, and refused with a message saying
what to do when they are damaged or belong to another run.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from ..checkpoint_io import load_weights_only
from ..errors import CheckpointError, ConfigError

_CHECKPOINT = re.compile(r"checkpoint_(\d+)\.pt$")


class TrainingState(Protocol):
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    device: torch.device
    iteration: int


def checkpoint_path(output_dir: Path, iteration: int) -> Path:
    return output_dir / f"checkpoint_{iteration:07d}.pt"


def list_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """(iteration, path) of the checkpoints in ``output_dir``, oldest first."""
    if not output_dir.is_dir():
        return []
    found = [(_CHECKPOINT.search(p.name), p) for p in output_dir.iterdir()]
    return sorted((int(m.group(1)), p) for m, p in found if m)


def remove_old_checkpoints(output_dir: Path, keep: int) -> None:
    for _, old in list_checkpoints(output_dir)[:-keep]:
        old.unlink()


def training_payload(state: TrainingState) -> dict[str, Any]:
    """What every checkpoint holds about the state; callers add their format, config and data."""
    return {
        "iteration": state.iteration,
        "state_dict": state.model.state_dict(),
        "optimizer": state.optimizer.state_dict(),
        "scaler": state.scaler.state_dict(),
        "rng": _rng_states(state.device),
    }


def read_checkpoint(
    path: Path, file_format: str, required: Sequence[str], command: str
) -> dict[str, Any]:
    """Read a checkpoint of ``command`` safely (weights_only, onto the CPU) and check its layout."""
    remedy = (
        "Delete it to resume from the previous checkpoint, or start a new run in another output "
        "folder."
    )
    payload = load_weights_only(path, "cpu", "Training checkpoint", remedy, remedy)
    if not isinstance(payload, dict) or payload.get("format") != file_format:
        raise CheckpointError(
            f"{path} is not a training checkpoint written by {command}. Point --resume at the "
            f"output folder of a {command} run."
        )
    absent = [k for k in required if k not in payload]
    if absent:
        raise CheckpointError(
            f"Training checkpoint {path} lacks {', '.join(absent)}; it is damaged. Delete it to "
            "resume from the previous checkpoint."
        )
    return payload


def restore(state: TrainingState, payload: dict[str, Any], path: Path) -> None:
    """Put a checkpoint's network, optimiser, scaler, random states and iteration into ``state``."""
    try:
        state.model.load_state_dict(payload["state_dict"])
        state.optimizer.load_state_dict(payload["optimizer"])
        if payload["scaler"]:  # empty when the run so far had no loss scaling (CPU)
            state.scaler.load_state_dict(payload["scaler"])
        _set_rng_states(payload["rng"], state.device)
    except (RuntimeError, KeyError, ValueError, TypeError, IndexError) as err:
        detail = (str(err).strip().splitlines() or [""])[0][:300]
        raise CheckpointError(
            f"Training checkpoint {path} does not fit this run ({detail}). Delete it to resume from "
            "the previous checkpoint, or start a new run in another output folder."
        ) from err
    state.iteration = int(payload["iteration"])


def check_same_settings(
    stored: dict[str, Any], wanted: dict[str, Any], resumable: Sequence[str], path: Path
) -> None:
    """Refuse to resume when a setting outside ``resumable`` changed: it would break exactness."""
    changed = sorted(k for k in wanted if k not in resumable and stored.get(k) != wanted[k])
    if changed:
        details = ", ".join(f"{k}: {stored.get(k)} -> {wanted[k]}" for k in changed)
        raise ConfigError(
            f"Cannot resume from {path}: settings differ from the interrupted run ({details}). "
            f"Resume with the same settings (only {', '.join(resumable)} may change), or start a "
            "new run in another output folder."
        )


def prepare_log(path: Path, header: str, iteration: int) -> None:
    """Keep the log lines up to ``iteration`` (a resumed run rewrites what came after)."""
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)[1:] if path.exists() else []
    kept = [line for line in lines if int(line.split("\t", 1)[0]) <= iteration]
    path.write_text(header + "".join(kept))


def _rng_states(device: torch.device) -> dict[str, Any]:
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, gauss],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else [],
    }


def _set_rng_states(states: dict[str, Any], device: torch.device) -> None:
    random.setstate(states["python"])
    kind, keys, position, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
    torch.set_rng_state(states["torch"])
    if device.type == "cuda":
        torch.cuda.set_rng_state_all(states["cuda"])
