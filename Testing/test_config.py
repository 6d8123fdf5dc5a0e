"""Configuration: JSON round trip, overrides, refusal of unknown keys and bad values."""

import json

import pytest

from SAMERegistrationLib.config import FEATURE_DEFAULTS, RegistrationConfig
from SAMERegistrationLib.errors import ConfigError


def test_json_round_trip(tmp_path):
    config = RegistrationConfig().with_overrides({"coarse.iterations": 7, "features": "mind"})
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config.to_dict()))
    assert RegistrationConfig.from_json(path) == config


def test_unknown_key_is_refused_with_the_valid_ones():
    with pytest.raises(ConfigError, match=r"coarse\.iteration\b.*coarse\.iterations"):
        RegistrationConfig.from_dict({"coarse": {"iteration": 3}})


@pytest.mark.parametrize(
    "key, value",
    [("working_spacing_mm", 0.0), ("matching.grid_stride", 0), ("features", "sift"),
     ("device", "tpu"), ("coarse.enabled", "yes"), ("matching.similarity_threshold", 1.5),
     ("affine.refine_radii_mm", [10, -1]), ("export.field_precision", "float16")],
)  # fmt: skip
def test_bad_values_are_refused(key, value):
    with pytest.raises(ConfigError):
        RegistrationConfig().with_overrides({key: value})


def test_feature_defaults_fill_only_unset_values():
    explicit = RegistrationConfig().with_overrides({"instance.learning_rate": 0.05})
    resolved = explicit.resolved_for("mind")
    assert resolved.instance.learning_rate == 0.05  # the user's value, although SAM's default
    assert resolved.instance.smoothness == FEATURE_DEFAULTS["mind"]["instance.smoothness"]
    assert RegistrationConfig().resolved_for("sam").matching.search_radius_mm == 0.0


def test_invalid_json_file_names_the_file(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="broken.json"):
        RegistrationConfig.from_json(path)
