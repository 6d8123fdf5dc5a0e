"""Self-supervised training of the SAM network on unlabelled CT (``same-register train-sam``)."""

from .sam_trainer import SAMTrainConfig, collect_scans, train_sam

__all__ = ["SAMTrainConfig", "collect_scans", "train_sam"]
