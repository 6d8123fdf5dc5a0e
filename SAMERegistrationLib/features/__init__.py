"""Dense feature extractors (SAM embeddings, MIND-SSC) on the working grid."""

from __future__ import annotations

import logging
import os

import torch

from ..config import RegistrationConfig
from .base import FeatureExtractor, FeatureMaps
from .mind import MindExtractor

log = logging.getLogger(__name__)

__all__ = [
    "FeatureExtractor",
    "FeatureMaps",
    "MindExtractor",
    "make_extractor",
    "resolve_features",
]


def resolve_features(
    features: str, sam_weights: str | os.PathLike[str] | None
) -> tuple[str, str | os.PathLike[str] | None]:
    """The feature type ``features`` stands for ("sam" or "mind") and the SAM weights it uses.

    ``sam`` uses the given weights, else the shipped model. ``auto`` is SAM with given weights;
    without them, SAM with the shipped model only where its evaluation found it better than
    MIND-SSC (``shipped_model_preferred``), else MIND. Without any SAM weights it is MIND.
    """
    from .sam import default_weights, shipped_model_preferred  # late: loads the SAM network code

    if features == "mind":
        return "mind", None
    weights = sam_weights
    if weights is None and (features == "sam" or shipped_model_preferred()):
        weights = default_weights()
    if weights is None:
        if features == "auto":
            log.info("no SAM weights given: using MIND-SSC features")
        return "mind", None
    return "sam", weights


def make_extractor(config: RegistrationConfig, device: torch.device) -> FeatureExtractor:
    """The extractor the configuration asks for (see ``resolve_features``)."""
    from .sam import SamExtractor

    name, weights = resolve_features(config.features, config.sam_weights)
    if name == "mind":
        instance = config.instance
        return MindExtractor(device, fine=instance.enabled and instance.fine_descriptors)
    return SamExtractor(weights, device)
