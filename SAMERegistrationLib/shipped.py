"""Model files that ship with the library, and the check that each is the file its record names.

Every shipped model ``NAME.pt`` has a record ``NAME.json`` (its SHA256 and training facts) and a
model card ``NAME.md``. A damaged or replaced weights file would give wrong results without any
error, so the hash is checked before use (once per file version and process).
"""

from __future__ import annotations

import hashlib
import json
import os
from functools import cache
from pathlib import Path
from typing import Any

from .errors import CheckpointError

MODELS = Path(__file__).resolve().parent / "models"


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_record(record: str | os.PathLike) -> dict[str, Any]:
    """A model's record, or an empty dict when it is missing or unreadable."""
    try:
        values = json.loads(Path(record).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return values if isinstance(values, dict) else {}


def verify_shipped(
    weights: str | os.PathLike, record: str | os.PathLike, what: str, instead: str
) -> str:
    """Check ``weights`` against the SHA256 in ``record``; return the hash.

    ``what`` names the model in messages ("SAM model"), ``instead`` says what the user can do
    without it ("pass --weights PATH/TO/SAM.pth").
    """
    weights, record = Path(weights), Path(record)
    try:
        expected = json.loads(record.read_text(encoding="utf-8"))["sha256"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(
            f"The record of the shipped {what} ({record}) is missing or unreadable ({err}). "
            f"Reinstall SAMERegistration, or {instead}."
        ) from err
    try:
        info = weights.stat()
    except OSError as err:
        raise CheckpointError(f"The shipped {what} {weights} cannot be read ({err}).") from err
    actual = _cached_sha256(str(weights), info.st_size, info.st_mtime_ns)
    if actual != expected:
        raise CheckpointError(
            f"The shipped {what} {weights} does not match its recorded SHA256 (expected "
            f"{expected[:16]}..., found {actual[:16]}...): the file is damaged or was replaced. "
            f"Reinstall SAMERegistration, or {instead}."
        )
    return actual


@cache
def _cached_sha256(path: str, size: int, mtime_ns: int) -> str:
    """Hash once per file version (size and time key the cache) and process."""
    return file_sha256(path)
