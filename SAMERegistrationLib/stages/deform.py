"""SAM-deform: the learned diffeomorphic stage.

Without network weights the pipeline skips this stage with a logged reason, and the instance
optimisation refines the coarse field directly. This version has no SAM-deform network yet, so
weights given for it are refused before any work starts rather than silently ignored.
"""

from __future__ import annotations

from ..config import DeformConfig
from ..errors import ConfigError


def check_available(config: DeformConfig) -> None:
    """Refuse SAM-deform weights: there is no network in this version to load them into."""
    raise ConfigError(
        f"SAM-deform weights were given ({config.weights}), but this version of the library has "
        "no SAM-deform network to load them into. Remove deform.weights (or pass --stages "
        "affine,coarse,instance) to register without the learned stage."
    )
