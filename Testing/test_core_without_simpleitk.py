"""The core (features, matching, stages, spatial, grid, networks, config, alignment) runs without
SimpleITK: a small registration of working-grid arrays built with numpy goes through the stage loop
in a process where importing SimpleITK fails."""

import json
import os
import subprocess
import sys
from pathlib import Path

from SAMERegistrationLib.config import InstanceConfig

REPO = Path(__file__).resolve().parent.parent

SCRIPT = r"""
import json, sys
sys.modules["SimpleITK"] = None  # any import of SimpleITK now raises ImportError

import numpy as np
import torch

from SAMERegistrationLib import alignment, config, grid, matching, spatial, working
from SAMERegistrationLib.alignment import Alignment
from SAMERegistrationLib.config import RegistrationConfig
from SAMERegistrationLib.deform_net import checkpoint, field, inputs, network
from SAMERegistrationLib.features import make_extractor
from SAMERegistrationLib.features import sam, sam_network
from SAMERegistrationLib.grid import Grid
from SAMERegistrationLib.matching import find_matches
from SAMERegistrationLib.stages import StageContext, initial
from SAMERegistrationLib.stages.loop import run_stages
from SAMERegistrationLib.working import WorkingImage

torch.manual_seed(0)
rng = np.random.default_rng(0)
shape = (40, 44, 48)  # (z, y, x) on a 2 mm working grid
z, y, x = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij")
body = (x / 0.8) ** 2 + (y / 0.7) ** 2 + (z / 0.9) ** 2 < 1
hu = np.where(body, 40.0, -1000.0)
for cx, cy, cz, r, v in [(-0.3, 0.1, 0.2, 0.25, 200.0), (0.35, -0.2, -0.1, 0.2, -300.0),
                         (0.0, 0.4, -0.4, 0.15, 600.0), (0.1, -0.35, 0.45, 0.18, 120.0)]:
    hu[((x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2 < r * r) & body] = v
noise = torch.as_tensor(rng.normal(0, 1, shape), dtype=torch.float32)[None, None]
texture = torch.nn.functional.avg_pool3d(noise, 5, stride=1, padding=2)[0, 0].numpy()
hu = (hu + np.where(body, 60.0 * texture / texture.std(), 0.0)).astype(np.float32)
fixed_grid = Grid(shape, (2.0, 2.0, 2.0), (0.0, 0.0, 0.0))
shift = np.array([6.0, -4.0, 8.0])  # mm: the moving scan is the fixed one, placed elsewhere
moving_grid = Grid(shape, (2.0, 2.0, 2.0), tuple(shift))
fixed = WorkingImage(hu, body, fixed_grid)
moving = WorkingImage(hu.copy(), body.copy(), moving_grid)

cfg = RegistrationConfig(features="mind", device="cpu").with_overrides(
    {"coarse.iterations": 20, "instance.iterations": 5, "deform.enabled": False}
).resolved_for("mind")
extractor = make_extractor(cfg, torch.device("cpu"))
fixed_maps, moving_maps = extractor.extract(fixed), extractor.extract(moving)
context = StageContext(fixed=fixed, moving=moving, device="cpu")
start = Alignment.identity(fixed_grid)
aligned, info = initial.run(fixed_maps, moving_maps, start, cfg, context)
context.matches = find_matches(fixed_maps, moving_maps, cfg.matching, aligned.affine,
                               cfg.matching.search_radius_mm)
stages = {}
result = run_stages(("affine", "coarse", "deform", "instance"), fixed_maps, moving_maps,
                    aligned, cfg, context, stages)
points = fixed_grid.index_to_physical(np.argwhere(body[::4, ::4, ::4])[:, ::-1] * 4.0)
error = np.linalg.norm(result.map_points(points) - (points + shift), axis=1)
print(json.dumps({
    "simpleitk_loaded": any(m.startswith("SimpleITK") and sys.modules[m] is not None
                            for m in sys.modules),
    "status": {k: v["status"] for k, v in stages.items()},
    "mean_error_mm": float(error.mean()),
    "instance_gain": stages["instance"]["similarity_after"] - stages["instance"]["similarity_before"],
    "initial_translation": info["translation_mm"],
}))
"""


def test_core_registers_working_grid_arrays_without_simpleitk() -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=600
    )
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["simpleitk_loaded"] is False
    assert report["status"] == {
        "affine": "done",
        # The affine finds the exact shift of this copy: no field gains enough to be kept.
        "coarse": "rejected",
        "deform": "skipped",
        "instance": "rejected",
    }
    assert report["instance_gain"] < InstanceConfig().min_gain, report
    # The moving scan is the fixed one shifted by (6, -4, 8) mm: the map must find that shift.
    assert report["mean_error_mm"] < 1.0, report
