"""SAME++ registration of CT scans: SAM features, affine, coarse, deformable and instance stages.

The public names are imported on first use, so that light modules (``mrml``, ``config``) load
without PyTorch, for example inside 3D Slicer's own process.
"""

from .lazy import lazy_attributes

__version__ = "0.1.0"
__all__ = [
    "Alignment",
    "RegistrationConfig",
    "RegistrationResult",
    "SameRegistrationError",
    "register",
]

__getattr__ = lazy_attributes(
    __name__,
    {
        "Alignment": ".alignment",
        "RegistrationConfig": ".config",
        "RegistrationResult": ".result",
        "SameRegistrationError": ".errors",
        "register": ".pipeline",
    },
)
