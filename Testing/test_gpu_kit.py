"""The GPU kit (benchmarks/device) in its tiny mode: every part on the CPU, so it cannot rot.

The data are two small phantoms packed by ``pack.py --synthetic`` (with their CPU results); the
kit runs as on the GPU machine, in a child process, and its report is checked part by part.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from SAMERegistrationLib.features.sam_network import load_sam_checkpoint
from SAMERegistrationLib.synthetic import make_phantom

REPO = Path(__file__).resolve().parent.parent
KIT = REPO / "benchmarks" / "device"
BLOCK_SIMPLEITK = "import sys\nsys.modules['SimpleITK'] = None\n"


def _run(command: list, env: dict | None = None, timeout: float = 600) -> None:
    done = subprocess.run(
        [str(c) for c in command],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    data = tmp_path_factory.mktemp("kit-data")
    _run([sys.executable, KIT / "pack.py", "--synthetic", "--data", data])
    return data


def _environment(extra_path: Path | None = None) -> dict:
    paths = [str(extra_path)] if extra_path else []
    return {**os.environ, "PYTHONPATH": os.pathsep.join([*paths, str(REPO)])}


def run_tiny(data: Path, out: Path, env: dict) -> dict:
    # A generous budget: the figures, not the speed of a shared test machine, are checked here.
    _run([sys.executable, KIT / "run.py", "--out", out, "--data", data, "--tiny",
          "--budget-s", 400], env=env)  # fmt: skip
    return json.loads((out / "report.json").read_text())


def check_report(report: dict, out: Path) -> None:
    # CUDA tests: collected and skipped on a machine without CUDA, run on a GPU machine.
    assert report["tests"]["exit_code"] == 0, report["tests"]
    expected = "skipped" if not torch.cuda.is_available() else "passed"
    assert expected in report["tests"]["summary"]

    variants = report["bench"]["variants"]
    assert set(variants) == {"mind", "sam"}
    for name, stages in (("mind", 7), ("sam", 5)):
        run = variants[name]
        assert run["warmup_s"] > 0
        [pair] = run["pairs"]
        assert pair["status"] == "ok", pair
        assert len(pair["seconds"]) == stages and pair["total_s"] >= max(pair["seconds"].values())
        # The kit ran the same arrays as the stored CPU result: Dice agrees stage by stage.
        assert run["cpu_check"]["agree"], run["cpu_check"]
        assert run["cpu_check"]["compared"] == len(pair["dice"]) >= 2
        assert pair["dice"]["affine"] > 0.8  # the phantoms differ by a shift: easy to align

    train = report["train"]
    assert train["iterations"] >= 1 and train["final_loss"] > 0
    shards = [out / name for name in train["weights"]["shards"]]
    joined = out / "joined.pth"
    joined.write_bytes(b"".join(p.read_bytes() for p in shards))
    network = load_sam_checkpoint(joined)
    assert (network.width, network.embedding_dim) == (0.125, 16)

    markdown = (out / "report.md").read_text()
    assert "## Stages, mind features" in markdown and "## SAM training" in markdown
    returned = sorted(p.name for p in out.iterdir() if p.name != "joined.pth")
    assert len(returned) <= 8 and all(p.is_file() for p in out.iterdir())
    assert {"report.json", "report.md", "kit.log", "train_log.tsv"} <= set(returned)


def test_tiny_mode_runs_every_part_and_agrees_with_the_cpu_result(phantoms, tmp_path):
    out = tmp_path / "out"
    check_report(run_tiny(phantoms, out, _environment()), out)


def test_tiny_mode_runs_without_simpleitk(phantoms, tmp_path):
    """The device machine has no SimpleITK: the kit must need only torch and numpy."""
    blocker = tmp_path / "block"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(BLOCK_SIMPLEITK)
    env = _environment(blocker)
    probe = subprocess.run(
        [sys.executable, "-c", "import sys; sys.path.insert(0, 'benchmarks/device'); import bench"],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=env,
    )
    assert probe.returncode == 0, probe.stderr
    out = tmp_path / "out"
    check_report(run_tiny(phantoms, out, env), out)


def test_gpu_crops_sample_the_volume_where_the_library_says_the_view_lies():
    """A view rendered by the kit (torch) equals SimpleITK's resampling of the same volume onto
    the view's grid, on an anisotropic, shifted volume (catches any axis or offset slip)."""
    import numpy as np
    import SimpleITK as sitk

    sys.path.insert(0, str(KIT))
    import packed
    import train_sam_gpu

    from SAMERegistrationLib.grid import Grid

    rng = np.random.default_rng(0)
    values = rng.integers(1, 255, size=(40, 50, 60)).astype(np.uint8)  # (z, y, x)
    spacing, origin = np.array([3.9, 2.7, 2.5]), np.array([-20.0, 35.0, 110.0])  # (x, y, z)
    extent = (np.array(values.shape[::-1]) - 1) * spacing
    volume = packed.TrainVolume("v", values, spacing, origin, origin + 10, origin + extent - 10)
    crops = train_sam_gpu.CropConfig(patch=(16, 32, 32))
    source = train_sam_gpu.SelfPairs([volume], crops, 1, torch.device("cpu"))
    image = sitk.GetImageFromArray(values.astype(np.float32))
    image.SetSpacing(tuple(spacing))
    image.SetOrigin(tuple(origin))
    draw = np.random.default_rng(1)
    for geometry in train_sam_gpu.draw_pair_geometry(draw, volume, crops):
        rendered, valid = source._render(0, geometry, np.random.default_rng(2))
        reference = sitk.GetArrayFromImage(
            sitk.Resample(image, geometry.grid().reference_image(), sitk.Transform(),
                          sitk.sitkLinear, 0.0)
        )  # fmt: skip
        inside = Grid.from_sitk(image).contains(
            geometry.grid().voxel_centres().reshape(-1, 3), margin_voxels=0.5
        )
        assert np.array_equal(valid.ravel(), inside)
        core = Grid.from_sitk(image).contains(geometry.grid().voxel_centres().reshape(-1, 3))
        difference = (rendered[0].numpy() + packed.SAM_OFFSET - reference).ravel()[core]
        assert core.sum() > 1000 and np.abs(difference).max() < 0.1


def test_position_probe_loss_vanishes_for_embeddings_that_encode_position():
    """Known answer: embeddings equal to the voxel position (mm / 100) and an identity probe
    predict every offset exactly; a wrong probe does not."""
    sys.path.insert(0, str(KIT))
    import train_sam_gpu

    axes = tuple(torch.tensor([[0.0, 8.0, 16.0], [4.0, 12.0, 20.0]]) * k for k in (1, 2, 3))
    z, y, x = (torch.stack([torch.meshgrid(*(a[v] for a in axes), indexing="ij")[i]
                            for v in range(2)]) for i in range(3))  # fmt: skip
    embeddings = torch.stack([z, y, x], dim=1) / train_sam_gpu.POSITION_SCALE_MM
    valid = torch.ones(2, 3, 3, 3, dtype=torch.bool)
    batch = train_sam_gpu.PairBatch(embeddings, axes, valid, axes, valid, ["a"])
    probe = torch.nn.Linear(3, 3)
    with torch.no_grad():
        probe.weight.copy_(torch.eye(3))
        probe.bias.zero_()
        assert float(train_sam_gpu.position_probe_loss(probe, embeddings, batch)) < 1e-10
        probe.weight.copy_(torch.eye(3)[[1, 0, 2]])  # y and z swapped
        assert float(train_sam_gpu.position_probe_loss(probe, embeddings, batch)) > 1e-3


def test_cross_patient_variant_trains_and_writes_loadable_weights(phantoms, tmp_path):
    _run([sys.executable, KIT / "train_sam_gpu.py", "--data", phantoms, "--out", tmp_path,
          "--tiny", "--variant", "cross", "--budget-s", 1, "--device", "cpu"],
         env=_environment())  # fmt: skip
    joined = b"".join(p.read_bytes() for p in sorted(tmp_path.glob("sam_gpu.pth.part*")))
    (tmp_path / "sam.pth").write_bytes(joined)
    network = load_sam_checkpoint(tmp_path / "sam.pth")
    assert all(torch.isfinite(p).all() for p in network.parameters())
    log = (tmp_path / "train_log.tsv").read_text().splitlines()
    assert log[0].split("\t")[5] == "probe" and float(log[1].split("\t")[5]) > 0


# --- cross-patient pairs through packed maps ------------------------------------------------------


def _kit_modules():
    sys.path.insert(0, str(KIT))
    import packed
    import train_sam_gpu

    return packed, train_sam_gpu


def _box_volume(packed, name, values, spacing, origin):
    extent = (np.array(values.shape[::-1]) - 1) * spacing
    return packed.TrainVolume(name, values, spacing, origin, origin + 10, origin + extent - 10)


def _coarse_map(packed, fixed, moving, affine, field_xyz, lo, hi, confidence=None, spacing=8.0):
    """A packed map of constant displacement ``field_xyz`` on an 8 mm grid over [lo, hi]."""
    size = np.ceil((hi - lo) / spacing).astype(int) + 1  # (x, y, z)
    shape = tuple(size[::-1])
    field = np.broadcast_to(np.asarray(field_xyz, np.float16)[:, None, None, None], (3, *shape))
    if confidence is None:
        confidence = np.full(shape, 255, np.uint8)
    return packed.PackedMap(fixed, moving, affine, field.copy(), lo, np.full(3, spacing), lo, hi,
                            confidence)  # fmt: skip


def test_cross_pair_through_a_translation_shows_the_fixed_anatomy_on_the_partner_view():
    """Known answer: the moving volume is the fixed one moved by t (part affine, part field), so
    the partner view pulled through the map equals the fixed volume on that view's grid, and the
    local loss may use it exactly where the map's confidence (a ramp in x) reaches the threshold."""
    packed, kit = _kit_modules()
    rng = np.random.default_rng(0)
    values = rng.integers(1, 255, size=(30, 40, 50)).astype(np.uint8)  # (z, y, x)
    spacing, origin = np.array([3.1, 2.6, 2.2]), np.array([-40.0, 15.0, 90.0])
    t_affine, t_field = np.array([12.5, -7.25, 3.0]), np.array([-4.0, 6.5, 9.75])
    fixed = _box_volume(packed, "f", values, spacing, origin)
    moving = _box_volume(packed, "m", values, spacing, origin + t_affine + t_field)
    affine = np.eye(4)
    affine[:3, 3] = t_affine
    lo, hi = origin - 60, origin + (np.array(values.shape[::-1]) - 1) * spacing + 60
    size_x = int(np.ceil((hi - lo)[0] / 8.0)) + 1
    ramp = np.round(np.linspace(0, 255, size_x)).astype(np.uint8)
    shape = tuple((np.ceil((hi - lo) / 8.0).astype(int) + 1)[::-1])
    confidence = np.broadcast_to(ramp, shape).copy()
    pair_map = _coarse_map(packed, "f", "m", affine, t_field, lo, hi, confidence)
    crops = kit.CropConfig(patch=(16, 32, 32), noise_std=0.0)
    self_pairs = kit.SelfPairs([fixed, moving], crops, 1, torch.device("cpu"))
    cross = kit.CrossPairs(self_pairs, [pair_map], share=1.0, min_similarity=0.3)
    checked = 0
    for seed in range(3):
        pair = cross.cross_pair(cross.maps[0], np.random.default_rng(seed))
        assert pair.cross_patient and pair.name == "f <- m"
        second = kit.ViewGeometry(
            (pair.views[1].axes_mm[2][0], pair.views[1].axes_mm[1][0], pair.views[1].axes_mm[0][0]),
            float(pair.views[1].axes_mm[2][1] - pair.views[1].axes_mm[2][0]),
            crops.patch,
        )
        direct, direct_valid = self_pairs._render(0, second, np.random.default_rng(0))
        assert np.array_equal(pair.views[1].valid, direct_valid)
        both = direct_valid
        difference = (pair.images[1] - direct)[0].numpy()[both]
        assert np.abs(difference).max() < 0.05
        checked += both.sum()
        x = pair.views[1].axes_mm[2]
        expected = np.interp(x, lo[0] + 8.0 * np.arange(size_x), ramp.astype(float)) >= 0.3 * 255
        assert np.array_equal(pair.views[1].reliable, np.broadcast_to(expected, crops.patch))
    assert checked > 5000


def test_cross_pair_through_a_rotation_puts_both_views_of_a_landmark_on_the_same_point():
    """Known answer: a blob at c in the fixed volume and at its image A (c + u) in the moving one
    (rotated 20 degrees, scaled, shifted) appear at c in both views of a cross pair."""
    packed, kit = _kit_modules()
    angle = np.radians(20.0)
    linear = 1.1 * np.array(
        [[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]]
    )
    affine = np.eye(4)
    affine[:3, :3], affine[:3, 3] = linear, [5.0, -8.0, 12.0]
    u = np.array([3.0, -2.0, 1.5])
    centre = np.array([40.0, 30.0, 20.0])
    image_of_centre = linear @ (centre + u) + affine[:3, 3]

    def blob(spacing, origin, shape_zyx, at):
        z, y, x = np.meshgrid(*(np.arange(n) for n in shape_zyx), indexing="ij")
        points = np.stack([x, y, z], -1) * spacing + origin
        squared = ((points - at) ** 2).sum(-1)
        return np.round(1 + 200 * np.exp(-squared / (2 * 6.0**2))).astype(np.uint8)

    f_spacing, f_origin = np.array([2.0, 2.5, 3.0]), np.array([-20.0, -30.0, -40.0])
    m_spacing, m_origin = np.array([1.5, 1.8, 2.4]), np.array([-60.0, -60.0, -30.0])
    fixed = _box_volume(packed, "f", blob(f_spacing, f_origin, (40, 50, 60), centre), f_spacing,
                        f_origin)  # fmt: skip
    moving = _box_volume(packed, "m", blob(m_spacing, m_origin, (70, 90, 100), image_of_centre),
                         m_spacing, m_origin)  # fmt: skip
    lo, hi = np.array([-100.0] * 3), np.array([150.0] * 3)
    pair_map = _coarse_map(packed, "f", "m", affine, u, lo, hi)
    crops = kit.CropConfig(patch=(16, 32, 32), noise_std=0.0)
    self_pairs = kit.SelfPairs([fixed, moving], crops, 1, torch.device("cpu"))
    cross = kit.CrossPairs(self_pairs, [pair_map], share=1.0, min_similarity=0.3)
    geometry = kit.ViewGeometry(tuple(centre - np.array([15.5, 15.5, 7.5]) * 2.0), 2.0, crops.patch)
    fixed_view, _ = self_pairs._render(0, geometry, np.random.default_rng(0))
    moving_view, valid, _ = cross._render_through_map(
        cross.maps[0], geometry, np.random.default_rng(0)
    )
    assert valid.all()
    z, y, x = np.meshgrid(*geometry.axes_mm(), indexing="ij")
    for view in (fixed_view, moving_view):
        weight = np.clip(view[0].numpy() + packed.SAM_OFFSET - 1, 0, None)
        found = np.array([(weight * c).sum() / weight.sum() for c in (x, y, z)])
        assert np.abs(found - centre).max() < 0.1  # a twentieth of the view voxel (2 mm)


def test_cross_variant_with_packed_maps_trains_on_cross_patient_pairs(phantoms, tmp_path):
    packed, _ = _kit_modules()
    data = tmp_path / "data"
    shutil.copytree(phantoms, data)
    volumes = {v.name: v for v in packed.read_training(data)}
    fixed = volumes["phantom_0"]
    affine = np.eye(4)
    affine[:3, 3] = volumes["phantom_1"].origin - fixed.origin  # the phantoms' shift
    lo = fixed.origin
    hi = fixed.origin + (np.array(fixed.values.shape[::-1]) - 1) * fixed.spacing
    packed.write_pair_map(
        data, _coarse_map(packed, "phantom_0", "phantom_1", affine, [0, 0, 0], lo, hi)
    )
    blocker = tmp_path / "block"  # as on the device machine: no SimpleITK
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(BLOCK_SIMPLEITK)
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, KIT / "train_sam_gpu.py", "--data", data, "--out", out, "--tiny",
         "--variant", "cross", "--cross-share", "1", "--budget-s", "1", "--device", "cpu"],
        cwd=REPO, capture_output=True, text=True, env=_environment(blocker), timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["pair_maps"] == 1 and result["cross_pairs"] >= 2 * result["iterations"]
    rows = [line.split("\t") for line in (out / "train_log.tsv").read_text().splitlines()[1:]]
    assert rows and all(np.isfinite(float(v)) for row in rows for v in row[2:6])
    shards = sorted(out.glob("sam_gpu.pth.part*"))
    (out / "sam.pth").write_bytes(b"".join(p.read_bytes() for p in shards))
    assert all(torch.isfinite(p).all() for p in load_sam_checkpoint(out / "sam.pth").parameters())


def _write_scan(path: Path, seed: int, origin) -> sitk.Image:
    image, _ = make_phantom(size_xyz=(36, 32, 24), spacing=3.0, seed=seed)
    image.SetOrigin(origin)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))
    return image


def _write_cache(cache: Path, scans: list[Path], pairs: list[tuple[int, int]], affine) -> None:
    """A pair-map cache as sam-pair-maps writes it, with a known map: ``affine`` after a field
    linear in position, and a similarity ramp along x."""
    from SAMERegistrationLib.grid import Grid
    from SAMERegistrationLib.train import pair_maps

    identities = [pair_maps.ScanIdentity.of(path) for path in scans]
    registration = dict(pair_maps.DEFAULT_REGISTRATION)
    pair_maps.write_manifest(cache, identities, pairs, 0, registration)
    for index, (fixed, moving) in enumerate(pairs):
        grid = Grid.from_sitk(sitk.ReadImage(str(scans[fixed])))
        points = grid.voxel_centres()  # (z, y, x, 3)
        dense = np.moveaxis(points @ np.diag([0.02, -0.01, 0.03]) + [1.5, -2.0, 0.5], -1, 0)
        similarity = (points[..., 0] - points[..., 0].min()) / np.ptp(points[..., 0]) * 2 - 1
        pair_map = pair_maps.PairMap(identities[fixed], identities[moving], affine,
                                     dense.astype(np.float16), similarity.astype(np.float16),
                                     grid)  # fmt: skip
        meta = {"format": pair_maps.ENTRY_FORMAT, "status": "done", "fixed": identities[fixed].to_dict(),
                "moving": identities[moving].to_dict(), "registration": registration,
                "grid": grid.to_dict()}  # fmt: skip
        pair_maps.write_entry(pair_maps.entry_path(cache, index), meta, pair_map)


def test_pack_keeps_the_maps_between_packed_training_volumes_and_refuses_a_foreign_cache(tmp_path):
    """Known answer: the packed coarse map, applied as the trainer applies it, sends points where
    the library's map does; a pair with a scan left out of the packed volumes is skipped; a cache
    built from other scans is refused by name and the packed maps stay as they were."""
    from SAMERegistrationLib.train.pair_maps import MANIFEST, entry_path, read_map

    packed, kit = _kit_modules()
    shared, data, cache = tmp_path / "shared", tmp_path / "data", tmp_path / "cache"
    scans = [shared / "openkbp" / "train_pt_1_ct.nii.gz", shared / "openkbp" / "train_pt_2_ct.nii.gz",
             shared / "popi" / "popi_phase00_ct_2mm.nii.gz"]  # fmt: skip
    for seed, path in enumerate(scans):
        _write_scan(path, seed, (10.0 * seed, -5.0 * seed, 3.0 * seed))
    affine = np.array(
        [[1.05, 0.1, 0, 4.0], [-0.1, 0.95, 0.05, -3.0], [0, 0, 1.1, 2.0], [0, 0, 0, 1]]
    )
    _write_cache(cache, scans, [(0, 2), (0, 1)], affine)  # train_pt_2 is left out below
    _run([sys.executable, KIT / "pack.py", "--shared", shared, "--data", data, "--parts", "train",
          "--train-limit", 1, "--pair-maps", cache], env=_environment())  # fmt: skip
    [pair_map] = packed.read_pair_maps(data)
    assert (pair_map.fixed, pair_map.moving) == ("train_pt_1_ct", "popi_phase00_ct_2mm")
    assert pair_map.field.dtype == np.float16 and pair_map.confidence.dtype == np.uint8
    library = read_map(entry_path(cache, 0))
    points = library.grid.voxel_centres()[::3, ::3, ::3]
    volumes = packed.read_training(data)
    self_pairs = kit.SelfPairs(volumes, kit.CropConfig(), 1, torch.device("cpu"))
    device_map = kit.CrossPairs(self_pairs, [pair_map], 1.0, 0.3).maps[0]
    mapped = device_map.map_points(torch.as_tensor(points, dtype=torch.float32)).numpy()
    expected = library.map_points(points.reshape(-1, 3)).reshape(points.shape)
    assert np.abs(mapped - expected).max() < 0.05  # mm: a linear field survives the coarse grid
    coarse_x = pair_map.field_origin[0] + pair_map.field_spacing[0] * np.arange(
        pair_map.confidence.shape[2]
    )
    lo, hi = library.grid.corners()[:, 0].min(), library.grid.corners()[:, 0].max()
    ramp = np.clip((np.clip(coarse_x, lo, hi) - lo) / (hi - lo) * 2 - 1, 0, 1) * 255
    assert np.abs(pair_map.confidence[5, 5].astype(float) - ramp).max() <= 1.5

    foreign = tmp_path / "foreign"
    other = tmp_path / "elsewhere" / "validation_pt_9_ct.nii.gz"
    _write_scan(other, 5, (0.0, 0.0, 0.0))
    _write_cache(foreign, [scans[0], other], [(0, 1)], affine)
    before = {p.name: p.read_bytes() for p in (data / packed.MAPS_DIR).iterdir()}
    done = subprocess.run(
        [sys.executable, KIT / "pack.py", "--shared", shared, "--data", data, "--parts", "maps",
         "--pair-maps", foreign],
        cwd=REPO, capture_output=True, text=True, env=_environment(), timeout=600,
    )  # fmt: skip
    assert done.returncode != 0
    assert str(foreign / MANIFEST) in done.stderr and "other scans" in done.stderr
    assert {p.name: p.read_bytes() for p in (data / packed.MAPS_DIR).iterdir()} == before
