"""Training: the SAM network self-supervised (``train-sam``) and SAM-deform (``train-deform``).

The public names are imported on first use, so that the light modules of this package (``views``,
``sam_losses``) load without the trainers' file reading (SimpleITK), e.g. on a machine without it.
"""

from importlib import import_module
from typing import Any

__all__ = ["DeformTrainConfig", "SAMTrainConfig", "collect_scans", "train_deform", "train_sam"]

_WHERE = {
    "DeformTrainConfig": ".deform_trainer",
    "train_deform": ".deform_trainer",
    "SAMTrainConfig": ".sam_trainer",
    "collect_scans": ".sam_trainer",
    "train_sam": ".sam_trainer",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(import_module(_WHERE[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
