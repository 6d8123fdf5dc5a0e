"""The SAM-against-MIND benchmark (benchmarks/sam_vs_mind.py) refuses a model trained on the
validation patients it evaluates on, from what the model's record or training folder says.

The training folders are written here as `train-sam` and `sam-pair-maps` write them (the
pair-map manifest by the library's own writer, on real OpenKBP scans); the refusal by the script
itself is a real run in a child process, which must stop before any feature extraction.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, require_data

sys.path.insert(0, str(REPO / "benchmarks"))
import sam_vs_mind  # noqa: E402

from SAMERegistrationLib.errors import InputError  # noqa: E402
from SAMERegistrationLib.train.pair_maps import ScanIdentity, write_manifest  # noqa: E402

TRAINING = "train_pt_100"
VALIDATION = "validation_pt_201"


def scan(name: str) -> Path:
    return require_data(f"openkbp/{name}_ct.nii.gz")


def training_folder(tmp_path: Path, scans: list[str], cache_scans: list[str] | None = None) -> Path:
    """A trained model's folder: weights, train_config.json and, optionally, its pair-map cache."""
    folder = tmp_path / "sam-training"
    folder.mkdir()
    weights = folder / "sam_trained.pth"
    weights.write_bytes(b"not loaded: the check comes first")
    config: dict = {"pair_maps": None}
    if cache_scans is not None:
        cache = tmp_path / "pair-maps"
        identities = [ScanIdentity.of(scan(name)) for name in cache_scans]
        write_manifest(cache, identities, [(0, 1)], 0, {"features": "mind"})
        config["pair_maps"] = str(cache)
    run = {"config": config, "scans": [str(scan(name).resolve()) for name in scans]}
    (folder / "train_config.json").write_text(json.dumps(run))
    return weights


def test_a_model_trained_on_held_out_scans_only_passes(tmp_path):
    weights = training_folder(tmp_path, [TRAINING], cache_scans=[TRAINING, "train_pt_101"])
    sam_vs_mind.refuse_training_overlap(weights, [VALIDATION, "validation_pt_207"])


def test_a_validation_scan_in_the_training_scans_is_refused(tmp_path):
    weights = training_folder(tmp_path, [TRAINING, VALIDATION])
    with pytest.raises(InputError, match=f"{VALIDATION}.*train_config.json"):
        sam_vs_mind.refuse_training_overlap(weights, [VALIDATION])


def test_a_validation_scan_in_the_pair_map_cache_is_refused(tmp_path):
    weights = training_folder(tmp_path, [TRAINING], cache_scans=[TRAINING, VALIDATION])
    with pytest.raises(InputError, match=f"{VALIDATION}.*pair-map cache"):
        sam_vs_mind.refuse_training_overlap(weights, [VALIDATION])


def test_a_validation_scan_listed_in_the_model_record_is_refused(tmp_path):
    weights = tmp_path / "model.pt"
    weights.write_bytes(b"not loaded")
    record = {
        "training_scans": [f"openkbp/{TRAINING}_ct.nii.gz", f"openkbp/{VALIDATION}_ct.nii.gz"]
    }
    weights.with_suffix(".json").write_text(json.dumps(record))
    with pytest.raises(InputError, match=f"{VALIDATION}.*model.json"):
        sam_vs_mind.refuse_training_overlap(weights, [VALIDATION])


def test_the_script_refuses_before_any_work(tmp_path):
    weights = training_folder(tmp_path, [TRAINING], cache_scans=[TRAINING, VALIDATION])
    output = tmp_path / "results.json"
    command = [sys.executable, str(REPO / "benchmarks" / "sam_vs_mind.py"), "--sam-weights"]
    command += [str(weights), "--cases", "1", "--pairs", "1", "--output", str(output)]
    command += ["--data", str(require_data("openkbp"))]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "evaluate a model trained without validation patients" in done.stderr
    assert "warped case" not in done.stderr and not output.exists()
