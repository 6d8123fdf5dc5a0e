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
    """The extractor the configuration asks for; ``auto`` is SAM when weights exist, else MIND."""
    from .sam import SamExtractor, default_weights

    weights = config.sam_weights or default_weights()
    if config.features == "mind" or (config.features == "auto" and weights is None):
        if config.features == "auto":
            log.info("no SAM weights available: using MIND-SSC features")
        return MindExtractor(device)
    return SamExtractor(weights, device)
