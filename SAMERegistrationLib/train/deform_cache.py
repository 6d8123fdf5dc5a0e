"""On-disk cache of pre-aligned training pairs for SAM-deform training.

Pre-aligning a pair (features, matching, affine and coarse stages) costs as much as a
registration, so it runs once per pair and is kept in ``cache/``: per scan, its working image and
(when the training needs them) its feature maps in float16; per pair, the affine and the coarse
field on its small grid. Every entry carries a key made of the file's path, size and modification
time and of every setting that shapes it, so a changed scan or setting is recomputed, never reused.
The network inputs are rebuilt from the cache with the registration's own ``build_inputs``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import spatial
from ..alignment import Alignment
from ..checkpoint_io import write_checkpoint
from ..config import RegistrationConfig
from ..deform_net.inputs import DeformInputs, body_window, build_inputs
from ..errors import RegistrationFailed
from ..features import make_extractor
from ..features.base import FeatureMaps
from ..grid import Grid
from ..image import check_ct, read_image
from ..working import WorkingImage

log = logging.getLogger(__name__)

CACHE_VERSION = 1


@dataclass
class TrainingPair:
    """Everything one training step needs, on the training device."""

    inputs: DeformInputs  # the network's inputs, as registration builds them
    affine: torch.Tensor  # 4x4 fixed -> moving
    dense: torch.Tensor  # the pre-alignment's displacement on the fixed working grid
    fixed_body: torch.Tensor  # (1, 1, D, H, W) bool
    moving_window: torch.Tensor  # (1, 1, ...) windowed moving image on its own working grid
    moving_body: torch.Tensor  # (1, 1, ...) float moving body mask on its own working grid
    moving_grid: Grid
    fixed_maps: FeatureMaps | None  # fixed embeddings, when the SAM loss needs them


def _digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _file_identity(path: Path) -> list:
    stat = path.stat()
    return [str(path.resolve()), stat.st_size, stat.st_mtime_ns]


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _load(path: Path) -> dict | None:
    """A cache entry, or None when it is missing or unreadable (then it is recomputed)."""
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a damaged cache entry is recomputed, whatever torch raises
        log.warning("Recomputing the unreadable cache entry %s (%s)", path, type(err).__name__)
        return None


class PairCache:
    """Pre-aligned pairs under ``folder``, computed on first use with ``config`` (resolved)."""

    def __init__(
        self,
        folder: Path,
        config: RegistrationConfig,
        sam_sha256: str | None,
        keep_features: bool,
        device: torch.device,
    ) -> None:
        self.folder = folder
        self.config = config
        self.keep_features = keep_features
        self.device = device
        self.setting = [CACHE_VERSION, config.features, sam_sha256, config.working_spacing_mm]
        self._extractor = None

    # --- keys and names ----------------------------------------------------------------------

    def _scan_entry(self, path: Path) -> tuple[Path, str]:
        key = _digest(_file_identity(path), self.setting, self.keep_features)
        return self.folder / "scans" / f"{_stem(path)}_{key[:16]}.pt", key

    def _pair_entry(self, index: int, fixed: Path, moving: Path) -> tuple[Path, str]:
        key = _digest(
            _file_identity(fixed), _file_identity(moving), self.setting, self.config.to_dict()
        )
        name = f"{index:05d}_{_stem(fixed)}__{_stem(moving)}.pt"
        return self.folder / "pairs" / name, key

    # --- preparation -------------------------------------------------------------------------

    def prepare(
        self,
        pairs: Sequence[tuple[Path, Path]],
        progress: Callable[[int, int], None] | None = None,
    ) -> list[int]:
        """Pre-align every pair not cached yet; return the indices of the usable pairs.

        A pair the pipeline refuses (``RegistrationFailed``: too little shared anatomy) is recorded
        as failed, logged and left out of training.
        """
        (self.folder / "scans").mkdir(parents=True, exist_ok=True)
        (self.folder / "pairs").mkdir(parents=True, exist_ok=True)
        usable = []
        for index, (fixed, moving) in enumerate(pairs):
            path, key = self._pair_entry(index, fixed, moving)
            entry = _load(path)
            if entry is None or entry.get("key") != key:
                entry = self._pre_align(fixed, moving, key)
                write_checkpoint(entry, path)
            if entry["status"] == "ok":
                usable.append(index)
            else:
                log.warning("Pair %s <- %s left out: %s", fixed.name, moving.name, entry["reason"])
            if progress is not None:
                progress(index + 1, len(pairs))
        return usable

    def _pre_align(self, fixed: Path, moving: Path, key: str) -> dict:
        from ..pipeline import pre_align  # the pipeline imports the stages; import it when needed

        if self._extractor is None:
            # Only the pre-alignment runs here: no instance optimisation, no fine descriptors.
            no_instance = self.config.with_overrides({"instance.enabled": False})
            self._extractor = make_extractor(no_instance, self.device)
        images = [
            check_ct(read_image(p, "training scan"), f"training scan {p}") for p in (fixed, moving)
        ]
        torch.manual_seed(self.config.seed)
        np.random.seed(self.config.seed)
        try:
            pre = pre_align(*images, self.config, self._extractor, self.device)
        except RegistrationFailed as err:
            return {"key": key, "status": "failed", "reason": str(err)}
        for path, image, maps in (
            (fixed, pre.fixed, pre.fixed_maps),
            (moving, pre.moving, pre.moving_maps),
        ):
            self._store_scan(path, image, maps)
        entry = {
            "key": key,
            "status": "ok",
            "fixed": str(fixed),
            "moving": str(moving),
            "affine": torch.as_tensor(pre.alignment.affine, dtype=torch.float64),
            "coarse": None if pre.coarse is None else pre.coarse[0].detach().cpu(),
            "coarse_grid": None if pre.coarse is None else pre.coarse[1].to_dict(),
        }
        return entry

    def _store_scan(self, path: Path, image: WorkingImage, maps: FeatureMaps) -> None:
        target, key = self._scan_entry(path)
        cached = _load(target)
        if cached is not None and cached.get("key") == key:
            return
        payload = {
            "key": key,
            "hu": torch.as_tensor(image.hu),
            "body": torch.as_tensor(image.body),
            "grid": image.grid.to_dict(),
        }
        if self.keep_features:
            payload.update(
                local=maps.local.detach().cpu().half(),
                global_=maps.global_.detach().cpu().half(),
                feature_grid=maps.grid.to_dict(),
                feature_body=torch.as_tensor(maps.body),
            )
        write_checkpoint(payload, target)

    # --- loading -----------------------------------------------------------------------------

    def _scan(self, path: Path) -> tuple[WorkingImage, FeatureMaps | None]:
        target, key = self._scan_entry(path)
        payload = _load(target)
        if payload is None or payload.get("key") != key:
            raise RegistrationFailed(
                f"The training cache lost {target}; delete {self.folder} and run again."
            )
        image = WorkingImage(
            payload["hu"].numpy(), payload["body"].numpy(), Grid.from_dict(payload["grid"])
        )
        maps = None
        if self.keep_features:
            maps = FeatureMaps(
                payload["local"].to(self.device, torch.float32),
                payload["global_"].to(self.device, torch.float32),
                Grid.from_dict(payload["feature_grid"]),
                payload["feature_body"].numpy(),
            )
        return image, maps

    def load(self, index: int, pair: tuple[Path, Path], correlation: bool) -> TrainingPair:
        """The cached pair ``index`` (prepared), rebuilt on the training device."""
        path, _ = self._pair_entry(index, *pair)
        entry = _load(path)
        if entry is None or entry.get("status") != "ok":
            raise RegistrationFailed(f"The training cache lost {path}; run again to rebuild it.")
        fixed, fixed_maps = self._scan(pair[0])
        moving, moving_maps = self._scan(pair[1])
        device = self.device
        dense = torch.zeros((1, 3, *fixed.grid.shape), device=device)
        if entry["coarse"] is not None:
            coarse_grid = Grid.from_dict(entry["coarse_grid"])
            dense = spatial.resample_field(entry["coarse"].to(device), coarse_grid, fixed.grid)
        affine = entry["affine"].numpy()
        alignment = Alignment(affine, dense, fixed.grid)
        if fixed_maps is None:  # no features cached: correlation and SAM loss are off
            inputs = build_inputs(fixed, moving, None, None, alignment, False)
        else:
            inputs = build_inputs(
                fixed, moving, fixed_maps, moving_maps, alignment, correlation, True
            )
        return TrainingPair(
            inputs=inputs,
            affine=torch.as_tensor(affine, dtype=torch.float32, device=device),
            dense=dense,
            fixed_body=torch.as_tensor(fixed.body, device=device)[None, None],
            moving_window=body_window(moving, device),
            moving_body=torch.as_tensor(moving.body, dtype=torch.float32, device=device)[
                None, None
            ],
            moving_grid=moving.grid,
            fixed_maps=fixed_maps,
        )
