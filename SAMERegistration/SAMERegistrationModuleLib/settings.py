"""What a run is asked to do (settings) and which nodes it fills (outputs).

The names (stages, features, devices, the spacing range) come from the library's torch-free
``SAMERegistrationLib.config``, so the panel, the logic and the command line agree.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from SAMERegistrationLib.config import DEVICES, FEATURES, SPACING_RANGE_MM, STAGES

QA_KINDS = ("magnitude", "jacobian")
ROLE_ATTRIBUTE = "SAMERegistration.Role"  # set on nodes this module creates by itself
REPORT_ATTRIBUTE = "SAMERegistration.Report"  # the run's report.json, kept on its transform


class InvalidInput(ValueError):
    """The chosen nodes or settings cannot be registered; the scene was not changed."""


@dataclass
class RegistrationSettings:
    """What the command line is asked to do; None keeps the library's default."""

    stages: tuple[str, ...] = STAGES
    features: str = "auto"
    device: str = "auto"
    spacing: float | None = None  # working grid spacing, mm
    threshold: float | None = None  # similarity threshold of the matches
    coarseIterations: int | None = None
    instanceIterations: int | None = None
    weights: str | None = None  # SAM checkpoint
    deformWeights: str | None = None  # SAM-deform network weights
    seed: int | None = None
    # Register the volumes as placed (e.g. the moving one aligned by hand, its transform hardened)
    # instead of searching the start.
    keepPlacement: bool = False

    def check(self) -> None:
        stages = tuple(self.stages)
        if not stages:
            raise InvalidInput("Choose at least one stage (affine, coarse, deform or instance).")
        unknown = sorted(set(stages) - set(STAGES))
        if unknown:
            raise InvalidInput(f"Unknown stage(s) {', '.join(unknown)}; use {', '.join(STAGES)}.")
        if self.features not in FEATURES:
            raise InvalidInput(f"Features must be one of {', '.join(FEATURES)}.")
        if self.device not in DEVICES and not (
            self.device.startswith("cuda:") and self.device[5:].isdigit()
        ):
            raise InvalidInput(f"Device must be auto, cpu or cuda:N, not '{self.device}'.")
        low, high = SPACING_RANGE_MM
        if self.spacing is not None and not low <= self.spacing <= high:
            raise InvalidInput(f"The working spacing must lie between {low:g} and {high:g} mm.")
        if self.threshold is not None and not -1.0 <= self.threshold < 1.0:
            raise InvalidInput("The similarity threshold must lie in [-1, 1).")
        for name in ("coarseIterations", "instanceIterations", "seed"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise InvalidInput(f"{name} must not be negative.")
        for name, path in (("SAM weights", self.weights), ("deform weights", self.deformWeights)):
            if path and not Path(path).is_file():
                raise InvalidInput(f"The {name} file '{path}' does not exist. Choose the file.")

    def arguments(self) -> list[str]:
        """Command-line options for ``python -m SAMERegistrationLib``."""
        args = ["--stages", ",".join(self.stages), "--features", self.features]
        args += ["--device", self.device]
        for flag, value in (
            ("--spacing", self.spacing),
            ("--seed", self.seed),
            ("--weights", self.weights),
            ("--deform-weights", self.deformWeights),
        ):
            if value not in (None, ""):
                args += [flag, str(value)]
        for key, value in (
            ("matching.similarity_threshold", self.threshold),
            ("coarse.iterations", self.coarseIterations),
            ("instance.iterations", self.instanceIterations),
        ):
            if value is not None:
                args += ["--set", f"{key}={json.dumps(value)}"]
        if self.keepPlacement:
            args += ["--set", 'initialisation="identity"']
        return args


@dataclass
class RegistrationOutputs:
    """The nodes a run fills. ``transform`` is created when not given; None skips the others."""

    transform: object = None  # vtkMRMLLinearTransformNode: the affine, nested under the grid
    volume: object = None  # vtkMRMLScalarVolumeNode: moving resampled onto the fixed grid
    labels: object = None  # vtkMRMLSegmentationNode or vtkMRMLLabelMapVolumeNode, warped
    fixedPoints: object = None  # vtkMRMLMarkupsFiducialNode
    movingPoints: object = None  # vtkMRMLMarkupsFiducialNode
    # vtkMRMLTransformNode: the inverse map (moving -> fixed); fixed-space data put under it show
    # in moving space. With a deformable part its parent holds the inverse affine.
    inverseTransform: object = None
    gridTransform: object = None  # vtkMRMLGridTransformNode, set by the run when it has one

    def chosen(self) -> list:
        """The output nodes chosen before the run (not the ones it creates)."""
        return [
            node
            for node in (self.transform, self.volume, self.labels)
            + (self.fixedPoints, self.movingPoints, self.inverseTransform)
            if node is not None
        ]
