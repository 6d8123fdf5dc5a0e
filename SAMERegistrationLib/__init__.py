"""SAME++ registration of CT scans: SAM features, affine, coarse, deformable and instance stages."""

from .config import RegistrationConfig
from .errors import SameRegistrationError
from .pipeline import register
from .result import RegistrationResult

__version__ = "0.1.0"
__all__ = ["RegistrationConfig", "RegistrationResult", "SameRegistrationError", "register"]
