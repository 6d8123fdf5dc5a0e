"""SAM training: crop-pair correspondences, loss going down, exact resume, and refusal of bad input."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import require_data

from SAMERegistrationLib.errors import CheckpointError, ConfigError, InputError, OutputError
from SAMERegistrationLib.features.sam_network import (
    SAMNetwork,
    load_sam_checkpoint,
    save_sam_checkpoint,
)
from SAMERegistrationLib.shipped import file_sha256
from SAMERegistrationLib.synthetic import make_phantom
from SAMERegistrationLib.train.checkpoints import list_checkpoints
from SAMERegistrationLib.train.crops import (
    CropConfig,
    CropPairDataset,
    ViewGeometry,
    draw_pair_geometry,
    load_scan,
    render_view,
    scan_from_image,
)
from SAMERegistrationLib.train.sam_cli import main
from SAMERegistrationLib.train.sam_losses import LossConfig, nearest_partners, sam_loss
from SAMERegistrationLib.train.sam_trainer import (
    SAMTrainConfig,
    collect_scans,
    learning_rate,
    load_training_checkpoint,
    new_training_state,
    train_sam,
    train_step,
)
from SAMERegistrationLib.working import sam_intensity

SMALL_LOSS = LossConfig(
    local_queries=32,
    local_hard=256,
    local_diverse=64,
    global_hard=32,
    global_diverse=24,
    global_cross=32,
)
SMALL = SAMTrainConfig(
    iterations=4,
    batch=2,
    width=0.125,
    embedding_dim=32,
    warmup_iterations=0,
    device="cpu",
    checkpoint_every=2,
    workers=0,
    crops=CropConfig(patch=(16, 48, 48)),
    loss=SMALL_LOSS,
)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def train_scans() -> list[Path]:
    folder = require_data("openkbp")
    return [folder / "train_pt_1_ct.nii.gz", folder / "train_pt_10_ct.nii.gz"]


def _write_phantoms(folder: Path, count: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for seed in range(count):
        image, _ = make_phantom(size_xyz=(40, 36, 24), spacing=4.0, seed=seed)
        paths.append(folder / f"ct_{seed}.nii.gz")
        sitk.WriteImage(image, str(paths[-1]))
    return paths


# --- correspondences -----------------------------------------------------------------------------

# A scan with an oblique-free but flipped direction, anisotropic spacing and an offset origin.
SCAN_SIZE_XYZ = (60, 70, 40)
SCAN_SPACING = (1.5, 1.25, 2.5)
SCAN_ORIGIN = (120.0, -40.0, 30.0)
SCAN_DIRECTION = (-1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0)
RAMP = (-900.0, 10.0)  # HU = RAMP[0] + RAMP[1] * (coordinate along one axis - its minimum)


def _ramp_scans() -> tuple[list, np.ndarray]:
    """Three scans whose HU is a linear ramp of the physical x, y and z coordinate respectively."""
    direction = np.array(SCAN_DIRECTION).reshape(3, 3)
    index = np.stack(np.meshgrid(*(np.arange(n) for n in SCAN_SIZE_XYZ[::-1]), indexing="ij"), -1)
    points = index[..., ::-1] * np.array(SCAN_SPACING) @ direction.T + np.array(SCAN_ORIGIN)
    low = points.reshape(-1, 3).min(axis=0)
    scans = []
    for axis in range(3):
        hu = RAMP[0] + RAMP[1] * (points[..., axis] - low[axis])  # (z, y, x) indexed
        image = sitk.GetImageFromArray(hu.astype(np.float32))
        image.SetSpacing(SCAN_SPACING)
        image.SetOrigin(SCAN_ORIGIN)
        image.SetDirection(SCAN_DIRECTION)
        scans.append(scan_from_image(image, f"ramp {axis}", np.ones(hu.shape, bool)))
    return scans, low


def _decode(scans: list, geometry: ViewGeometry, low: np.ndarray) -> np.ndarray:
    """Physical (x, y, z) of every view voxel, read back from the ramp intensities: (z, y, x, 3)."""
    ramp = np.linspace(-1000.0, 3000.0, 40001)
    scaled = sam_intensity(ramp, np.ones(ramp.shape, bool))
    decoded = []
    for axis, scan in enumerate(scans):
        hu = np.interp(render_view(scan, geometry).image, scaled, ramp)
        decoded.append((hu - RAMP[0]) / RAMP[1] + low[axis])
    return np.stack(decoded, axis=-1)


def test_crop_pair_partners_are_the_same_physical_point() -> None:
    scans, low = _ramp_scans()
    # Scales 0.8 (1.6 mm) and 1.2 (2.4 mm), view 2 shifted by (3, 1, 2) of its voxels along
    # (x, y, z): view-1 voxel 3k meets view-2 voxel 2k + shift on each axis, exactly.
    origin1 = np.array([60.0, 0.0, 50.0])
    shift_xyz = np.array([3, 1, 2])
    g1 = ViewGeometry(tuple(origin1), 1.6, (12, 18, 15))
    g2 = ViewGeometry(tuple(origin1 - 2.4 * shift_xyz), 2.4, (12, 18, 15))

    points1, points2 = _decode(scans, g1, low), _decode(scans, g2, low)
    z, y, x = np.meshgrid(*(np.arange(n) for n in g1.shape), indexing="ij")
    np.testing.assert_allclose(points1, origin1 + 1.6 * np.stack([x, y, z], -1), atol=0.01)

    views = [render_view(scans[0], g) for g in (g1, g2)]
    for view, points in zip(views, (points1, points2)):
        assert view.valid.all()
        np.testing.assert_allclose(view.axes_mm[0], points[:, 0, 0, 2], atol=0.01)
        np.testing.assert_allclose(view.axes_mm[1], points[0, :, 0, 1], atol=0.01)
        np.testing.assert_allclose(view.axes_mm[2], points[0, 0, :, 0], atol=0.01)

    axes = [tuple(torch.from_numpy(a) for a in view.axes_mm) for view in views]
    partner, distance, _ = nearest_partners(axes[0], axes[1])
    partner_points = points2.reshape(-1, 3)[partner.reshape(-1).numpy()].reshape(points1.shape)
    gap = np.linalg.norm(partner_points - points1, axis=-1)
    np.testing.assert_allclose(gap, distance.numpy(), atol=0.02)
    expected_exact = np.zeros(g1.shape, bool)
    expected_exact[::3, ::3, ::3] = True
    np.testing.assert_array_equal(distance.numpy() < 1e-6, expected_exact)
    assert gap[expected_exact].max() < 0.02
    partner_zyx = np.stack(np.unravel_index(partner.numpy(), g2.shape), -1)[::3, ::3, ::3]
    first_zyx = np.stack(np.meshgrid(*(np.arange(0, n, 3) for n in g1.shape), indexing="ij"), -1)
    np.testing.assert_array_equal(partner_zyx, first_zyx // 3 * 2 + shift_xyz[::-1])


def test_intensity_jitter_is_one_random_gain_and_shift_per_view() -> None:
    scans, _ = _ramp_scans()  # HU from -900 upwards: inside SAM's window, so nothing is clipped
    geometry = ViewGeometry((60.0, 0.0, 50.0), 2.0, (8, 12, 12))
    plain = render_view(scans[0], geometry)
    hu = (plain.image + 50.0) * (4095.0 / 255.0) - 1024.0
    fits = []
    for seed in (1, 2):
        jittered = render_view(scans[0], geometry, np.random.default_rng(seed), 0.0, 0.1, 30.0)
        assert [a.tolist() for a in jittered.axes_mm] == [a.tolist() for a in plain.axes_mm]
        hu_jittered = (jittered.image + 50.0) * (4095.0 / 255.0) - 1024.0
        gain, shift = np.polyfit(hu.ravel(), hu_jittered.ravel(), 1)
        np.testing.assert_allclose(hu_jittered, gain * hu + shift, atol=0.05)
        assert 0.9 <= gain <= 1.1 and -30.0 <= shift <= 30.0
        fits.append((gain, shift))
    assert abs(fits[0][0] - fits[1][0]) > 1e-3 and abs(fits[0][1] - fits[1][1]) > 0.1
    np.testing.assert_array_equal(
        render_view(scans[0], geometry, None, 0.0, 0.1, 30.0).image, plain.image
    )


def test_random_pairs_are_scaled_and_placed_on_the_body() -> None:
    scan = load_scan(require_data("openkbp") / "train_pt_1_ct.nii.gz", cache_dir=None)
    config = CropConfig()
    rng = np.random.default_rng(0)
    overlapping = 0
    for _ in range(200):
        pair = draw_pair_geometry(rng, scan, config)
        extents = []
        for geometry in pair:
            assert 1.6 <= geometry.spacing_mm <= 2.4 and geometry.shape == config.patch
            lo = np.array(geometry.origin_mm) - geometry.spacing_mm / 2
            hi = lo + np.array(config.patch[::-1]) * geometry.spacing_mm
            assert np.all(hi > scan.box_lo_mm) and np.all(lo < scan.box_hi_mm)  # on the body
            extents.append((lo, hi))
        overlap = np.minimum(extents[0][1], extents[1][1]) - np.maximum(
            extents[0][0], extents[1][0]
        )
        overlapping += bool(np.all(overlap > 0))
    assert 70 <= overlapping <= 140  # 0.8 per axis: about half the pairs overlap on all three axes


# --- training ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config", [SMALL, replace(SMALL, optimizer="adam", lr=1e-3)], ids=["sgd", "adam"]
)
def test_training_steps_lower_the_loss(train_scans, tmp_path, config) -> None:
    batch = CropPairDataset(train_scans, config.crops, config.batch, seed=3, cache_dir=tmp_path)[0]
    state = new_training_state(config, torch.device("cpu"))
    assert isinstance(
        state.optimizer, torch.optim.Adam if config.optimizer == "adam" else torch.optim.SGD
    )

    def loss_now() -> float:
        torch.manual_seed(7)  # the same negatives each time
        with torch.no_grad():
            return sam_loss(*state.model(batch.images), batch, config.loss).total.item()

    before = loss_now()
    for _ in range(5):
        train_step(state, batch, config)
    assert loss_now() < before - 0.3


def test_resume_continues_exactly(train_scans, tmp_path) -> None:
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    final = train_sam(train_scans, straight, SMALL)
    assert [i for i, _ in list_checkpoints(straight)] == [2, 4]
    train_sam(train_scans, interrupted, replace(SMALL, iterations=2))
    train_sam(train_scans, interrupted, SMALL, resume=True)

    a = load_training_checkpoint(straight / "checkpoint_0000004.pt")
    b = load_training_checkpoint(interrupted / "checkpoint_0000004.pt")
    for key in a["state_dict"]:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key
    momentum_a, momentum_b = a["optimizer"]["state"], b["optimizer"]["state"]
    assert momentum_a.keys() == momentum_b.keys()
    for key in momentum_a:
        assert torch.equal(momentum_a[key]["momentum_buffer"], momentum_b[key]["momentum_buffer"])
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
    log_a = (straight / "train_log.tsv").read_text().splitlines()
    log_b = (interrupted / "train_log.tsv").read_text().splitlines()
    assert [line.split("\t")[:4] for line in log_a] == [line.split("\t")[:4] for line in log_b]
    assert len(log_a) == 5

    for weights in (final, straight / "checkpoint_0000002.pt"):  # both load for registration
        model = load_sam_checkpoint(weights)
        assert model.width == SMALL.width and model.embedding_dim == SMALL.embedding_dim

    with pytest.raises(ConfigError, match="lr: 0.02 -> 0.05"):
        train_sam(train_scans, interrupted, replace(SMALL, lr=0.05), resume=True)
    with pytest.raises(OutputError, match="--resume"):
        train_sam(train_scans, interrupted, SMALL)


# --- bad input -----------------------------------------------------------------------------------


def test_folder_with_a_non_image_is_refused_before_any_work(tmp_path) -> None:
    folder = tmp_path / "scans"
    _write_phantoms(folder, 2)
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    with pytest.raises(InputError, match="notes.txt"):
        train_sam(collect_scans([folder]), out, SMALL)
    assert not out.exists()


def test_two_dimensional_and_label_images_are_refused(tmp_path) -> None:
    paths = _write_phantoms(tmp_path / "scans", 2)
    flat = sitk.GetImageFromArray(np.full((32, 32), -1000, np.int16))
    sitk.WriteImage(flat, str(tmp_path / "slice.nii.gz"))
    _, labels = make_phantom(size_xyz=(40, 36, 24), spacing=4.0)
    sitk.WriteImage(labels, str(tmp_path / "labels.nii.gz"))
    with pytest.raises(InputError, match=r"not 3-D.*slice\.nii\.gz"):
        train_sam([*paths, tmp_path / "slice.nii.gz"], tmp_path / "out", SMALL)
    with pytest.raises(InputError, match=r"label maps.*labels\.nii\.gz"):
        train_sam([*paths, tmp_path / "labels.nii.gz"], tmp_path / "out", SMALL)
    with pytest.raises(InputError, match="at least 2 scans"):
        train_sam(paths[:1], tmp_path / "out", SMALL)
    assert not (tmp_path / "out").exists()


def test_corrupt_checkpoint_is_refused(tmp_path) -> None:
    paths = _write_phantoms(tmp_path / "scans", 2)
    out = tmp_path / "out"
    out.mkdir()
    (out / "checkpoint_0000002.pt").write_bytes(b"\x80\x02 this is not a checkpoint")
    with pytest.raises(CheckpointError, match="checkpoint_0000002.pt.*corrupt"):
        train_sam(paths, out, SMALL, resume=True)


def test_command_line_trains_and_reports_errors(tmp_path, capsys) -> None:
    folder = tmp_path / "scans"
    _write_phantoms(folder, 2)
    (folder / "README.md").write_text("scans for training")
    out = tmp_path / "out"
    common = ["-o", str(out), "--iterations", "2", "--batch", "2", "--patch", "16", "48", "48"]
    common += ["--width", "0.125", "--device", "cpu", "--progress", "none"]
    assert main([str(folder), *common]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and "README.md" in error

    assert main([str(folder), *common, "--exclude-pattern", "*.md"]) == 0
    final = Path(capsys.readouterr().out.strip().split(": ", 1)[1])
    assert final == out / "sam_trained.pth" and load_sam_checkpoint(final).width == 0.125
    assert [i for i, _ in list_checkpoints(out)] == [2]

    shutil.copy(out / "checkpoint_0000002.pt", out / "checkpoint_0000003.pt")
    with open(out / "checkpoint_0000003.pt", "r+b") as damaged:
        damaged.truncate(1000)
    assert main([str(folder), *common, "--exclude-pattern", "*.md", "--resume"]) == 2
    assert "checkpoint_0000003.pt" in capsys.readouterr().err


def test_invalid_settings_are_refused_with_their_names() -> None:
    with pytest.raises(ConfigError, match="optimizer must be one of sgd, adam") as info:
        replace(SMALL, optimizer="rmsprop", width=0.0).validate()
    assert "width must be a positive number" in str(info.value)


# --- fine-tuning and learning-rate schedule --------------------------------------------------------


def test_fine_tuning_starts_from_the_given_weights(train_scans, tmp_path, capsys) -> None:
    start = SAMNetwork(SMALL.width, SMALL.embedding_dim)
    torch.nn.init.normal_(start.backbone.conv1.conv.weight)  # unlike any seeded initialisation
    weights = tmp_path / "start.pth"
    save_sam_checkpoint(start, weights)
    config = replace(SMALL, init_weights=str(weights), iterations=2)
    state = new_training_state(config, torch.device("cpu"))
    for key, value in start.state_dict().items():
        assert torch.equal(state.model.state_dict()[key], value), key

    final = train_sam(train_scans, tmp_path / "run", config)
    sha = file_sha256(weights)
    assert (
        json.loads((tmp_path / "run" / "train_config.json").read_text())["init_weights_sha256"]
        == sha
    )
    meta = torch.load(final, weights_only=True)["meta"]
    assert meta["init_weights"] == "start.pth" and meta["init_weights_sha256"] == sha

    with pytest.raises(ConfigError, match="width 0.125 .*--width 0.125"):
        train_sam(train_scans, tmp_path / "wide", replace(config, width=0.25))
    assert not (tmp_path / "wide").exists()

    # The command line takes the width from the weights.
    common = ["-o", str(tmp_path / "cli"), "--iterations", "1", "--batch", "2", "--patch", "16"]
    common += ["48", "48", "--device", "cpu", "--progress", "none", "--init-weights", str(weights)]
    assert main([str(p) for p in train_scans] + common) == 0
    assert load_sam_checkpoint(tmp_path / "cli" / "sam_trained.pth").width == SMALL.width
    capsys.readouterr()
    assert main([str(p) for p in train_scans] + common[:-1] + [str(tmp_path / "missing.pth")]) == 2
    assert "missing.pth does not exist" in capsys.readouterr().err


def test_cosine_schedule_warms_up_then_decays_to_zero(train_scans, tmp_path) -> None:
    config = replace(SMALL, lr=0.1, iterations=110, warmup_iterations=10, lr_schedule="cosine")
    assert learning_rate(config, 0) == pytest.approx(0.01)
    assert learning_rate(config, 10) == pytest.approx(0.1)
    assert learning_rate(config, 60) == pytest.approx(0.05)
    assert learning_rate(config, 110) == pytest.approx(0.0, abs=1e-12)
    assert learning_rate(replace(config, lr_schedule="constant"), 109) == 0.1

    # Resuming may not change the planned length: that would bend the decay.
    cosine = replace(SMALL, lr_schedule="cosine")
    train_sam(train_scans, tmp_path / "run", cosine)
    (tmp_path / "run" / "checkpoint_0000004.pt").unlink()
    with pytest.raises(ConfigError, match="iterations: 4 -> 6"):
        train_sam(train_scans, tmp_path / "run", replace(cosine, iterations=6), resume=True)
    with pytest.raises(ConfigError, match="lr_schedule must be one of constant, cosine"):
        replace(SMALL, lr_schedule="step").validate()
    with pytest.raises(ConfigError, match="intensity_scale must lie in"):
        replace(SMALL, crops=CropConfig(intensity_scale=1.5)).validate()
