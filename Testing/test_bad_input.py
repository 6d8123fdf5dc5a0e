"""Bad input: one clear error, exit code 2, and nothing written into the output folder."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import require_data

from SAMERegistrationLib.cli import main
from SAMERegistrationLib.device import memory_guard, resolve_device
from SAMERegistrationLib.errors import DeviceError
from SAMERegistrationLib.output_folder import LOCK_NAME, STAGING_PREFIX
from SAMERegistrationLib.synthetic import make_phantom


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("inputs")
    image, labels = make_phantom(size_xyz=(64, 56, 40), spacing=4.0)
    paths = {"image": folder / "ct.nii.gz", "labels": folder / "labels.nii.gz"}
    sitk.WriteImage(image, str(paths["image"]))
    sitk.WriteImage(labels, str(paths["labels"]))
    return paths


def run_cli(capsys, *args) -> tuple[int, str, list[str]]:
    """Exit code, standard error and the stages the run reported progress for."""
    code = main([*map(str, args), "--progress", "json"])
    captured = capsys.readouterr()
    stages = [json.loads(line)["stage"] for line in captured.out.splitlines() if '"stage"' in line]
    return code, captured.err, stages


def assert_refused(capsys, out: Path, args, *fragments, stage_reached: str | None = None) -> None:
    """Exit code 2, one error line, refused before feature extraction (unless ``stage_reached``
    says how far a check must go), and nothing left in or beside the output folder."""
    before = set(out.parent.iterdir())
    code, err, stages = run_cli(capsys, *args, "-o", out)
    assert code == 2, err
    assert err.startswith("error: ") and err.count("error: ") == 1
    for fragment in fragments:
        assert fragment in err, err
    if stage_reached is None:
        assert "features" not in stages, stages
    else:
        assert stage_reached in stages, stages
    assert not out.exists() or not any(out.iterdir())
    assert set(out.parent.iterdir()) - {out} == before - {out}


def abdomen_ct_file() -> Path:
    return require_data("totalseg/example_ct.nii.gz")


def write(tmp_path: Path, name: str, array: np.ndarray, spacing=(2.0, 2.0, 2.0)) -> Path:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing[: image.GetDimension()])
    path = tmp_path / name
    sitk.WriteImage(image, str(path))
    return path


def test_two_dimensional_image(capsys, tmp_path, phantom):
    flat = write(tmp_path, "slice.nii.gz", np.zeros((64, 64), dtype=np.int16))
    assert_refused(capsys, tmp_path / "out", [flat, phantom["image"]], "2-D", "3-D")


def test_single_slice_volume(capsys, tmp_path, phantom):
    one = write(tmp_path, "one.nii.gz", np.zeros((1, 64, 64), dtype=np.int16))
    assert_refused(capsys, tmp_path / "out", [phantom["image"], one], "moving image", "3-D")


def test_constant_image(capsys, tmp_path, phantom):
    flat = write(tmp_path, "flat.nii.gz", np.full((20, 30, 30), -1000, dtype=np.int16))
    assert_refused(capsys, tmp_path / "out", [flat, phantom["image"]], "constant")


def test_missing_file(capsys, tmp_path, phantom):
    missing = tmp_path / "nope.nii.gz"
    assert_refused(capsys, tmp_path / "out", [phantom["image"], missing], "does not exist")


def test_file_that_is_not_an_image(capsys, tmp_path, phantom):
    text = tmp_path / "notes.nii.gz"
    text.write_text("not an image")
    assert_refused(capsys, tmp_path / "out", [text, phantom["image"]], "could not be read")


def test_nan_voxels(capsys, tmp_path, phantom):
    array = sitk.GetArrayFromImage(sitk.ReadImage(str(phantom["image"]))).astype(np.float32)
    array[5, 5, 5:9] = np.nan
    nan = write(tmp_path, "nan.mha", array, spacing=(4.0, 4.0, 4.0))  # NIfTI would drop NaN
    assert_refused(capsys, tmp_path / "out", [phantom["image"], nan], "4 NaN")


def test_images_sharing_no_anatomy(capsys, tmp_path, abdomen_ct):
    top, bottom = tmp_path / "top.nii.gz", tmp_path / "bottom.nii.gz"
    sitk.WriteImage(abdomen_ct[:, :, 70:], str(top))
    sitk.WriteImage(abdomen_ct[:, :, :40], str(bottom))
    args = [top, bottom, "--features", "mind"]
    assert_refused(capsys, tmp_path / "out", args, "different anatomy", stage_reached="matching")


def test_head_against_abdomen(capsys, tmp_path, openkbp):
    """The fallback paths (other starts, a wider window) find no agreement either: refused."""
    head = openkbp / "validation_pt_213_ct.nii.gz"  # masked to a box around the head
    args = [head, abdomen_ct_file(), "--features", "mind", "--stages", "affine"]
    assert_refused(
        capsys, tmp_path / "out", args, "different anatomy", "alternatives tried",
        stage_reached="matching",
    )  # fmt: skip


def test_label_map_on_another_grid(capsys, tmp_path, phantom):
    labels = sitk.ReadImage(str(phantom["labels"]))
    labels.SetOrigin((5.0, 0.0, 0.0))
    shifted = tmp_path / "shifted_labels.nii.gz"
    sitk.WriteImage(labels, str(shifted))
    args = [phantom["image"], phantom["image"], "--moving-labels", shifted]
    assert_refused(capsys, tmp_path / "out", args, "moving label map", "grid")


def test_unreadable_checkpoint(capsys, tmp_path, phantom):
    bad = tmp_path / "SAM.pth"
    bad.write_text("garbage")
    args = [phantom["image"], phantom["image"], "--features", "sam", "--weights", bad]
    assert_refused(capsys, tmp_path / "out", args, str(bad))


def test_mismatched_checkpoint(capsys, tmp_path, phantom):
    wrong = tmp_path / "other.pth"
    torch.save({"state_dict": {"encoder.weight": torch.zeros(3, 3)}}, wrong)
    args = [phantom["image"], phantom["image"], "--features", "sam", "--weights", wrong]
    assert_refused(capsys, tmp_path / "out", args, str(wrong), "SAM")


def test_missing_deform_weights_refused_before_work(capsys, tmp_path, phantom):
    args = [phantom["image"], phantom["image"], "--deform-weights", tmp_path / "deform.pt"]
    assert_refused(capsys, tmp_path / "out", args, "SAM-deform", "does not exist")


def test_unknown_configuration_key(capsys, tmp_path, phantom):
    args = [phantom["image"], phantom["image"], "--set", "coarse.iteration=5"]
    assert_refused(capsys, tmp_path / "out", args, "coarse.iteration")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_cuda_requested_without_gpu(capsys, tmp_path, phantom):
    args = [phantom["image"], phantom["image"], "--device", "cuda"]
    assert_refused(capsys, tmp_path / "out", args, "no usable CUDA GPU", "--device cpu")


def test_gpu_out_of_memory_suggests_cpu_or_coarser_grid():
    with pytest.raises(DeviceError) as caught, memory_guard(torch.device("cuda"), 2.0):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
    assert "--device cpu" in str(caught.value) and "--spacing 3" in str(caught.value)


def test_cpu_allocation_failure_suggests_coarser_grid():
    with (
        pytest.raises(DeviceError, match="coarser working grid"),
        memory_guard(resolve_device("cpu"), 2.0),
    ):
        torch.empty(2**62, dtype=torch.uint8)  # more than any machine has


# --- Inputs that are not a complete CT in Hounsfield units: named before any work ------------


def test_ct_in_raw_scanner_units(capsys, tmp_path, abdomen_ct):
    raw = tmp_path / "raw.nii.gz"
    sitk.WriteImage(sitk.Cast(abdomen_ct, sitk.sitkInt16) + 1024, str(raw))
    args = [abdomen_ct_file(), raw]
    assert_refused(capsys, tmp_path / "out", args, "moving image", "raw scanner units", "1024")


def test_mr_image(capsys, tmp_path):
    mr = require_data("totalseg/example_mr_sm.nii.gz")
    args = [mr, abdomen_ct_file()]
    assert_refused(capsys, tmp_path / "out", args, "fixed image", "SAME registers CT")


def test_normalised_ct(capsys, tmp_path, abdomen_ct):
    scaled = tmp_path / "scaled.nii.gz"
    sitk.WriteImage(sitk.Cast(abdomen_ct, sitk.sitkFloat32) / 3000.0, str(scaled))
    assert_refused(capsys, tmp_path / "out", [abdomen_ct_file(), scaled], "Hounsfield", "air")


def test_values_outside_the_ct_range(capsys, tmp_path, abdomen_ct):
    array = sitk.GetArrayFromImage(abdomen_ct).astype(np.float32)
    array[array > 100] *= 30.0  # air intact, tissue and bone scaled far beyond any CT
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(abdomen_ct)
    wrong = tmp_path / "wrong.nii.gz"
    sitk.WriteImage(image, str(wrong))
    assert_refused(capsys, tmp_path / "out", [abdomen_ct_file(), wrong], "outside the range")


def test_truncated_nifti_file(capsys, tmp_path):
    data = abdomen_ct_file().read_bytes()
    truncated = tmp_path / "truncated.nii.gz"
    truncated.write_bytes(data[: len(data) * 6 // 10])  # SimpleITK reads it and fills zeros
    args = [abdomen_ct_file(), truncated]
    assert_refused(capsys, tmp_path / "out", args, "exactly 0", "truncated", "along z")


def test_volume_padded_with_zeros(capsys, tmp_path, abdomen_ct):
    padded = sitk.ConstantPad(abdomen_ct, (0, 0, 0), (0, 6, 0), 0)
    path = tmp_path / "padded.nii.gz"
    sitk.WriteImage(padded, str(path))
    assert_refused(capsys, tmp_path / "out", [path, abdomen_ct_file()], "last 6", "along y")


def test_nan_voxels_in_a_nifti_file(capsys, tmp_path, abdomen_ct):
    array = sitk.GetArrayFromImage(abdomen_ct).astype(np.float32)
    array[40, 50, 30:37] = np.nan
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(abdomen_ct)
    path = tmp_path / "nan.nii.gz"
    sitk.WriteImage(image, str(path))
    read_back = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    assert not np.isnan(read_back).any() and read_back[40, 50, 30] == 0  # why the file is read
    assert_refused(capsys, tmp_path / "out", [abdomen_ct_file(), path], "7 NaN", "NIfTI")


# --- Label maps ------------------------------------------------------------------------------


def organ_labels(ct: sitk.Image, dtype, low_value, high_value) -> sitk.Image:
    """Two blobs: soft tissue and bone of ``ct``, labelled with the given values."""
    hu = sitk.GetArrayFromImage(ct)
    array = np.zeros(hu.shape, dtype=dtype)
    array[(hu > 0) & (hu < 100)] = low_value
    array[hu > 300] = high_value
    labels = sitk.GetImageFromArray(array)
    labels.CopyInformation(ct)
    return labels


@pytest.mark.parametrize("dtype, value", [(np.int16, -1), (np.int64, 2**31)])
def test_label_values_out_of_range(capsys, tmp_path, abdomen_ct, dtype, value):
    path = tmp_path / "labels.nrrd"
    sitk.WriteImage(organ_labels(abdomen_ct, dtype, 1, value), str(path))
    args = [abdomen_ct_file(), abdomen_ct_file(), "--moving-labels", path]
    assert_refused(capsys, tmp_path / "out", args, "moving label map", f"{value}", "0 (background)")


# --- Configuration ---------------------------------------------------------------------------


@pytest.mark.parametrize("setting", ["coarse.learning_rate=NaN", "instance.iterations=-3"])
def test_bad_numeric_setting(capsys, tmp_path, setting):
    args = [abdomen_ct_file(), abdomen_ct_file(), "--set", setting]
    assert_refused(capsys, tmp_path / "out", args, setting.split("=")[0])


# --- Output folders --------------------------------------------------------------------------


def test_output_path_is_a_file(capsys, tmp_path):
    out = tmp_path / "out"
    out.write_text("not a folder")
    code, err, stages = run_cli(capsys, abdomen_ct_file(), abdomen_ct_file(), "-o", out)
    assert code == 2 and "is a file" in err and not stages
    assert out.read_text() == "not a folder"


def test_existing_outputs_are_kept_without_overwrite(capsys, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.json").write_text("{}")
    code, err, stages = run_cli(capsys, abdomen_ct_file(), abdomen_ct_file(), "-o", out)
    assert code == 2 and "--overwrite" in err and not stages
    assert sorted(p.name for p in out.iterdir()) == ["report.json"]


@pytest.fixture
def read_only_parent(tmp_path):
    """A folder whose entries cannot change (for root too: the immutable attribute)."""
    parent = tmp_path / "read-only"
    (parent / "out").mkdir(parents=True)
    if os.geteuid() == 0:
        if (
            shutil.which("chattr") is None
            or subprocess.run(["chattr", "+i", str(parent)], capture_output=True).returncode
        ):
            pytest.skip("cannot make a folder read-only for root here (no chattr)")
        undo = ["chattr", "-i", str(parent)]
    else:
        parent.chmod(0o555)
        undo = ["chmod", "755", str(parent)]
    try:
        yield parent
    finally:
        subprocess.run(undo, check=True)


def test_registration_writes_where_it_may(capsys, tmp_path, abdomen_ct, read_only_parent):
    """An existing folder in a read-only parent, temporary files on another filesystem; labels
    keep their pixel type; --overwrite leaves none of the earlier run's outputs behind."""
    out = read_only_parent / "out"
    labels = tmp_path / "labels.nii.gz"
    sitk.WriteImage(organ_labels(abdomen_ct, np.int32, 3, 70000), str(labels))
    other_device = Path(tempfile.mkdtemp(dir="/dev/shm")) if Path("/dev/shm").is_dir() else None
    if other_device is not None:
        assert other_device.stat().st_dev != out.stat().st_dev
    args = [abdomen_ct_file(), abdomen_ct_file(), "--features", "mind", "--stages", "affine"]
    previous = tempfile.tempdir
    tempfile.tempdir = str(other_device) if other_device else None
    try:
        code, err, stages = run_cli(capsys, *args, "--moving-labels", labels, "-o", out)
        assert code == 0, err
        assert not other_device or not any(other_device.iterdir())
    finally:
        tempfile.tempdir = previous
        if other_device:
            shutil.rmtree(other_device)
    warped = sitk.ReadImage(str(out / "warped_moving_labels.nii.gz"))
    assert warped.GetPixelID() == sitk.sitkInt32
    assert set(np.unique(sitk.GetArrayViewFromImage(warped))) == {0, 3, 70000}
    assert sorted(p.name for p in read_only_parent.iterdir()) == ["out"]

    code, err, stages = run_cli(capsys, *args, "--overwrite", "-o", out)
    assert code == 0, err
    names = sorted(p.name for p in out.iterdir())
    assert "warped_moving_labels.nii.gz" not in names and "report.json" in names
    assert not [n for n in names if n.startswith(".")]
    assert json.loads((out / "report.json").read_text())["inputs"]["moving_labels"] is None


def test_busy_folder_refused_at_once_and_sigterm_cleans_up(capsys, tmp_path):
    """A run holding the folder refuses a second run before its work; SIGTERM (how the Slicer
    module cancels) removes the staging folder, the lock and the folder the run created."""
    out = tmp_path / "out"
    command = [sys.executable, "-m", "SAMERegistrationLib", str(abdomen_ct_file())]
    command += [str(abdomen_ct_file()), "-o", str(out), "--features", "mind"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    first = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=env)
    try:
        lines = []
        for line in first.stderr:  # not a terminal: one line per stage, no progress bars
            lines.append(line)
            if "stage: features" in line:
                break
        assert any("stage: features" in line for line in lines), "".join(lines)
        assert (out / LOCK_NAME).exists() and any(out.glob(f"{STAGING_PREFIX}*"))

        code, err, stages = run_cli(capsys, abdomen_ct_file(), abdomen_ct_file(), "-o", out)
        assert code == 2 and "in use by another registration" in err and not stages
        assert f"process {first.pid}" in err

        first.send_signal(signal.SIGTERM)
        rest = first.stderr.read()
        assert first.wait(timeout=120) == 128 + signal.SIGTERM
    finally:
        first.kill()
    assert "interrupted: nothing was written" in rest
    assert "\r" not in "".join(lines) + rest  # no progress bars off a terminal
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_lock_left_by_a_killed_run_is_taken_over(capsys, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], text=True,
                          capture_output=True).stdout.strip()  # fmt: skip
    (out / LOCK_NAME).write_text(f"{gone} {socket.gethostname()}\n")
    (out / f"{STAGING_PREFIX}old").mkdir()
    code, err, stages = run_cli(capsys, abdomen_ct_file(), tmp_path / "nope.nii.gz", "-o", out)
    assert code == 2 and "does not exist" in err
    assert sorted(p.name for p in out.iterdir()) == []
