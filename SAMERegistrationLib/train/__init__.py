"""Training: the SAM network self-supervised (``train-sam``) and SAM-deform (``train-deform``)."""

from .deform_trainer import DeformTrainConfig, train_deform
from .sam_trainer import SAMTrainConfig, collect_scans, train_sam

__all__ = ["DeformTrainConfig", "SAMTrainConfig", "collect_scans", "train_deform", "train_sam"]
