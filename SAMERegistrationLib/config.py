"""Every number of the method in one place, with defaults from the SAME++ paper and public code.

A configuration is a tree of dataclasses; it converts to and from plain JSON, and unknown keys are
refused so that a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError

FEATURES = ("auto", "sam", "mind")
DEVICES = ("auto", "cpu", "cuda")
STAGES = ("affine", "coarse", "deform", "instance")


@dataclass
class MatchingConfig:
    grid_stride: int = 8  # working-grid voxels between query points in the moving image
    cycle_rounds: int = 5  # SSCC rounds (q -> m -> q')
    # Keep matches above this similarity (dot / 2 in [-1, 1]). null = the SAM model's calibrated
    # value from its record (models/NAME.json), else the feature type's default (0.7, SAME's).
    similarity_threshold: float | None = None
    # Ratio test: keep a match only if (1 - best) / (1 - second best) <= ratio_max, the second best
    # taken at least ratio_exclusion_mm from the best (an ambiguous match has a far-away twin).
    # 1 switches it off. null = the feature type's default.
    ratio_max: float | None = None
    ratio_exclusion_mm: float | None = None
    # Query and search only where both scans have body: points whose position under the current
    # alignment lies more than this many mm outside the other body's extent are left out, and the
    # match share is taken over the rest. null = the feature type's default.
    overlap_margin_mm: float | None = None
    # Search radius (mm) around the position predicted by the initial alignment; 0 = the whole
    # image, as SAME does with SAM. Hand-crafted features are not unique across the body and need
    # a window. null = the default of the feature type (FEATURE_DEFAULTS).
    search_radius_mm: float | None = None
    chunk_memory_mb: float = 256.0  # memory for one block of the similarity matrix
    # Fewer reliable matches than this share of the grid points means the scans show different
    # anatomy (or do not overlap): registration stops with an error. null = feature default.
    min_match_share: float | None = None


@dataclass
class AffineConfig:
    enabled: bool = True
    min_matches: int = 12  # fewer reliable matches than this means the images share no anatomy
    # Drop matches whose residual exceeds this many times the median residual and refit; 0 keeps
    # plain least squares as in SAME. null = the default of the feature type.
    outlier_factor: float | None = None
    # Further passes: re-match within each radius (mm) around the current affine and refit.
    # null = the default of the feature type.
    refine_radii_mm: list[float] | None = None
    # Robust fit: RANSAC on a similarity transform (inliers within ransac_inlier_mm), then the
    # affine by least squares on the inliers; ransac_iterations 0 = plain least squares (SAME).
    # An affine whose scales leave [min_scale, max_scale] (or that reflects) is refused in favour
    # of the similarity. null = the default of the feature type.
    ransac_iterations: int | None = None
    ransac_inlier_mm: float | None = None
    min_scale: float = 0.6
    max_scale: float = 1.6


@dataclass
class CoarseConfig:
    enabled: bool = True
    grid_divisor: int = 16  # control grid has int(working shape / divisor) nodes per axis
    smoothness: float = 0.04  # weight of the squared finite differences of the displacement
    iterations: int = 100
    learning_rate: float = 0.05
    # Search radius (mm) for fresh matches around the affine's prediction; 0 reuses the affine's
    # matches (SAME). null = the default of the feature type.
    rematch_radius_mm: float | None = None


@dataclass
class DeformConfig:
    enabled: bool = True
    weights: str | None = None  # SAM-deform network weights; the stage is skipped without them


@dataclass
class InstanceConfig:
    enabled: bool = True
    iterations: int = 50
    # Adam step and smoothness weight, in normalised units; null = the feature type's default.
    learning_rate: float | None = None
    smoothness: float | None = None
    smoothing_passes: int = 3  # 3x3x3 box filters applied to the displacement each step
    # Evaluate the similarity on every k-th fixed body voxel per axis; null = feature default.
    cost_stride: int | None = None


@dataclass
class ExportConfig:
    field_format: str = "nii.gz"  # displacement field file: nii.gz, nrrd, mha or h5
    image_format: str = "nii.gz"  # warped image and labels


@dataclass
class RegistrationConfig:
    features: str = "auto"  # sam, mind, or auto (SAM when weights are available, else MIND)
    sam_weights: str | None = None  # SAM checkpoint; default: the model shipped with the library
    device: str = "auto"  # auto, cpu, cuda or cuda:N
    working_spacing_mm: float = 2.0
    # search: FFT search for the translation that best overlays the global features;
    # centroid: body centres on each other; identity: the scanner coordinates as they are.
    initialisation: str = "search"
    seed: int = 0
    matching: MatchingConfig = field(default_factory=MatchingConfig)
    affine: AffineConfig = field(default_factory=AffineConfig)
    coarse: CoarseConfig = field(default_factory=CoarseConfig)
    deform: DeformConfig = field(default_factory=DeformConfig)
    instance: InstanceConfig = field(default_factory=InstanceConfig)
    export: ExportConfig = field(default_factory=ExportConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RegistrationConfig:
        config = _build(cls, data, "")
        config.validate()
        return config

    @classmethod
    def from_json(cls, path: str | Path) -> RegistrationConfig:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError as err:
            raise ConfigError(f"The configuration file '{path}' does not exist.") from err
        except json.JSONDecodeError as err:
            raise ConfigError(f"The configuration file '{path}' is not valid JSON: {err}.") from err
        if not isinstance(data, dict):
            raise ConfigError(f"The configuration file '{path}' must hold a JSON object.")
        return cls.from_dict(data)

    def with_overrides(self, overrides: dict[str, Any]) -> RegistrationConfig:
        """A copy with dotted keys replaced, e.g. ``{"coarse.iterations": 200}``."""
        data = self.to_dict()
        for key, value in overrides.items():
            node = data
            *parents, leaf = key.split(".")
            for part in parents:
                if not isinstance(node.get(part), dict):
                    raise ConfigError(f"Unknown configuration key '{key}'.")
                node = node[part]
            if leaf not in node or isinstance(node[leaf], dict):
                raise ConfigError(f"Unknown configuration key '{key}'.")
            node[leaf] = value
        return RegistrationConfig.from_dict(data)

    def validate(self) -> None:
        if self.features not in FEATURES:
            raise ConfigError(f"features must be one of {FEATURES}, not '{self.features}'.")
        if self.device not in DEVICES and not self.device.startswith("cuda:"):
            raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, not '{self.device}'.")
        if self.initialisation not in ("search", "centroid", "identity"):
            raise ConfigError("initialisation must be 'search', 'centroid' or 'identity'.")
        radii = self.affine.refine_radii_mm
        if radii is not None and (
            not isinstance(radii, list)
            or not all(
                isinstance(r, int | float) and not isinstance(r, bool) and r > 0 for r in radii
            )
        ):
            raise ConfigError("affine.refine_radii_mm must be a list of positive numbers (mm).")
        if not 0.25 <= self.working_spacing_mm <= 20:
            raise ConfigError("working_spacing_mm must lie between 0.25 and 20 mm.")
        _validate_matching_and_fit(self)
        positive = {
            "matching.grid_stride": self.matching.grid_stride,
            "matching.cycle_rounds": self.matching.cycle_rounds,
            "matching.chunk_memory_mb": self.matching.chunk_memory_mb,
            "coarse.grid_divisor": self.coarse.grid_divisor,
            "affine.min_matches": self.affine.min_matches,
        }
        for name, value in positive.items():
            if value <= 0:
                raise ConfigError(f"{name} must be positive, not {value}.")
        non_negative = {
            "coarse.iterations": self.coarse.iterations,
            "coarse.smoothness": self.coarse.smoothness,
            "instance.iterations": self.instance.iterations,
            "instance.smoothing_passes": self.instance.smoothing_passes,
            "instance.smoothness": self.instance.smoothness,
            "instance.learning_rate": self.instance.learning_rate,
            "affine.outlier_factor": self.affine.outlier_factor,
            "matching.search_radius_mm": self.matching.search_radius_mm,
            "matching.min_match_share": self.matching.min_match_share,
            "coarse.rematch_radius_mm": self.coarse.rematch_radius_mm,
        }
        for name, value in non_negative.items():
            if value is not None and value < 0:
                raise ConfigError(f"{name} must not be negative, not {value}.")
        if self.instance.cost_stride is not None and self.instance.cost_stride < 1:
            raise ConfigError("instance.cost_stride must be at least 1.")
        if self.export.field_format not in ("nii.gz", "nrrd", "mha", "h5"):
            raise ConfigError("export.field_format must be nii.gz, nrrd, mha or h5.")
        if self.export.image_format not in ("nii.gz", "nrrd", "mha"):
            raise ConfigError("export.image_format must be nii.gz, nrrd or mha.")

    def stage_enabled(self, stage: str) -> bool:
        return getattr(self, stage).enabled

    def resolved_for(self, features: str) -> RegistrationConfig:
        """A copy with every null (feature-dependent) setting filled from FEATURE_DEFAULTS."""
        current = self.to_dict()
        changes = {}
        for key, value in FEATURE_DEFAULTS[features].items():
            section, name = key.split(".")
            if current[section][name] is None:
                changes[key] = value
        return self.with_overrides(changes) if changes else self


def _validate_matching_and_fit(config: RegistrationConfig) -> None:
    """Checks of the matching and robust-fit settings (null = the feature or model default)."""
    threshold, match, fit = config.matching.similarity_threshold, config.matching, config.affine
    numbers = ("similarity_threshold", "ratio_max", "ratio_exclusion_mm", "overlap_margin_mm")
    for name, value in [(f"matching.{k}", getattr(match, k)) for k in numbers] + [
        ("affine.ransac_iterations", fit.ransac_iterations),
        ("affine.ransac_inlier_mm", fit.ransac_inlier_mm),
    ]:
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise ConfigError(f"{name} must be a number or null, not {value!r}.")
    if threshold is not None and not -1.0 <= threshold < 1.0:
        raise ConfigError("matching.similarity_threshold must lie in [-1, 1).")
    if match.ratio_max is not None and not 0.0 < match.ratio_max <= 1.0:
        raise ConfigError("matching.ratio_max must lie in (0, 1]; 1 switches the ratio test off.")
    for name, value in {
        "matching.ratio_exclusion_mm": match.ratio_exclusion_mm,
        "matching.overlap_margin_mm": match.overlap_margin_mm,
        "affine.ransac_iterations": fit.ransac_iterations,
        "affine.ransac_inlier_mm": fit.ransac_inlier_mm,
    }.items():
        if value is not None and value < 0:
            raise ConfigError(f"{name} must not be negative, not {value}.")
    if isinstance(fit.ransac_iterations, float) and not fit.ransac_iterations.is_integer():
        raise ConfigError("affine.ransac_iterations must be a whole number.")
    if not 0.0 < fit.min_scale <= 1.0 <= fit.max_scale:
        raise ConfigError("affine.min_scale must lie in (0, 1] and affine.max_scale be at least 1.")


SAME_SIMILARITY_THRESHOLD = 0.7  # SSCC's threshold in SAME, tuned for the official SAM model

# Settings that depend on the features. SAM: the paper's values (SAM embeddings are unique across
# the body, so one search over the whole image). MIND-SSC describes local structure only: it needs
# a search window around the current alignment, several passes with outlier trimming, fresh
# matches near the affine for the coarse stage, and smaller, smoother instance-optimisation steps.
FEATURE_DEFAULTS: dict[str, dict[str, Any]] = {
    "sam": {
        "matching.similarity_threshold": SAME_SIMILARITY_THRESHOLD,
        "matching.ratio_max": 0.8,
        "matching.ratio_exclusion_mm": 16.0,
        "matching.overlap_margin_mm": 20.0,
        "matching.search_radius_mm": 0.0,
        "matching.min_match_share": 0.05,
        "affine.refine_radii_mm": [],
        "affine.outlier_factor": 0.0,
        "affine.ransac_iterations": 1000,
        "affine.ransac_inlier_mm": 12.0,
        "coarse.rematch_radius_mm": 0.0,
        "instance.learning_rate": 0.05,
        "instance.smoothness": 1000.0,
        "instance.cost_stride": 1,
    },
    "mind": {
        "matching.similarity_threshold": SAME_SIMILARITY_THRESHOLD,
        "matching.ratio_max": 1.0,
        "matching.ratio_exclusion_mm": 16.0,
        "matching.overlap_margin_mm": 20.0,
        "matching.search_radius_mm": 20.0,
        "matching.min_match_share": 0.12,
        "affine.refine_radii_mm": [20.0, 10.0, 5.0],
        "affine.outlier_factor": 2.0,
        "affine.ransac_iterations": 1000,
        "affine.ransac_inlier_mm": 12.0,
        "coarse.rematch_radius_mm": 10.0,
        "instance.learning_rate": 0.01,
        "instance.smoothness": 10000.0,
        "instance.cost_stride": 2,
    },
}


def _build(cls: type, data: dict[str, Any], prefix: str):
    if not isinstance(data, dict):
        raise ConfigError(f"'{prefix.rstrip('.')}' must be a JSON object.")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"Unknown configuration key(s) {', '.join(prefix + k for k in unknown)}; valid keys "
            f"here are {', '.join(prefix + k for k in fields)}."
        )
    values = {}
    for name, value in data.items():
        default = getattr(cls(), name)
        if dataclasses.is_dataclass(default):
            values[name] = _build(type(default), value, f"{prefix}{name}.")
        else:
            values[name] = _coerce(value, default, prefix + name, str(fields[name].type))
    return cls(**values)


def _coerce(value: Any, default: Any, name: str, annotation: str) -> Any:
    """Accept JSON numbers for numeric fields and refuse values of the wrong kind."""
    if value is None:
        return value
    if default is None:  # an optional path, or a feature-dependent number or list of numbers
        if annotation.startswith("str") and isinstance(value, str):
            return value
        numeric = isinstance(value, int | float | list) and not isinstance(value, bool)
        if numeric and not annotation.startswith("str"):
            return value
        kind = "a path" if annotation.startswith("str") else "a number, a list of numbers"
        raise ConfigError(f"{name} must be {kind} or null, not {value!r}.")
    is_number = isinstance(value, int | float) and not isinstance(value, bool)
    if isinstance(default, bool) and isinstance(value, bool):
        return value
    if isinstance(default, float) and is_number:
        return float(value)
    if isinstance(default, int) and is_number and float(value).is_integer():
        return int(value)
    if isinstance(default, str) and isinstance(value, str):
        return value
    if isinstance(default, list) and isinstance(value, list):
        return list(value)
    raise ConfigError(f"{name} must be a {type(default).__name__}, not {value!r}.")
