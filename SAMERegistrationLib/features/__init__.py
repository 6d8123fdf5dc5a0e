"""Dense feature extractors (SAM embeddings, MIND-SSC) on the working grid."""

from __future__ import annotations

import logging

import torch

from ..config import RegistrationConfig
from .base import FeatureExtractor, FeatureMaps
from .mind import MindExtractor

log = logging.getLogger(__name__)

__all__ = ["FeatureExtractor", "FeatureMaps", "MindExtractor", "make_extractor"]


def make_extractor(config: RegistrationConfig, device: torch.device) -> FeatureExtractor:
    """The extractor the configuration asks for.

    ``sam`` uses the given weights, else the shipped model. ``auto`` is SAM with given weights;
    without them, SAM with the shipped model only where its evaluation found it better than
    MIND-SSC (``shipped_model_preferred``), else MIND.
    """
    from .sam import SamExtractor, default_weights, shipped_model_preferred

    if config.features == "mind":
        return MindExtractor(device)
    weights = config.sam_weights
    if weights is None and (config.features == "sam" or shipped_model_preferred()):
        weights = default_weights()
    if weights is None:
        if config.features == "auto":
            log.info("no SAM weights given: using MIND-SSC features")
        return MindExtractor(device)
    return SamExtractor(weights, device)
