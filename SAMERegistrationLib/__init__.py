"""SAME++ registration of CT scans: SAM features, affine, coarse, deformable and instance stages.

The public names are imported on first use, so that light modules (``mrml``, ``config``) load
without PyTorch, for example inside 3D Slicer's own process.
"""

from importlib import import_module
from typing import Any

__version__ = "0.1.0"
__all__ = [
    "Alignment",
    "RegistrationConfig",
    "RegistrationResult",
    "SameRegistrationError",
    "register",
]

_WHERE = {
    "Alignment": ".alignment",
    "RegistrationConfig": ".config",
    "RegistrationResult": ".result",
    "SameRegistrationError": ".errors",
    "register": ".pipeline",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(import_module(_WHERE[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
