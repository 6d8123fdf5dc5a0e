"""Reading and writing PyTorch weight files safely: weights-only loading, atomic saving."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError


def write_checkpoint(payload: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Save atomically (temporary name, then rename): an interrupted save never leaves a
    truncated file behind."""
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    try:
        torch.save(payload, partial)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def load_weights_only(
    path: Path, map_location: Any, what: str, object_remedy: str, corrupt_remedy: str
) -> Any:
    """``torch.load(weights_only=True)``, failing with a CheckpointError that says what to do.

    ``what`` names the file ("SAM weights file"); the remedies finish the two messages: for a
    file that stores Python objects, and for one that is not a checkpoint or is corrupt.
    """
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises many types for unreadable files; all mean the same here
        text = str(err)
        found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
        if found:
            message = (
                f"{what} {path} stores a Python object ({found.group(1)}) that safe "
                f"(weights_only) loading refuses. {object_remedy}"
            )
        else:
            detail = (text.strip().splitlines() or [""])[0][:200]
            message = (
                f"{what} {path} could not be read as a PyTorch checkpoint "
                f"({type(err).__name__}{': ' + detail if detail else ''}); it is not a torch.save "
                f"file or it is truncated or corrupt. {corrupt_remedy}"
            )
        raise CheckpointError(message) from err
