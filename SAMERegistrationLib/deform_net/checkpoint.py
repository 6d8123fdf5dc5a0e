"""The SAM-deform weights file: ``{"state_dict", "meta"}`` read with ``weights_only=True``.

``meta`` says how the network was trained, so registration uses it the same way: ``format``
("same-deform"), ``variant`` (svf or dvf), ``correlation`` (bool), ``integration_steps``,
``features`` (sam or mind: the embeddings of the pre-alignment and correlation),
``sam_weights_sha256`` (which SAM model, when SAM), ``working_spacing_mm``, and training details.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..checkpoint_io import load_weights_only, write_checkpoint
from ..errors import CheckpointError
from .field import VARIANTS
from .network import DeformNetwork

FORMAT = "same-deform"
_SHOW = 5


@dataclass
class DeformModel:
    """A loaded network and how to use it."""

    network: DeformNetwork
    variant: str
    integration_steps: int
    features: str
    working_spacing_mm: float | None
    sam_weights_sha256: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def correlation(self) -> bool:
        return self.network.correlation


def deform_meta(
    variant: str,
    correlation: bool,
    integration_steps: int,
    features: str,
    working_spacing_mm: float,
    sam_weights_sha256: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """The ``meta`` entry of a weights file (plain values only, for weights_only loading)."""
    return {
        "format": FORMAT,
        "variant": variant,
        "correlation": bool(correlation),
        "integration_steps": int(integration_steps),
        "features": features,
        "working_spacing_mm": float(working_spacing_mm),
        "sam_weights_sha256": sam_weights_sha256,
        **extra,
    }


def save_deform_weights(
    network: DeformNetwork, path: str | os.PathLike[str], meta: dict[str, Any]
) -> None:
    """Write the weights and ``meta`` atomically (temporary name, then rename)."""
    path = Path(path)
    state = {k: v.detach().cpu() for k, v in network.state_dict().items()}
    write_checkpoint({"state_dict": state, "meta": dict(meta)}, path)


def load_deform_weights(path: str | os.PathLike[str], map_location: Any = "cpu") -> DeformModel:
    """Read a weights file written by ``save_deform_weights`` (or a train-deform checkpoint)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"SAM-deform weights file {path} does not exist or is not a file. Give the "
            "deform_trained.pth written by 'same-register train-deform', or leave out "
            "--deform-weights (deform.weights) to register without the SAM-deform stage."
        )
    obj = load_weights_only(
        path,
        map_location,
        "SAM-deform weights file",
        "Use a file written by train-deform or save_deform_weights.",
        "Copy it again or train a new one with train-deform.",
    )
    state, meta = _split(obj, path)
    variant = meta.get("variant")
    if variant not in VARIANTS:
        raise CheckpointError(
            f"SAM-deform weights file {path} has meta variant {variant!r}; expected one of "
            f"{VARIANTS}. Re-save the file with save_deform_weights."
        )
    try:
        steps = int(meta.get("integration_steps", 7))
        spacing = meta.get("working_spacing_mm")
        spacing = None if spacing is None else float(spacing)
    except (TypeError, ValueError) as err:
        raise CheckpointError(
            f"SAM-deform weights file {path} has invalid meta ({err}). Re-save the file with "
            "save_deform_weights."
        ) from err
    network = DeformNetwork(correlation=bool(meta.get("correlation", True)))
    _check_keys(network, state, path)
    network.load_state_dict(state, strict=True)
    if isinstance(map_location, str | torch.device):
        network.to(map_location)
    return DeformModel(
        network=network.eval(),
        variant=variant,
        integration_steps=steps,
        features=str(meta.get("features", "sam")),
        working_spacing_mm=spacing,
        sam_weights_sha256=meta.get("sam_weights_sha256"),
        meta=dict(meta),
    )


def _split(obj: Any, path: Path) -> tuple[dict[str, torch.Tensor], Mapping[str, Any]]:
    state = obj.get("state_dict") if isinstance(obj, Mapping) else None
    meta = obj.get("meta") if isinstance(obj, Mapping) else None
    if isinstance(state, Mapping) and isinstance(meta, Mapping) and meta.get("format") == FORMAT:
        return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}, meta
    keys = [str(k) for k in (state or obj or {})][:_SHOW] if isinstance(obj, Mapping) else []
    hint = ""
    if any(k.removeprefix("module.").startswith("backbone.") for k in keys):
        hint = " It looks like a SAM checkpoint: give it with --weights (sam_weights) instead."
    raise CheckpointError(
        f"{path} is not a SAM-deform weights file (no 'state_dict' with meta format '{FORMAT}'; "
        f"found keys such as {keys}).{hint} Give the deform_trained.pth written by "
        "'same-register train-deform'."
    )


def _check_keys(network: DeformNetwork, state: Mapping[str, torch.Tensor], path: Path) -> None:
    expected = network.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or mismatched:
        problems = [
            f"{k}: expected {tuple(expected[k].shape)}, found "
            + (str(tuple(state[k].shape)) if k in state else "missing")
            for k in (mismatched + missing)[:_SHOW]
        ] + [f"{k}: not part of the network" for k in unexpected[:_SHOW]]
        raise CheckpointError(
            f"SAM-deform weights file {path} does not fit the SAM-deform network described by its "
            f"meta ({len(mismatched)} shape mismatches, {len(missing)} missing, {len(unexpected)} "
            "unexpected weights): " + "; ".join(problems) + ". Use a complete file written by "
            "train-deform with this version of the library."
        )
