"""CUDA paths: device choice, CPU/CUDA agreement, mixed precision, out-of-memory advice.

Marked ``cuda`` and skipped without a CUDA GPU; the GPU kit (``benchmarks/device/run.py``) runs
them on a GPU machine with ``pytest -m cuda --noconftest`` (that machine has no SimpleITK, so
this module builds its inputs with numpy alone and uses no fixture of ``conftest.py``).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from SAMERegistrationLib.device import describe_device, memory_guard, resolve_device
from SAMERegistrationLib.errors import DeviceError

KIT = Path(__file__).resolve().parent.parent / "benchmarks" / "device"

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def phantom_arrays(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A 2 mm head-and-neck-sized phantom: HU, body, and organ labels (a bony column included)."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*(np.linspace(-1, 1, n) for n in (56, 64, 64)), indexing="ij")
    body = (x / 0.8) ** 2 + (y / 0.7) ** 2 < 1
    hu = np.where(body, 40.0, -1024.0) + rng.normal(0, 20, body.shape) * body
    labels = np.zeros(body.shape, np.uint8)
    organs = [((-0.35, 0.0, 0.2), 0.25, 70.0), ((0.35, 0.0, 0.2), 0.25, 90.0)]
    organs += [((0.0, -0.3, -0.3), 0.2, -80.0), ((0.0, 0.4, 0.0), 0.12, 700.0)]
    for label, (centre, radius, value) in enumerate(organs, start=1):
        inside = ((x - centre[0]) ** 2 + (y - centre[1]) ** 2 + (z - centre[2]) ** 2) < radius**2
        hu[inside & body] = value
        labels[inside & body] = label
    return hu.astype(np.float32), body, labels


def register_on(device: torch.device):
    """The MIND pipeline (every stage) on two shifted phantoms, through the GPU kit's adapter."""
    sys.path.insert(0, str(KIT))
    import stages

    images = []
    for seed, origin in ((0, (0.0, 0.0, 0.0)), (1, (8.0, -6.0, 4.0))):
        hu, body, labels = phantom_arrays(seed)
        images.append((stages.working_image(hu, body, (2.0,) * 3, origin, np.eye(3)), labels))
    (fixed, fixed_labels), (moving, moving_labels) = images
    run = stages.register_working(fixed, moving, stages.load_models("mind", device), device)
    dice = {
        stage: stages.mean_dice_after(fixed_labels, moving_labels, moving.grid, a, fixed.grid)
        for stage, a in run.after.items()
    }
    return run, dice


def test_auto_chooses_cuda_and_a_missing_gpu_index_is_refused():
    assert resolve_device("auto").type == "cuda"
    assert resolve_device("cuda:0") == torch.device("cuda:0")
    count = torch.cuda.device_count()
    with pytest.raises(DeviceError, match=f"only {count} CUDA device"):
        resolve_device(f"cuda:{count}")
    assert "GiB" in describe_device(torch.device("cuda"))


def test_registration_on_cuda_agrees_with_the_cpu():
    cpu_run, cpu_dice = register_on(torch.device("cpu"))
    cuda_run, cuda_dice = register_on(torch.device("cuda"))
    assert list(cuda_dice) == list(cpu_dice) == ["affine", "coarse", "deform", "instance"]
    for stage in cpu_dice:
        assert abs(cuda_dice[stage] - cpu_dice[stage]) <= 0.01, (stage, cpu_dice, cuda_dice)
    cpu_affine, cuda_affine = cpu_run.after["affine"].affine, cuda_run.after["affine"].affine
    np.testing.assert_allclose(cuda_affine[:3, :3], cpu_affine[:3, :3], atol=0.02)
    np.testing.assert_allclose(cuda_affine[:3, 3], cpu_affine[:3, 3], atol=1.0)
    # The shift between the phantoms is recovered on the GPU too (fixed -> moving, LPS mm).
    np.testing.assert_allclose(cuda_affine[:3, 3], [8.0, -6.0, 4.0], atol=2.0)
    final_cpu = cpu_run.after["instance"].field
    final_cuda = cuda_run.after["instance"].field.cpu()
    assert float((final_cuda - final_cpu).abs().mean()) < 0.5  # mm


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_mixed_precision_embeddings_match_float32(dtype):
    from SAMERegistrationLib.features.sam import default_weights
    from SAMERegistrationLib.features.sam_network import load_sam_checkpoint

    weights = default_weights()
    if weights is None:
        pytest.skip("no SAM model ships with this checkout")
    network = load_sam_checkpoint(weights, map_location="cuda")
    hu, _, _ = phantom_arrays(seed=0)
    scaled = (np.clip(hu, -1024, 3071) + 1024) * 255 / 4095 - 50
    x = torch.as_tensor(scaled, dtype=torch.float32, device="cuda")[None, None]
    seen = []
    network.backbone.conv1.conv.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    with torch.no_grad():
        local32, global32 = network(x)
        with torch.autocast("cuda", dtype=dtype):
            local_mixed, global_mixed = network(x)
    assert seen == [torch.float32, dtype]  # the convolutions did run in reduced precision
    for full, mixed in ((local32, local_mixed), (global32, global_mixed)):
        cosine = (full * mixed.float()).sum(dim=1)
        assert torch.isfinite(cosine).all()
        assert float(cosine.mean()) > 0.99


def test_out_of_memory_gives_the_documented_advice():
    device = torch.device("cuda")
    _, total = torch.cuda.mem_get_info(device)
    before = torch.cuda.memory_allocated(device)
    advice = re.escape(
        "The GPU ran out of memory while registering on a 2 mm working grid. Run on the CPU with "
        "--device cpu, or use a coarser working grid (for example --spacing 3)"
    )
    with pytest.raises(DeviceError, match=advice), memory_guard(device, 2.0):
        torch.empty(2 * total, dtype=torch.uint8, device=device)
    assert torch.cuda.memory_allocated(device) == before
