"""The side-by-side benchmark (benchmarks/peers.py): its scoring, its peer wrappers, its quick run.

The wrapper tests register a real CT crop to a copy of itself moved by a known translation, so a
wrong direction (moving -> fixed instead of fixed -> moving) or a wrong axis order shows as an
error of twice the translation. The quick run and the missing-package run are real runs of the
script in child processes, on real OpenKBP pairs.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import REPO, require_data

sys.path.insert(0, str(REPO / "benchmarks"))
import peers  # noqa: E402

SCRIPT = REPO / "benchmarks" / "peers.py"
SHIFT_MM = np.array([9.0, -6.0, 5.0])
PEERS = [
    "sitk_affine",
    "elastix_affine",
    "elastix_bspline",
    "ants_affine",
    "ants_syn",
    "niftyreg_aladin",
    "niftyreg_f3d",
    "convexadam",
    "convexadam_aladin",
]
AFFINE_PEERS = {"sitk_affine", "elastix_affine", "ants_affine", "niftyreg_aladin"}
QUICK_TIMEOUT_S = 900  # a guard against a hung child, not a timing: shared machines are slow
# What CI installs (pyproject's test extra; tomllib is not in Python 3.10).
_TEST_LINE = re.search(r"^test = \[(.*)\]$", (REPO / "pyproject.toml").read_text(), re.M)
TEST_EXTRA = {re.split(r"[<>=\[ ]", name)[0] for name in re.findall(r'"([^"]+)"', _TEST_LINE[1])}


def _labels(array_zyx: np.ndarray) -> sitk.Image:
    image = sitk.GetImageFromArray(array_zyx.astype(np.uint8))
    image.SetSpacing((2.0, 2.0, 2.0))
    return image


# --------------------------------------------------------------------------------------------
# Scoring helpers on known inputs
# --------------------------------------------------------------------------------------------


def test_label_dice_identical_maps_score_one_and_only_shared_labels_count():
    fixed = np.zeros((12, 12, 12), np.uint8)
    fixed[2:6, 2:6, 2:6] = 1
    fixed[7:10, 7:10, 7:10] = 2
    moving = fixed.copy()
    moving[0, 0, 0] = 3  # only in the moving map: not scored
    dice = peers.label_dice(_labels(fixed), _labels(moving), sitk.Transform(3, sitk.sitkIdentity))
    assert dice == {1: 1.0, 2: 1.0}


def test_label_dice_of_a_one_voxel_shift_is_the_overlap_by_hand():
    fixed = np.zeros((12, 12, 12), np.uint8)
    fixed[2:6, 2:6, 2:6] = 1  # a 4-voxel cube
    moving = _labels(fixed)
    # Pulling through p -> p + 2 mm in x (one voxel) moves the cube one voxel down x in the
    # fixed grid: 3 of its 4 slices overlap, Dice = 2 * 48 / (64 + 64) = 0.75.
    shift = sitk.TranslationTransform(3, (2.0, 0.0, 0.0))
    assert peers.label_dice(_labels(fixed), moving, shift) == {1: 0.75}


def _field_transform(ux_zyx: np.ndarray, spacing: float) -> tuple[sitk.Transform, sitk.Image]:
    field = np.zeros((*ux_zyx.shape, 3))
    field[..., 0] = ux_zyx
    reference = sitk.Image([int(n) for n in ux_zyx.shape[::-1]], sitk.sitkUInt8)
    reference.SetSpacing((spacing,) * 3)
    return peers.displacement_transform(field, reference), reference


def test_folding_percent_of_a_field_with_a_known_folded_slab():
    # u = (-2 x, 0, 0) in slices z = 3..5 and (-0.5 x, 0, 0) elsewhere: det J = 1 + du_x/dx is
    # -1 in the slab (folded) and 0.5 outside, exactly, border voxels included (u is linear in x).
    shape, spacing = (10, 8, 9), 1.5
    x = np.arange(shape[2]) * spacing
    ux = np.broadcast_to(-0.5 * x, shape).copy()
    ux[3:6] = -2.0 * x
    transform, reference = _field_transform(ux, spacing)
    assert peers.folding_percent_of(transform, reference) == pytest.approx(100.0 * 3 / 10)
    mask = np.zeros(shape, bool)
    mask[:5] = True  # slices 0-4: two of five are folded
    assert peers.folding_percent_of(transform, reference, mask) == pytest.approx(40.0)


def test_folding_percent_of_affines_is_none_or_all():
    reference = sitk.Image([10, 9, 8], sitk.sitkUInt8)
    stretch = sitk.AffineTransform([1.2, 0.1, 0, 0, 0.9, 0, 0, 0, 1.1], [3, 4, 5])
    mirror = sitk.AffineTransform([-1, 0, 0, 0, 1, 0, 0, 0, 1], [0, 0, 0])
    assert peers.folding_percent_of(stretch, reference) == 0.0
    assert peers.folding_percent_of(mirror, reference) == 100.0


# --------------------------------------------------------------------------------------------
# Each peer wrapper recovers a known translation of a real CT
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shifted_pair(openkbp: Path) -> tuple[sitk.Image, sitk.Image, list]:
    """Two different crops of one head & neck CT; the moving crop is moved by SHIFT_MM.

    Moving the origin moves the content without resampling, so the true map from fixed to moving
    space is p -> p + SHIFT_MM. The crops differ, so image centres do not give the answer.
    """
    ct = sitk.ReadImage(str(openkbp / "validation_pt_239_ct.nii.gz"))
    fixed = sitk.RegionOfInterest(ct, [80, 80, 88], [24, 24, 20])
    moving = sitk.RegionOfInterest(ct, [80, 80, 88], [18, 30, 26])
    moving.SetOrigin(tuple(np.array(moving.GetOrigin()) + SHIFT_MM))
    body = peers.fixed_body(fixed)[::6, ::6, ::6]
    index = np.argwhere(body)[:, ::-1] * 6  # (x, y, z) indices of a sparse grid in the body
    points = [fixed.TransformIndexToPhysicalPoint([int(i) for i in ijk]) for ijk in index]
    return fixed, moving, points


@pytest.mark.parametrize("name", PEERS)
def test_peer_wrapper_recovers_a_known_translation(name: str, shifted_pair):
    method = peers.METHODS[name]
    problem = peers.package_problem(method)
    if problem:
        if os.environ.get("CI") and method.pip_name in TEST_EXTRA:
            pytest.fail(problem)  # CI installs the test extra: its peers must run there
        pytest.skip(problem)
    fixed, moving, points = shifted_pair
    transform = method.wrapper(fixed, moving, True)  # the quick settings
    mapped = np.array([transform.TransformPoint(p) for p in points])
    errors = np.linalg.norm(mapped - (np.array(points) + SHIFT_MM), axis=1)
    voxel = min(fixed.GetSpacing())
    assert len(points) > 50
    if name in AFFINE_PEERS:
        assert errors.max() < voxel, f"{name}: errors up to {errors.max():.2f} mm"
    else:  # a free-form map wobbles a little where the CT is flat
        assert np.median(errors) < voxel, f"{name}: median error {np.median(errors):.2f} mm"
        assert np.percentile(errors, 90) < 2 * voxel, f"{name}: 90th percentile too large"


# --------------------------------------------------------------------------------------------
# The script itself
# --------------------------------------------------------------------------------------------


def _run_script(args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    require_data("openkbp")
    # The tables hold "±": decode as UTF-8 whatever the machine's locale.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUTF8": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        encoding="utf-8",
        env=env,
        timeout=QUICK_TIMEOUT_S,
        cwd=REPO,
    )


def _cached(folder: Path) -> list[Path]:
    return sorted((folder / peers.CACHE).rglob("*.json"))


def _outputs(folder: Path) -> tuple[dict, str, list[Path]]:
    (result,) = folder.glob("peers-*.json")
    (table,) = folder.glob("peers-*.md")
    return (
        json.loads(result.read_text()),
        table.read_text(encoding="utf-8"),
        sorted(folder.glob("peers-*.png")),
    )


def test_quick_run_writes_sane_results(tmp_path: Path):
    done = _run_script(["--quick", "--threads", "1", "--output-dir", str(tmp_path)])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    document, table, pngs = _outputs(tmp_path)
    quick = [name for name, m in peers.METHODS.items() if m.quick]
    assert [r["method"] for r in document["rows"]] == quick  # one pair, every cheap method
    rows = {r["method"]: r for r in document["rows"]}
    for name, row in rows.items():
        problem = peers.package_problem(peers.METHODS[name])
        if problem:  # a peer missing here is reported and skipped, the rest still runs
            assert row["status"] == "skipped" and row["reason"] == problem
            assert f"skipping {name}: {problem}" in done.stdout
            continue
        assert row["status"] == "ok", row.get("error")
        assert 0.0 <= row["mean_dice"] <= 1.0
        assert set(row["dice"]) <= set(document["organs"])
        assert row["seconds"] >= 0 and 0.1 < row["peak_rss_gb"] < 20
        # Quick methods are affine maps: they fold nowhere, or everywhere when a peer ends in a
        # reflection (det < 0), which ANTs and SimpleITK, not deterministic run to run, can do
        # on this pair.
        assert row["folding_percent"] in (0.0, 100.0), row["folding_percent"]
    # Pair 1 puts a head-only scan against a head-to-shoulders one: the peers' centre-of-mass
    # starts land far off (Dice < 0.1), while SAME's feature matching finds the head.
    assert rows["same_mind_affine"]["mean_dice"] > rows["unregistered"]["mean_dice"] + 0.2
    for name in quick:
        assert peers.METHODS[name].label in table
    assert "Dice (mean ± sd)" in table and "Brainstem" in table
    assert [p.name.rsplit("-", 1)[-1] for p in pngs] == ["dice.png", "time.png"]
    for png in pngs:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_an_interrupted_run_resumes_from_its_cache(tmp_path: Path):
    """A run reuses each (method, pair) it already holds and runs only the rest."""
    first = _run_script(["--quick", "--methods", "unregistered", "--output-dir", str(tmp_path)])
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    (kept,) = _cached(tmp_path)
    assert kept.parent.name == "unregistered"
    first_row = _outputs(tmp_path)[0]["rows"][0]
    assert "cached" not in first_row
    for path in tmp_path.glob("peers-*.*"):  # the next run writes its own results
        path.unlink()
    # The second run is what the first would have been had it stopped after its first row.
    methods = "unregistered,sitk_affine"
    second = _run_script(["--quick", "--methods", methods, "--output-dir", str(tmp_path)])
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    document, table, _ = _outputs(tmp_path)
    rows = {r["method"]: r for r in document["rows"]}
    assert rows["unregistered"]["cached"] == str(kept)
    assert rows["unregistered"]["mean_dice"] == first_row["mean_dice"]
    assert rows["unregistered"]["seconds"] == first_row["seconds"]  # not run again
    assert "cached" not in rows["sitk_affine"] and rows["sitk_affine"]["status"] == "ok"
    assert [p.parent.name for p in _cached(tmp_path)] == ["sitk_affine", "unregistered"]
    assert "1 of 2 rows from" in second.stdout
    # --fresh runs it again and replaces the kept result.
    for path in tmp_path.glob("peers-*.*"):
        path.unlink()
    again = ["--quick", "--methods", "unregistered", "--fresh", "--output-dir", str(tmp_path)]
    fresh = _run_script(again)
    assert fresh.returncode == 0, fresh.stdout[-3000:] + fresh.stderr[-3000:]
    fresh_row = _outputs(tmp_path)[0]["rows"][0]
    assert "cached" not in fresh_row
    replaced = json.loads(kept.read_text())["process_seconds"]
    assert replaced == fresh_row["process_seconds"] != first_row["process_seconds"]


BLOCKER = """
import importlib.abc, sys

class _Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("itk", "ants", "niftyreg", "convexAdam"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, _Blocked())
"""


def test_missing_peer_package_skips_its_rows_only(tmp_path: Path):
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(BLOCKER)
    out = tmp_path / "out"
    methods = "unregistered,elastix_affine,ants_affine,niftyreg_aladin,convexadam"
    done = _run_script(
        ["--quick", "--methods", methods, "--output-dir", str(out)],
        env={"PYTHONPATH": os.pathsep.join([str(blocker), str(REPO)])},
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = {r["method"]: r for r in _outputs(out)[0]["rows"]}
    assert rows["unregistered"]["status"] == "ok"
    blocked = {
        "elastix_affine": "itk-elastix",
        "ants_affine": "antspyx",
        "niftyreg_aladin": "niftyreg",
        "convexadam": "convexadam",
    }
    for name, package in blocked.items():
        assert rows[name]["status"] == "skipped"
        assert rows[name]["reason"].startswith(f"{package} is not installed")
        assert "pip install -e '.[bench]'" in rows[name]["reason"]
        assert f"skipping {name}: {package} is not installed" in done.stdout
    table = _outputs(out)[1]
    assert "| elastix affine | 0/1 |" in table and "skipped: itk-elastix is not installed" in table


def test_a_method_needing_two_packages_names_the_missing_one():
    needs_two = peers.Method(
        "two", "two", peers.register_unregistered, "json", "json-wheel",
        also_needs=(("no_such_module_here", "no-such-wheel"),),
    )  # fmt: skip
    problem = peers.package_problem(needs_two)
    assert problem.startswith("no-such-wheel is not installed (no_such_module_here cannot")
    assert peers.package_problem(peers.METHODS["unregistered"]) is None


def test_unknown_method_is_refused_with_the_choices():
    done = _run_script(["--quick", "--methods", "elastix_afine"])
    assert done.returncode == 2
    assert "unknown methods ['elastix_afine']" in done.stderr and "elastix_affine" in done.stderr


def test_sam_rows_are_skipped_without_weights_and_deform_rows_without_deform_weights():
    from SAMERegistrationLib.features.sam import default_weights
    from SAMERegistrationLib.stages.deform import shipped_features

    sam = peers.skip_reason(peers.METHODS["same_sam_affine"], None)
    assert sam == (peers.NO_SAM if default_weights() is None else None)
    shipped = shipped_features()  # the shipped SAM-deform network runs for its own features only
    for feature in ("mind", "sam"):
        reason = peers.skip_reason(peers.METHODS[f"same_{feature}_deform"], None)
        if feature == "sam" and default_weights() is None:
            assert reason == peers.NO_SAM
        else:
            assert reason == (None if shipped == feature else peers.NO_DEFORM)
        assert peers.skip_reason(peers.METHODS[f"same_{feature}_deform"], "given.pth") in (
            None,
            peers.NO_SAM,
        )
    assert peers.skip_reason(peers.METHODS["same_mind_instance"], None) is None


def test_runs_started_together_get_their_own_results_files(tmp_path: Path):
    from concurrent.futures import ThreadPoolExecutor

    import _common

    with ThreadPoolExecutor(8) as pool:
        prefixes = list(pool.map(lambda _: _common.new_results_prefix(tmp_path, "peers"), range(8)))
    assert len(set(prefixes)) == 8
    assert all(p.with_suffix(".json").exists() and p.name.startswith("peers-") for p in prefixes)
    # Two writers of one results file never share the temporary file they write it through.
    _common.write_json(prefixes[0].with_suffix(".json"), {"rows": [1]})
    assert json.loads(prefixes[0].with_suffix(".json").read_text()) == {"rows": [1]}
    assert not list(tmp_path.glob("*.partial"))
