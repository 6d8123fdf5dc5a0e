"""Every number of the method in one place, with defaults from the SAME++ paper and public code.

A configuration is a tree of dataclasses; it converts to and from plain JSON, and unknown keys are
refused so that a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError

# The vocabulary every front end shares (command line, Python API, Slicer module, trainers).
FEATURES = ("auto", "sam", "mind")
DEVICES = ("auto", "cpu", "cuda")
STAGES = ("affine", "coarse", "deform", "instance")  # the stages a configuration switches
# Progress steps, in the order ``register`` reports them.
STEPS = ("prepare", "features", "matching", "affine", "coarse", "deform", "instance", "finish")
SPACING_RANGE_MM = (0.25, 20.0)  # working-grid spacings the pipeline accepts
FIELD_FORMATS = ("nii.gz", "nrrd", "mha", "h5")
FIELD_PRECISIONS = ("float32", "float64")
IMAGE_FORMATS = ("nii.gz", "nrrd", "mha")


@dataclass
class InitialPoseConfig:
    # A rigid pose from coarse HU before the feature stages: re-orients a moving scan rotated
    # beyond angle_threshold_deg, and replaces an initial translation that disagrees with it.
    enabled: bool = True
    rotation_search: bool = True  # off: translations only
    angle_threshold_deg: float = 15.0  # smaller rotations are left to the affine stage
    spacing_mm: float = 8.0  # grid of the search


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
    # Keep the field only if it raises the local NCC of the fixed and the pulled moving image
    # (inside the fixed body) by at least this much: a field fitted to the matches' noise on a
    # perfect alignment lowers it; -1 keeps every field.
    min_gain: float = 0.005


@dataclass
class DeformConfig:
    enabled: bool = True
    weights: str | None = None  # SAM-deform network weights; the stage is skipped without them
    # Keep the network's field only if it raises the local NCC of the fixed and the pulled moving
    # image (inside the fixed body) by at least this much; -1 keeps every field.
    min_gain: float = 0.005
    # Run the shipped network only on fixed scans like those it was trained on (its record's
    # "domain": head & neck CT); other weights are never checked.
    domain_check: bool = True


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
    # MIND: compare descriptors computed at the working resolution (FeatureMaps.fine) rather than
    # the matching's coarser ones; false saves 1-2 s per OpenKBP pair on a 2-core CPU.
    fine_descriptors: bool = True
    # Keep the refinement only if it raises the feature similarity (its own cost, in [-1, 1]) by at
    # least this much: a perfect alignment gains nothing and must not move; -1 keeps every one.
    min_gain: float = 0.002


@dataclass
class ExportConfig:
    field_format: str = "nii.gz"  # displacement field file: nii.gz, nrrd, mha or h5
    field_precision: str = "float32"  # of the whole-map field: float32 or float64
    image_format: str = "nii.gz"  # warped image and labels


@dataclass
class RegistrationConfig:
    features: str = "auto"  # sam, mind, or auto (SAM when weights are available, else MIND)
    sam_weights: str | None = None  # SAM checkpoint; default: the model shipped with the library
    device: str = "auto"  # auto, cpu, cuda or cuda:N
    working_spacing_mm: float = 2.0
    # search: FFT search for the translation that best overlays the global features;
    # centroid: body centres on each other; identity: the scans as placed (their scanner
    # coordinates, or a placement made beforehand), kept as the start: the pose search does not
    # re-orient the moving scan and no fallback replaces the start.
    initialisation: str = "search"
    seed: int = 0
    # At the end, smooth the whole map locally where it folds (det J <= 0), at most this many
    # passes (two 3x3x3 box means each); 0 leaves any fold in place.
    unfold_passes: int = 20
    initial_pose: InitialPoseConfig = field(default_factory=InitialPoseConfig)
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
            data = json.loads(path.read_text(encoding="utf-8"))
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

    @property
    def keeps_placement(self) -> bool:
        """Whether the scans are registered as placed (``initialisation`` "identity")."""
        return self.initialisation == "identity"

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
            or not all(_is_number(r) and math.isfinite(r) and r > 0 for r in radii)
        ):
            raise ConfigError("affine.refine_radii_mm must be a list of positive numbers (mm).")
        defaults = RegistrationConfig()
        for key, low, high, low_open, high_open in NUMERIC_RANGES:
            value = self._value(key)
            if value is None and defaults._value(key) is None:
                continue  # a feature-dependent default, filled in by resolved_for
            _check_range(key, value, low, high, low_open, high_open)
        _validate_matching_and_fit(self)
        if self.export.field_format not in FIELD_FORMATS:
            raise ConfigError("export.field_format must be nii.gz, nrrd, mha or h5.")
        if self.export.field_precision not in FIELD_PRECISIONS:
            raise ConfigError(
                f"export.field_precision must be float32 or float64, not "
                f"'{self.export.field_precision}'."
            )
        if self.export.image_format not in IMAGE_FORMATS:
            raise ConfigError("export.image_format must be nii.gz, nrrd or mha.")

    def _value(self, key: str) -> Any:
        node = self
        for part in key.split("."):
            node = getattr(node, part)
        return node

    def resolved_for(self, features: str) -> RegistrationConfig:
        """A copy with every null (feature-dependent) setting filled from FEATURE_DEFAULTS."""
        current = self.to_dict()
        changes = {}
        for key, value in FEATURE_DEFAULTS[features].items():
            section, name = key.split(".")
            if current[section][name] is None:
                changes[key] = value
        return self.with_overrides(changes) if changes else self


# Every numeric setting and the values it takes. NaN and infinity are never valid; null only where
# the default is null (a feature-dependent default). Most take any value from a lower bound up:
_AT_LEAST: dict[float, tuple[str, ...]] = {
    1: ("matching.grid_stride", "matching.cycle_rounds", "coarse.grid_divisor", "instance.cost_stride"),
    4: ("affine.min_matches",),
    0.0: (
        "matching.search_radius_mm", "matching.ratio_exclusion_mm", "matching.overlap_margin_mm",
        "affine.outlier_factor", "affine.ransac_iterations", "coarse.smoothness", "coarse.iterations",
        "coarse.rematch_radius_mm", "instance.iterations", "instance.smoothness",
        "instance.smoothing_passes", "unfold_passes",
    ),
}  # fmt: skip
_POSITIVE = (
    "matching.chunk_memory_mb", "affine.ransac_inlier_mm", "coarse.learning_rate",
    "instance.learning_rate",
)  # fmt: skip
# The others: key -> (low, high, low excluded, high excluded).
_BOUNDED: dict[str, tuple[float, float, bool, bool]] = {
    "working_spacing_mm": (*SPACING_RANGE_MM, False, False),
    "seed": (0, 2**32 - 1, False, False),
    "matching.similarity_threshold": (-1.0, 1.0, False, True),
    "matching.min_match_share": (0.0, 1.0, False, False),
    "matching.ratio_max": (0.0, 1.0, True, False),
    "affine.min_scale": (0.0, 1.0, True, False),
    "affine.max_scale": (1.0, math.inf, False, True),
    "initial_pose.angle_threshold_deg": (0.0, 180.0, False, False),
    "initial_pose.spacing_mm": (2.0, 20.0, False, False),
    "coarse.min_gain": (-1.0, 1.0, False, False),
    "deform.min_gain": (-1.0, 1.0, False, False),
    "instance.min_gain": (-1.0, 1.0, False, False),
}
#: (key, low, high, low excluded, high excluded) of every numeric setting.
NUMERIC_RANGES: tuple[tuple[str, float, float, bool, bool], ...] = (
    *((key, low, math.inf, False, True) for low, keys in _AT_LEAST.items() for key in keys),
    *((key, 0.0, math.inf, True, True) for key in _POSITIVE),
    *((key, *bounds) for key, bounds in _BOUNDED.items()),
)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_range(
    key: str, value: Any, low: float, high: float, low_open: bool, high_open: bool
) -> None:
    if not _is_number(value) or not math.isfinite(value):
        raise ConfigError(f"{key} must be a finite number, not {value!r}.")
    too_low = value <= low if low_open else value < low
    too_high = value >= high if high_open else value > high
    if too_low or too_high:
        if math.isinf(high):
            allowed = f"greater than {low:g}" if low_open else f"at least {low:g}"
        else:
            left, right = "(" if low_open else "[", ")" if high_open else "]"
            allowed = f"in {left}{low:.10g}, {high:.10g}{right}"
        raise ConfigError(f"{key} must be {allowed}, not {value!r}.")


def _validate_matching_and_fit(config: RegistrationConfig) -> None:
    """Robust-fit checks that the ranges above cannot express."""
    fit = config.affine
    if fit.ransac_iterations is not None and not float(fit.ransac_iterations).is_integer():
        raise ConfigError("affine.ransac_iterations must be a whole number.")
    if not fit.min_scale <= 1.0 <= fit.max_scale:
        raise ConfigError("affine.min_scale must be at most 1 and affine.max_scale at least 1.")


SAME_SIMILARITY_THRESHOLD = 0.7  # SSCC's threshold in SAME, tuned for the official SAM model

# Settings that depend on the features. SAM: the paper's values (SAM embeddings are unique across
# the body, so one search over the whole image). MIND-SSC describes local structure only: it needs
# a search window around the current alignment, several passes with outlier trimming (in its
# window, trimmed least squares beat RANSAC: Dice after coarse 0.58 against 0.42 on OpenKBP
# validation 201 <- 207), fresh matches near the affine for the coarse stage, and smaller,
# smoother instance-optimisation steps.
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
        "affine.ransac_iterations": 0,
        "affine.ransac_inlier_mm": 12.0,
        "coarse.rematch_radius_mm": 10.0,
        "instance.learning_rate": 0.01,
        "instance.smoothness": 3000.0,
        "instance.cost_stride": 2,
    },
}


def parse_set_options(items: list[str]) -> dict[str, Any]:
    """``--set KEY=VALUE`` options as configuration overrides; values are JSON where they parse."""
    values: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects KEY=VALUE, not '{item}'.")
        try:
            values[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            values[key.strip()] = raw.strip()
    return values


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
