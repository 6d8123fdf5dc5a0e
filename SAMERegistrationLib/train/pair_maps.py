"""Registration maps between pairs of training scans, cached for cross-patient SAM training.

``build_pair_maps`` registers seeded (fixed, moving) pairs of training scans with the registration
pipeline (MIND features, affine + coarse by default) and writes one file per pair into a cache
folder, atomically, so an interrupted build resumes where it stopped. The folder's
``pair_maps.json`` records every scan the build may use (path, size, spacing, SHA256) and the pairs
drawn: an evaluation can refuse overlap with it, and training refuses a cache built from other scans.

A pair file ``pair_NNNN.npz`` (numpy, no pickles) holds ``meta``, a JSON string: format, status
("done" or "refused" with the pipeline's reason), both scans' identities, the working grid, the
registration settings and seconds; and, when done, ``affine`` (4x4 float64, fixed -> moving LPS mm),
``dense`` ((3, D, H, W) float16 displacement (x, y, z) mm on the working grid) and ``similarity``
((D, H, W) float16 local normalised cross-correlation of the fixed and the warped moving scan on the
working grid: how far the map can be trusted at each point). The map is ``p -> A (p + u(p))``, as in
``RegistrationResult``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from ..errors import ConfigError, InputError, OutputError, RegistrationFailed
from ..grid import Grid
from ..image import read_image, resample_array
from ..shipped import file_sha256
from ..working import AIR_HU, window_intensity

log = logging.getLogger(__name__)

MANIFEST = "pair_maps.json"
MANIFEST_FORMAT = "same-sam-pair-maps"
ENTRY_FORMAT = "same-sam-pair-map"
#: The registration used to build maps: MIND features, affine + coarse (deform/instance optional).
DEFAULT_REGISTRATION: dict[str, Any] = {
    "features": "mind",
    "deform.enabled": False,
    "instance.enabled": False,
}
SIMILARITY_WINDOW_VOXELS = 5  # box of the local cross-correlation on the working grid
_GRID_TOLERANCE_MM = 1e-3

#: ``progress(pairs_done, pairs_total)``.
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class ScanIdentity:
    """What identifies a scan file: its path, header geometry and content hash."""

    path: str
    size_xyz: tuple[int, int, int]
    spacing: tuple[float, float, float]
    sha256: str

    @classmethod
    def of(cls, path: str | os.PathLike[str]) -> ScanIdentity:
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        reader.ReadImageInformation()
        return cls(
            str(Path(path).resolve()),
            tuple(int(n) for n in reader.GetSize()),  # type: ignore[arg-type]
            tuple(float(s) for s in reader.GetSpacing()),  # type: ignore[arg-type]
            file_sha256(path),
        )

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ScanIdentity:
        return cls(
            str(values["path"]),
            tuple(int(n) for n in values["size_xyz"]),  # type: ignore[arg-type]
            tuple(float(s) for s in values["spacing"]),  # type: ignore[arg-type]
            str(values["sha256"]),
        )

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))


@dataclass
class PairMap:
    """A cached map from a fixed to a moving training scan."""

    fixed: ScanIdentity
    moving: ScanIdentity
    affine: np.ndarray  # (4, 4) float64, fixed -> moving
    dense: np.ndarray  # (3, D, H, W) float16, (x, y, z) mm on grid
    similarity: np.ndarray  # (D, H, W) float16 local NCC on grid
    grid: Grid  # the fixed scan's axis-aligned working grid

    def map_points(self, points: np.ndarray) -> np.ndarray:
        """Fixed-space points (N, 3, LPS mm) to moving space: ``A (p + u(p))``."""
        points = np.asarray(points, dtype=np.float64).reshape(-1, 3)
        u = sample_on_grid(self.dense.astype(np.float32), self.grid, points).astype(np.float64)
        moved = points + u.T
        return moved @ self.affine[:3, :3].T + self.affine[:3, 3]

    def similarity_at(self, points: np.ndarray) -> np.ndarray:
        """The map's local similarity at fixed-space points (N, 3); -1 outside the grid."""
        points = np.asarray(points, dtype=np.float64).reshape(-1, 3)
        values = sample_on_grid(self.similarity[None].astype(np.float32), self.grid, points)[0]
        return np.where(self.grid.contains(points, margin_voxels=0.5), values, -1.0)


def sample_on_grid(volume: np.ndarray, grid: Grid, points: np.ndarray) -> np.ndarray:
    """Trilinear values of a (C, D, H, W) volume on ``grid`` at points (N, 3) -> (C, N);
    points outside take the nearest border value."""
    index = grid.physical_to_index(points)  # (x, y, z), continuous
    last = np.maximum(np.array(grid.size_xyz, dtype=np.float64) - 1, 1)
    norm = torch.from_numpy((index / last * 2.0 - 1.0).astype(np.float32)).reshape(1, -1, 1, 1, 3)
    out = F.grid_sample(
        torch.from_numpy(np.ascontiguousarray(volume))[None],
        norm,
        mode="bilinear",
        padding_mode="border",
        align_corners=True,
    )
    return out.reshape(volume.shape[0], -1).numpy()


def local_similarity(
    fixed_image: sitk.Image, moving_image: sitk.Image, pair_map: PairMap
) -> np.ndarray:
    """Local normalised cross-correlation (soft-tissue window) of the fixed scan and the moving
    scan pulled through the map, on the map's grid, float16 in [-1, 1]."""
    grid = pair_map.grid
    fixed = window_intensity(resample_array(fixed_image, grid, sitk.sitkLinear, AIR_HU))
    points = pair_map.map_points(grid.voxel_centres().reshape(-1, 3))
    moving_hu = sitk.GetArrayFromImage(moving_image).astype(np.float32)
    moving_grid = Grid.from_sitk(moving_image)
    warped = sample_on_grid(moving_hu[None], moving_grid, points)[0]
    warped = np.where(moving_grid.contains(points, margin_voxels=0.5), warped, AIR_HU)
    moving = window_intensity(warped.reshape(grid.shape))
    k = SIMILARITY_WINDOW_VOXELS

    def mean(x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool3d(x, k, stride=1, padding=k // 2, count_include_pad=False)

    a = torch.from_numpy(fixed)[None, None]
    b = torch.from_numpy(moving)[None, None]
    ma, mb = mean(a), mean(b)
    cov = mean(a * b) - ma * mb
    var = (mean(a * a) - ma**2).clamp_min(0) * (mean(b * b) - mb**2).clamp_min(0)
    ncc = cov / (var.sqrt() + 1e-3)
    return ncc[0, 0].clamp(-1, 1).numpy().astype(np.float16)


def register_pair(
    fixed: Path, moving: Path, registration: dict[str, Any]
) -> tuple[np.ndarray, np.ndarray, Grid]:
    """The one place that runs the registration pipeline: affine, dense field and working grid."""
    import SAMERegistrationLib

    overrides = {key.replace(".", "__"): value for key, value in registration.items()}
    result = SAMERegistrationLib.register(str(fixed), str(moving), **overrides)
    return np.asarray(result.affine, np.float64), np.asarray(result.dense), result.working_grid


# --- the cache on disk -------------------------------------------------------------------------


def entry_path(cache_dir: Path, index: int) -> Path:
    return cache_dir / f"pair_{index:04d}.npz"


def draw_pairs(count: int, scans: int, seed: int) -> list[tuple[int, int]]:
    """``count`` distinct ordered (fixed, moving) index pairs of different scans, seeded."""
    most = scans * (scans - 1)
    if count > most:
        raise ConfigError(f"{scans} scans make only {most} ordered pairs; ask for at most {most}.")
    rng = np.random.default_rng(seed)
    pairs: list[tuple[int, int]] = []
    while len(pairs) < count:
        fixed, moving = (int(i) for i in rng.choice(scans, 2, replace=False))
        if (fixed, moving) not in pairs:
            pairs.append((fixed, moving))
    return pairs


def _write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    partial = path.with_name(f"{path.stem}.{os.getpid()}.partial.npz")
    try:
        np.savez_compressed(partial, **arrays)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def _write_json(path: Path, values: dict[str, Any]) -> None:
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    partial.write_text(json.dumps(values, indent=1))
    os.replace(partial, path)


def write_entry(path: Path, meta: dict[str, Any], pair_map: PairMap | None) -> None:
    """One pair's file, atomically: the map when done, the reason alone when refused."""
    arrays: dict[str, np.ndarray] = {"meta": np.array(json.dumps(meta))}
    if pair_map is not None:
        arrays.update(
            affine=pair_map.affine.astype(np.float64),
            dense=pair_map.dense.astype(np.float16),
            similarity=pair_map.similarity.astype(np.float16),
        )
    _write_npz(path, arrays)


def read_entry(path: Path) -> tuple[dict[str, Any], PairMap | None]:
    """A pair file's metadata and map (None when refused); damaged files are refused by name."""
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data["meta"]))
            if meta.get("format") != ENTRY_FORMAT:
                raise ValueError(f"format {meta.get('format')!r}")
            if meta["status"] != "done":
                return meta, None
            arrays = {key: data[key] for key in ("affine", "dense", "similarity")}
            pair_map = PairMap(
                ScanIdentity.from_dict(meta["fixed"]),
                ScanIdentity.from_dict(meta["moving"]),
                arrays["affine"],
                arrays["dense"],
                arrays["similarity"],
                _grid_from_dict(meta["grid"]),
            )
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise InputError(
            f"The pair map {path} cannot be read ({type(err).__name__}: {err}); it is damaged or not "
            "a pair map. Delete it and run sam-pair-maps again to rebuild it."
        ) from err
    return meta, pair_map


def read_map(path: Path) -> PairMap:
    """The map of a registered pair's file; a refused pair's file is refused."""
    meta, pair_map = read_entry(path)
    if pair_map is None:
        raise InputError(f"{path} holds a pair the registration refused ({meta.get('reason')}).")
    return pair_map


def _grid_from_dict(values: dict[str, Any]) -> Grid:
    return Grid(
        tuple(values["size_xyz"][::-1]),
        tuple(values["spacing"]),
        tuple(values["origin"]),
        np.array(values["direction"]).reshape(3, 3),
    )


def build_pair_maps(
    scans: Sequence[Path],
    cache_dir: str | os.PathLike[str],
    pairs: int,
    seed: int = 0,
    registration: dict[str, Any] | None = None,
    progress: Progress | None = None,
) -> Path:
    """Register ``pairs`` seeded pairs of ``scans`` into ``cache_dir`` and return its manifest.

    Finished pair files are kept, so an interrupted build continues with the next pair; a cache
    built from other scans, another seed or another pipeline is refused. Pairs the pipeline
    refuses (``RegistrationFailed``) are recorded as refused and skipped by training.
    """
    cache_dir = Path(cache_dir)
    registration = dict(DEFAULT_REGISTRATION if registration is None else registration)
    if len(scans) < 2:
        raise InputError(f"Pair maps need at least 2 scans; found {len(scans)}.")
    identities = [ScanIdentity.of(path) for path in scans]
    drawn = draw_pairs(pairs, len(scans), seed)
    manifest_file = write_manifest(cache_dir, identities, drawn, seed, registration)
    for index, (fixed, moving) in enumerate(drawn):
        path = entry_path(cache_dir, index)
        if path.exists():
            read_entry(path)  # a damaged file is refused by name rather than silently redone
        else:
            _build_entry(path, identities[fixed], identities[moving], registration)
        if progress is not None:
            progress(index + 1, len(drawn))
    return manifest_file


def write_manifest(
    cache_dir: Path,
    identities: Sequence[ScanIdentity],
    pairs: Sequence[tuple[int, int]],
    seed: int,
    registration: dict[str, Any],
) -> Path:
    """Write (or, for a build being resumed, check) the cache's manifest."""
    manifest = {
        "format": MANIFEST_FORMAT,
        "version": 1,
        "seed": seed,
        "registration": registration,
        "scans": [identity.to_dict() for identity in identities],
        "pairs": [list(pair) for pair in pairs],
    }
    manifest_file = cache_dir / MANIFEST
    if manifest_file.exists():
        _check_same_build(read_manifest(manifest_file), manifest, manifest_file)
    elif cache_dir.exists() and any(cache_dir.iterdir()):
        raise OutputError(
            f"{cache_dir} is not empty and holds no {MANIFEST}. Choose an empty or new folder."
        )
    cache_dir.mkdir(parents=True, exist_ok=True)
    _write_json(manifest_file, manifest)
    return manifest_file


def _build_entry(
    path: Path, fixed: ScanIdentity, moving: ScanIdentity, registration: dict[str, Any]
) -> None:
    clock = time.perf_counter()
    meta: dict[str, Any] = {
        "format": ENTRY_FORMAT,
        "fixed": fixed.to_dict(),
        "moving": moving.to_dict(),
        "registration": registration,
    }
    try:
        affine, dense, grid = register_pair(Path(fixed.path), Path(moving.path), registration)
    except RegistrationFailed as err:
        log.warning("pair %s <- %s refused: %s", fixed.path, moving.path, err)
        meta.update(status="refused", reason=str(err), seconds=time.perf_counter() - clock)
        write_entry(path, meta, None)
        return
    pair_map = PairMap(fixed, moving, affine, dense.astype(np.float16), np.zeros(0), grid)
    pair_map.similarity = local_similarity(
        read_image(fixed.path, "fixed scan"), read_image(moving.path, "moving scan"), pair_map
    )
    meta.update(status="done", grid=grid.to_dict(), seconds=time.perf_counter() - clock)
    write_entry(path, meta, pair_map)
    log.info("pair %s <- %s: %.1f s", fixed.path, moving.path, meta["seconds"])


def read_manifest(path: Path) -> dict[str, Any]:
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        if manifest.get("format") != MANIFEST_FORMAT:
            raise ValueError(f"format {manifest.get('format')!r}")
        manifest["scans"] = [ScanIdentity.from_dict(s).to_dict() for s in manifest["scans"]]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise InputError(
            f"{path} is not a pair-map manifest ({type(err).__name__}: {err}). Give the folder "
            "written by sam-pair-maps."
        ) from err
    return manifest


def _check_same_build(stored: dict[str, Any], wanted: dict[str, Any], path: Path) -> None:
    changed = [k for k in ("seed", "registration", "scans", "pairs") if stored.get(k) != wanted[k]]
    if changed:
        raise OutputError(
            f"{path} belongs to a pair-map build with other {', '.join(changed)}. Resume it with "
            "the same scans, --pairs and --seed, or write the new build into another folder."
        )


def cache_scans(cache_dir: str | os.PathLike[str]) -> list[str]:
    """Resolved paths of every scan a pair-map cache may have used (to refuse evaluation overlap)."""
    manifest = read_manifest(Path(cache_dir) / MANIFEST)
    return [scan["path"] for scan in manifest["scans"]]


# --- checks before training --------------------------------------------------------------------


def load_pair_maps(cache_dir: str | os.PathLike[str], scans: Sequence[Path]) -> list[Path]:
    """Check a cache against the training scans, before any training; return its usable files.

    Refused, naming the file: a manifest listing scans that are not among ``scans`` or whose
    content changed since the build; an entry whose scans are not the manifest's, whose arrays do
    not fit its grid, or whose grid does not lie on its fixed scan.
    """
    cache_dir = Path(cache_dir)
    manifest_file = cache_dir / MANIFEST
    if not manifest_file.is_file():
        raise InputError(
            f"{cache_dir} holds no {MANIFEST}; build the cache with "
            "'same-register sam-pair-maps' first."
        )
    manifest = read_manifest(manifest_file)
    training = {str(Path(p).resolve()): Path(p) for p in scans}
    others = [s["path"] for s in manifest["scans"] if s["path"] not in training]
    if others:
        raise InputError(
            f"The pair-map cache {manifest_file} was built from other scans than the training scans "
            f"({len(others)} not among them, e.g. {others[0]}). Train on the scans the cache was "
            "built from, or build a cache from these scans."
        )
    identities = {s["path"]: ScanIdentity.from_dict(s) for s in manifest["scans"]}
    used = {p for pair in manifest["pairs"] for p in pair}
    for index in sorted(used):
        stored = ScanIdentity.from_dict(manifest["scans"][index])
        if ScanIdentity.of(stored.path) != stored:
            raise InputError(
                f"The pair-map cache {manifest_file} was built from a different version of "
                f"{stored.path} (size, spacing or content changed). Rebuild the cache."
            )
    usable = []
    for index in range(len(manifest["pairs"])):
        path = entry_path(cache_dir, index)
        if not path.exists():
            continue  # an unfinished build: the pairs done so far are usable
        meta, pair_map = read_entry(path)
        if pair_map is None:
            continue
        _check_entry(path, pair_map, identities)
        usable.append(path)
    if not usable:
        raise InputError(
            f"The pair-map cache {cache_dir} holds no registered pair. Build it (further) with "
            "'same-register sam-pair-maps'."
        )
    return usable


def _check_entry(path: Path, pair_map: PairMap, identities: dict[str, ScanIdentity]) -> None:
    for role, identity in (("fixed", pair_map.fixed), ("moving", pair_map.moving)):
        if identities.get(identity.path) != identity:
            raise InputError(
                f"The pair map {path} was made from a {role} scan {identity.path} that is not the "
                "one the cache lists. Delete it and run sam-pair-maps again."
            )
    grid = pair_map.grid
    problems = []
    if pair_map.affine.shape != (4, 4) or not np.all(np.isfinite(pair_map.affine)):
        problems.append(f"affine of shape {pair_map.affine.shape}")
    if pair_map.dense.shape != (3, *grid.shape):
        problems.append(f"field of shape {pair_map.dense.shape} on a grid of {grid.shape}")
    if pair_map.similarity.shape != grid.shape:
        problems.append(
            f"similarity of shape {pair_map.similarity.shape} on a grid of {grid.shape}"
        )
    if not grid.is_axis_aligned:
        problems.append("a working grid that is not axis-aligned")
    fixed = _header_grid(pair_map.fixed.path)
    corners = fixed.corners()
    slack = max(grid.spacing) + max(fixed.spacing) + _GRID_TOLERANCE_MM
    lo, hi = corners.min(axis=0) - slack, corners.max(axis=0) + slack
    ours = grid.corners()
    if np.any(ours < lo) or np.any(ours > hi):
        problems.append(
            f"a working grid ({grid.describe()}) outside its fixed scan ({fixed.describe()})"
        )
    if problems:
        raise InputError(
            f"The pair map {path} does not fit its scans: {'; '.join(problems)}. Delete it and run "
            "sam-pair-maps again."
        )


def _header_grid(path: str) -> Grid:
    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    reader.ReadImageInformation()
    size = reader.GetSize()
    return Grid(
        (size[2], size[1], size[0]),
        reader.GetSpacing(),
        reader.GetOrigin(),
        np.array(reader.GetDirection()).reshape(3, 3),
    )
