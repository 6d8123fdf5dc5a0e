"""Training: the SAM network self-supervised (``train-sam``) and SAM-deform (``train-deform``).

The public names are imported on first use, so that the light modules of this package (``views``,
``sam_losses``) load without the trainers' file reading (SimpleITK), e.g. on a machine without it.
"""

from ..lazy import lazy_attributes

__all__ = ["DeformTrainConfig", "SAMTrainConfig", "collect_scans", "train_deform", "train_sam"]

__getattr__ = lazy_attributes(
    __name__,
    {
        "DeformTrainConfig": ".deform_trainer",
        "train_deform": ".deform_trainer",
        "SAMTrainConfig": ".sam_trainer",
        "collect_scans": ".sam_trainer",
        "train_sam": ".sam_trainer",
    },
)
