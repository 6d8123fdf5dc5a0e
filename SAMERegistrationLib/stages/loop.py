"""The stage loop: the configured SAME++ stages run in order on one Alignment."""

from __future__ import annotations

import time

from ..alignment import Alignment
from ..config import RegistrationConfig
from ..features.base import FeatureMaps
from . import StageContext, affine, coarse, deform, instance, seconds_since, skipped

# Each stage by its configuration section (``config.<name>.enabled`` switches it).
RUNNERS = {
    "affine": affine.run,
    "coarse": coarse.run,
    "deform": deform.run,
    "instance": instance.run,
}


def run_stages(
    names: tuple[str, ...],
    fixed_maps: FeatureMaps,
    moving_maps: FeatureMaps,
    alignment: Alignment,
    config: RegistrationConfig,
    context: StageContext,
    stages: dict[str, dict],
) -> Alignment:
    """Run the enabled stages ``names`` in order; record each one's report in ``stages``."""
    for name in names:
        clock = time.perf_counter()
        context.report(name, 0, 1)
        if not getattr(config, name).enabled:
            stages[name] = skipped("disabled")
        else:
            alignment, info = RUNNERS[name](fixed_maps, moving_maps, alignment, config, context)
            if info.get("status") == "skipped":
                stages[name] = info
            else:
                stages[name] = {"status": "done", "seconds": seconds_since(clock), **info}
        context.report(name, 1, 1)
    return alignment
