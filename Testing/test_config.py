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


def _numeric_keys(node: dict, prefix: str = "") -> list[str]:
    keys = []
    for name, value in node.items():
        if isinstance(value, dict):
            keys += _numeric_keys(value, f"{prefix}{name}.")
        elif value is None or (isinstance(value, int | float) and not isinstance(value, bool)):
            keys.append(prefix + name)
    return keys


NUMERIC_KEYS = [
    k for k in _numeric_keys(RegistrationConfig().to_dict()) if k not in ("sam_weights",)
]


def test_every_numeric_setting_is_covered_by_the_checks():
    from SAMERegistrationLib.config import NUMERIC_RANGES

    checked = {key for key, *_ in NUMERIC_RANGES} | {"affine.refine_radii_mm"}
    paths = {"deform.weights"}  # null defaults that are paths, not numbers
    assert set(NUMERIC_KEYS) - paths == checked


@pytest.mark.parametrize("key", [k for k in NUMERIC_KEYS if k != "deform.weights"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_values_are_refused_for_every_numeric_setting(key, value):
    if key == "affine.refine_radii_mm":
        value = [value]
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        RegistrationConfig().with_overrides({key: value})


@pytest.mark.parametrize(
    "key, value, message",
    [("coarse.learning_rate", 0.0, "greater than 0"), ("instance.learning_rate", -0.01, "greater"),
     ("seed", -1, "in [0, 4294967295]"), ("matching.min_match_share", 1.5, "in [0, 1]"),
     ("affine.min_matches", 3, "at least 4"), ("instance.cost_stride", 0, "at least 1"),
     ("coarse.iterations", -5, "at least 0"), ("coarse.learning_rate", None, "finite number")],
)  # fmt: skip
def test_out_of_range_values_name_the_range(key, value, message):
    with pytest.raises(ConfigError) as caught:
        RegistrationConfig().with_overrides({key: value})
    assert key in str(caught.value) and message in str(caught.value)


def test_nan_learning_rate_from_the_command_line_is_refused_before_any_work(tmp_path, capsys):
    from SAMERegistrationLib.cli import main

    out = tmp_path / "out"
    args = ["fixed.nii.gz", "moving.nii.gz", "-o", str(out), "--set", "coarse.learning_rate=NaN"]
    assert main(args) == 2
    assert "coarse.learning_rate must be a finite number" in capsys.readouterr().err
    assert not out.exists()
