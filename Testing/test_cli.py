"""The command line end to end: the demo, and machine-readable progress."""

import json

import numpy as np
import SimpleITK as sitk

from SAMERegistrationLib.cli import main


def test_demo_registers_the_synthetic_pair(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "-o", str(out), "--progress", "none"]) == 0
    printed = capsys.readouterr().out
    assert "mean Dice" in printed and "end-point error" in printed
    report = json.loads((out / "report.json").read_text())
    assert report["metrics"]["mean_dice_after"] > 0.8 > report["metrics"]["mean_dice_before"]
    assert report["metrics"]["folding_percent"] < 1.0
    for name in ("fixed.nii.gz", "moving.nii.gz", "transform.nii.gz", "warped_moving.nii.gz"):
        assert (out / name).is_file()


def test_json_progress_and_stage_selection(tmp_path, capsys):
    demo = tmp_path / "demo"
    assert main(["demo", "-o", str(demo), "--progress", "none", "--stages", "affine"]) == 0
    capsys.readouterr()
    out = tmp_path / "again"
    args = [str(demo / "fixed.nii.gz"), str(demo / "moving.nii.gz"), "-o", str(out)]
    assert main([*args, "--progress", "json", "--stages", "affine", "-q"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert lines[-1]["finished"] is True
    stages = {line["stage"] for line in lines[:-1]}
    assert {"prepare", "features", "matching", "affine", "finish"} <= stages
    report = json.loads((out / "report.json").read_text())
    assert report["stages"]["coarse"]["status"] == "skipped"
    # With the affine stage alone, the displacement field is exactly the affine.
    field = sitk.ReadImage(str(out / "transform.nii.gz"), sitk.sitkVectorFloat64)
    affine = sitk.ReadTransform(str(out / "affine.tfm"))
    point = field.TransformIndexToPhysicalPoint((10, 12, 8))
    moved = sitk.DisplacementFieldTransform(field).TransformPoint(point)
    np.testing.assert_allclose(moved, affine.TransformPoint(point), atol=1e-3)


def test_folds_left_by_a_stage_are_smoothed_away_and_reported(tmp_path, capsys, one_thread):
    # An instance optimisation without regularisation folds the demo's map in places; the end of
    # the pipeline smooths the field there until no fold is left, and the summary says so.
    unregularised = ["instance.smoothness=0", "instance.smoothing_passes=1",
                     "instance.learning_rate=0.02", "instance.min_gain=-1"]  # fmt: skip
    settings = [item for pair in zip(["--set"] * 4, unregularised) for item in pair]
    out = tmp_path / "demo"
    args = ["demo", "-o", str(out), "--progress", "none", "--stages", "affine,instance"]
    assert main([*args, *settings]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    unfold = report["stages"]["finish"]["unfold"]
    assert unfold["folding_before"] > 1.0 and 0 < unfold["passes"] < 50
    assert report["metrics"]["folding_percent"] == 0.0
    assert f"{unfold['folding_before']:.3f} % before {unfold['passes']} unfolding passes" in printed
    # The exported field is the unfolded map: its Jacobian is positive on the fixed body.
    field = sitk.ReadImage(str(out / "transform.nii.gz"), sitk.sitkVectorFloat64)
    jacobian = sitk.GetArrayFromImage(sitk.DisplacementFieldJacobianDeterminant(field))
    body = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "fixed.nii.gz"))) > -300
    assert (jacobian[body] <= 0).mean() < 0.001
