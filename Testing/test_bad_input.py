"""Bad input: one clear error, exit code 2, and nothing written into the output folder."""

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from SAMERegistrationLib.cli import main
from SAMERegistrationLib.device import memory_guard, resolve_device
from SAMERegistrationLib.errors import DeviceError
from SAMERegistrationLib.synthetic import make_phantom


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("inputs")
    image, labels = make_phantom(size_xyz=(64, 56, 40), spacing=4.0)
    paths = {"image": folder / "ct.nii.gz", "labels": folder / "labels.nii.gz"}
    sitk.WriteImage(image, str(paths["image"]))
    sitk.WriteImage(labels, str(paths["labels"]))
    return paths


def run_cli(capsys, *args) -> tuple[int, str]:
    code = main([*map(str, args), "--progress", "none"])
    return code, capsys.readouterr().err


def assert_refused(capsys, out: Path, args, *fragments) -> None:
    code, err = run_cli(capsys, *args, "-o", out)
    assert code == 2, err
    assert err.startswith("error: ") and err.count("error: ") == 1
    for fragment in fragments:
        assert fragment in err, err
    assert not out.exists() or not any(out.iterdir())
    leftovers = [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.partial")]
    assert not leftovers


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
    assert_refused(capsys, tmp_path / "out", args, "different anatomy")


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
