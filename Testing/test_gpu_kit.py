"""The GPU kit (benchmarks/device) in its tiny mode: every part on the CPU, so it cannot rot.

The data are two small phantoms packed by ``pack.py --synthetic`` (with their CPU results); the
kit runs as on the GPU machine, in a child process, and its report is checked part by part.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from SAMERegistrationLib.features.sam_network import load_sam_checkpoint

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
