"""Cross-patient SAM training: cached pair maps, crop pairs through a known map, the probe, resume
and the refusal of caches that do not belong to the training scans."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import require_data

from SAMERegistrationLib.errors import InputError, OutputError
from SAMERegistrationLib.features.sam_network import load_sam_checkpoint
from SAMERegistrationLib.grid import Grid
from SAMERegistrationLib.image import to_working_grid
from SAMERegistrationLib.synthetic import make_phantom
from SAMERegistrationLib.train.crops import CropConfig, draw_pair_geometry, load_scan, render_view
from SAMERegistrationLib.train.cross_patient import CrossPatientDataset, render_through_map
from SAMERegistrationLib.train.pair_maps import (
    ENTRY_FORMAT,
    MANIFEST,
    PairMap,
    ScanIdentity,
    build_pair_maps,
    cache_scans,
    entry_path,
    load_pair_maps,
    read_entry,
    read_map,
    sample_on_grid,
    write_entry,
    write_manifest,
)
from SAMERegistrationLib.train.pair_maps_cli import main as pair_maps_main
from SAMERegistrationLib.train.sam_cli import main as train_main
from SAMERegistrationLib.train.sam_losses import LossConfig, sam_loss
from SAMERegistrationLib.train.sam_trainer import (
    SAMTrainConfig,
    load_training_checkpoint,
    new_training_state,
    train_sam,
    train_step,
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
    cross_patient_share=0.5,
    crops=CropConfig(patch=(16, 48, 48)),
    loss=LossConfig(
        local_queries=32,
        local_hard=256,
        local_diverse=64,
        global_hard=32,
        global_diverse=24,
        global_cross=32,
        position_weight=0.5,
        position_samples=64,
    ),
)

# The known map fixed -> moving: p -> A (p + u(p)), a 4 degree rotation about z, 4 % scaling and a
# shift, after a smooth displacement of up to 3 mm per axis.
ANGLE = np.deg2rad(4.0)
AFFINE = np.array(
    [
        [1.04 * np.cos(ANGLE), -np.sin(ANGLE), 0.0, 6.0],
        [np.sin(ANGLE), 1.04 * np.cos(ANGLE), 0.0, -4.0],
        [0.0, 0.0, 0.97, 3.0],
        [0.0, 0.0, 0.0, 1.0],
    ]
)


pytestmark = pytest.mark.usefixtures("one_thread")


def _displacement(points: np.ndarray) -> np.ndarray:
    """The smooth part u (N, 3) at points (N, 3), LPS mm."""
    x, y, z = points.T
    return np.stack(
        [
            3.0 * np.sin(2 * np.pi * y / 160.0),
            2.0 * np.cos(2 * np.pi * z / 140.0),
            2.5 * np.sin(2 * np.pi * x / 180.0),
        ],
        axis=1,
    )


def _known_map(points: np.ndarray) -> np.ndarray:
    moved = points + _displacement(points)
    return moved @ AFFINE[:3, :3].T + AFFINE[:3, 3]


def _known_inverse(points: np.ndarray) -> np.ndarray:
    """p with A (p + u(p)) = q, by fixed-point iteration (u is smooth and small)."""
    inverse = np.linalg.inv(AFFINE)
    target = points @ inverse[:3, :3].T + inverse[:3, 3]
    estimate = target.copy()
    for _ in range(30):
        estimate = target - _displacement(estimate)
    return estimate


@pytest.fixture(scope="module")
def known_cache(tmp_path_factory) -> tuple[Path, list[Path]]:
    """A real CT, a copy resampled through the inverse of the known map (so the moving copy at
    map(p) shows the CT's anatomy at p), and a one-pair cache holding the known map."""
    folder = tmp_path_factory.mktemp("known")
    fixed_path = require_data("openkbp") / "train_pt_1_ct.nii.gz"
    fixed = sitk.ReadImage(str(fixed_path), sitk.sitkFloat32)
    moving_grid = to_working_grid(fixed, 2.5).grid
    points = moving_grid.voxel_centres().reshape(-1, 3)
    source = _known_inverse(points)
    fixed_grid = Grid.from_sitk(fixed)
    hu = sample_on_grid(sitk.GetArrayFromImage(fixed)[None], fixed_grid, source)[0]
    hu = np.where(fixed_grid.contains(source, margin_voxels=0.5), hu, -1000.0)
    moving = sitk.GetImageFromArray(hu.reshape(moving_grid.shape).astype(np.float32))
    moving_grid.apply_to(moving)
    moving_path = folder / "moved_copy.nii.gz"
    sitk.WriteImage(moving, str(moving_path))

    working = to_working_grid(fixed, 2.0).grid
    dense = _displacement(working.voxel_centres().reshape(-1, 3)).T.reshape(3, *working.shape)
    identities = [ScanIdentity.of(fixed_path), ScanIdentity.of(moving_path)]
    cache = folder / "maps"
    registration = {"known": True}
    write_manifest(cache, identities, [(0, 1)], 0, registration)
    pair_map = PairMap(
        identities[0],
        identities[1],
        AFFINE,
        dense.astype(np.float16),
        np.ones(working.shape, np.float16),
        working,
    )
    meta = {
        "format": ENTRY_FORMAT,
        "status": "done",
        "fixed": identities[0].to_dict(),
        "moving": identities[1].to_dict(),
        "grid": working.to_dict(),
        "registration": registration,
    }
    write_entry(entry_path(cache, 0), meta, pair_map)
    return cache, [fixed_path, moving_path]


# --- correspondences through a map ---------------------------------------------------------------


def test_cross_patient_views_show_the_same_physical_point(known_cache) -> None:
    cache, scans = known_cache
    (entry,) = load_pair_maps(cache, scans)
    pair_map = read_map(entry)
    fixed, moving = load_scan(scans[0], None), load_scan(scans[1], None)
    config = CropConfig(patch=(16, 48, 48))
    rng = np.random.default_rng(5)
    geometry, _ = draw_pair_geometry(rng, fixed, config)

    # The cached map (float16 field on a 2 mm grid) sends each view voxel where the known map does.
    points = geometry.grid().voxel_centres().reshape(-1, 3)
    inside = pair_map.grid.contains(points, margin_voxels=0.0)
    error = np.linalg.norm(pair_map.map_points(points) - _known_map(points), axis=1)[inside]
    assert inside.mean() > 0.5
    assert error.max() < 0.05  # mm

    # And the moving copy seen through the map shows the fixed CT's anatomy voxel for voxel.
    direct = render_view(fixed, geometry)
    through = render_through_map(moving, pair_map, geometry, config, min_similarity=0.5)
    both = direct.valid & through.valid & (direct.image > 0) & (through.image > 0)
    assert both.mean() > 0.2
    correlation = np.corrcoef(direct.image[both], through.image[both])[0, 1]
    assert correlation > 0.95
    assert np.median(np.abs(direct.image[both] - through.image[both])) < 3.0  # of ~255
    # With body_only, the air around the body is no longer valid.
    in_body = render_through_map(
        moving, pair_map, geometry, replace(config, body_only=True), min_similarity=0.5
    )
    assert 0 < in_body.valid.sum() < through.valid.sum()
    assert not in_body.valid[through.image == -50.0].any()
    # A shifted view (5 mm off) correlates clearly less: the test can tell where anatomy lands.
    shifted = replace(geometry, origin_mm=tuple(np.add(geometry.origin_mm, (5.0, 0.0, 0.0))))
    off = render_through_map(moving, pair_map, shifted, config, min_similarity=0.5)
    assert np.corrcoef(direct.image[both], off.image[both])[0, 1] < correlation - 0.05


def test_local_loss_uses_only_reliable_points(known_cache) -> None:
    cache, scans = known_cache
    pair_map = read_map(load_pair_maps(cache, scans)[0])
    pair_map.similarity[:, :, : pair_map.grid.shape[2] // 2] = -1  # untrusted on one half
    moving = load_scan(scans[1], None)
    geometry, _ = draw_pair_geometry(
        np.random.default_rng(1), load_scan(scans[0], None), CropConfig()
    )
    view = render_through_map(moving, pair_map, geometry, CropConfig(), min_similarity=0.0)
    x_mm = view.axes_mm[2]
    split = pair_map.grid.origin[0] + pair_map.grid.spacing[0] * (pair_map.grid.shape[2] // 2)
    assert not view.reliable[:, :, x_mm < split - 2].any()
    assert view.reliable[:, :, x_mm > split + 2][view.valid[:, :, x_mm > split + 2]].all()


# --- training ------------------------------------------------------------------------------------


def test_cross_patient_steps_lower_the_loss(known_cache, tmp_path) -> None:
    cache, scans = known_cache
    files = load_pair_maps(cache, scans)
    dataset = CrossPatientDataset(
        scans, files, SMALL.crops, 2, seed=2, share=1.0, min_similarity=0.5, cache_dir=tmp_path
    )
    batch = dataset[0]
    assert batch.cross_patient == [True, True]
    assert batch.global_valid.flatten(1).any(dim=1).all()
    config = replace(SMALL, pair_maps=str(cache))
    state = new_training_state(config, torch.device("cpu"))
    assert state.probe is not None

    def loss_now() -> float:
        torch.manual_seed(7)
        with torch.no_grad():
            return sam_loss(*state.model(batch.images), batch, config.loss).total.item()

    before = loss_now()
    positions = [train_step(state, batch, config).parts["position"].item() for _ in range(5)]
    assert loss_now() < before - 0.3
    assert positions[-1] < positions[0]


def test_resume_is_exact_and_the_probe_is_not_in_the_weights(known_cache, tmp_path) -> None:
    cache, scans = known_cache
    config = replace(SMALL, pair_maps=str(cache))
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    final = train_sam(scans, straight, config)
    train_sam(scans, interrupted, replace(config, iterations=2))
    train_sam(scans, interrupted, config, resume=True)

    a = load_training_checkpoint(straight / "checkpoint_0000004.pt")
    b = load_training_checkpoint(interrupted / "checkpoint_0000004.pt")
    for key in a["state_dict"]:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key
    assert a["probe"].keys() == {"weight"}
    assert torch.equal(a["probe"]["weight"], b["probe"]["weight"])
    log = (straight / "train_log.tsv").read_text().splitlines()
    assert log[0].split("\t")[4] == "position" and float(log[1].split("\t")[4]) > 0

    saved = torch.load(final, map_location="cpu", weights_only=True)
    assert not any("probe" in key for key in saved["state_dict"])
    assert "probe" not in saved
    model = load_sam_checkpoint(final)
    assert model.state_dict().keys() == saved["state_dict"].keys()


# --- bad input -----------------------------------------------------------------------------------


def test_cache_of_other_scans_is_refused_before_any_work(known_cache, tmp_path) -> None:
    cache, scans = known_cache
    others = [scans[0], require_data("openkbp") / "train_pt_10_ct.nii.gz"]
    output = tmp_path / "out"
    with pytest.raises(InputError, match=str(cache / MANIFEST)):
        train_sam(others, output, replace(SMALL, pair_maps=str(cache)))
    assert not output.exists()
    assert cache_scans(cache) == [str(p.resolve()) for p in scans]


def test_entry_whose_grid_does_not_fit_is_refused(known_cache, tmp_path, capsys) -> None:
    cache, scans = known_cache
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / MANIFEST).write_text((cache / MANIFEST).read_text())
    meta, pair_map = read_entry(entry_path(cache, 0))
    far = replace(pair_map.grid, origin=tuple(np.add(pair_map.grid.origin, (0.0, 0.0, 400.0))))
    write_entry(entry_path(bad, 0), {**meta, "grid": far.to_dict()}, replace(pair_map, grid=far))
    output = tmp_path / "out"
    with pytest.raises(InputError, match=f"{entry_path(bad, 0)} does not fit its scans"):
        train_sam(scans, output, replace(SMALL, pair_maps=str(bad)))
    assert not output.exists()

    small = replace(pair_map, dense=pair_map.dense[:, :-1])
    write_entry(entry_path(bad, 0), meta, small)
    code = train_main([*map(str, scans), "-o", str(output), "--pair-maps", str(bad)])
    assert code == 2
    assert f"error: The pair map {entry_path(bad, 0)} does not fit" in capsys.readouterr().err
    assert not output.exists()


def test_interrupted_build_resumes(tmp_path, capsys) -> None:
    scans = []
    for seed in range(3):
        image, _ = make_phantom(size_xyz=(40, 36, 24), spacing=4.0, seed=seed)
        scans.append(tmp_path / f"ct_{seed}.nii.gz")
        sitk.WriteImage(image, str(scans[-1]))
    cache = tmp_path / "maps"

    def stop_after_first(done: int, total: int) -> None:
        if done == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_pair_maps(scans, cache, pairs=2, seed=4, progress=stop_after_first)
    first = entry_path(cache, 0)
    assert first.exists() and not entry_path(cache, 1).exists()
    stamp = first.stat().st_mtime_ns
    assert not list(cache.glob("*partial*"))

    done = []
    build_pair_maps(scans, cache, pairs=2, seed=4, progress=lambda d, t: done.append(d))
    assert done == [1, 2]
    assert first.stat().st_mtime_ns == stamp  # the finished pair was not registered again
    for index in range(2):
        meta, pair_map = read_entry(entry_path(cache, index))
        assert meta["status"] in ("done", "refused")
        manifest = json.loads((cache / MANIFEST).read_text())
        fixed, moving = manifest["pairs"][index]
        assert meta["fixed"]["path"] == str(scans[fixed].resolve())
        assert meta["moving"]["path"] == str(scans[moving].resolve())
        if pair_map is not None:
            assert pair_map.dense.dtype == np.float16
            assert pair_map.dense.shape == (3, *pair_map.grid.shape)

    # Another seed into the same folder is refused; the command line says so in one line.
    with pytest.raises(OutputError, match="seed, pairs"):
        build_pair_maps(scans, cache, pairs=2, seed=5)
    code = pair_maps_main([*map(str, scans), "-o", str(cache), "--pairs", "2", "--seed", "5"])
    assert code == 2 and "error:" in capsys.readouterr().err
