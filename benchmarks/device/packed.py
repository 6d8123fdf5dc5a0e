"""The packed data the GPU kit carries: numpy arrays only, so the device side needs no SimpleITK.

Layout of the data folder (``pack.py`` writes it, everything else only reads it):

- ``pairs.json``: ``{"spacing_mm", "seed", "pairs": [{"fixed", "moving"}], "cpu": {...}}``, with the
  CPU result of every pair and variant (``bench.run_variant`` on the CPU, on these same arrays);
- ``images/<name>.npz``: one CT on its working grid: ``sam_u8`` (z, y, x) uint8, the SAM input
  intensity + 50 (HU clipped to [-1024, 3071] in steps of 16 HU; 0 outside the body),
  ``body_bits`` (the body mask, ``np.packbits`` of its ravel), ``labels`` (z, y, x) uint8 organ
  labels resampled nearest onto the grid, and the grid as plain numbers: ``shape`` (z, y, x),
  ``spacing`` and ``origin`` (x, y, z, LPS mm) and ``direction`` (3x3, row-major);
- ``train.npz``: the SAM training volumes on their own grids, ``<name>`` (z, y, x) uint8 at the
  same intensity scale, with ``train.json`` listing per volume ``name``, ``spacing``, ``origin``
  (x, y, z), and the body's bounding box ``box_lo_mm`` / ``box_hi_mm`` (x, y, z, LPS mm). Their
  grids are axis-aligned with identity direction (OpenKBP and POPI are);
- ``maps/<fixed>__<moving>.npz`` (optional, ``pack.py --pair-maps``): a registration map between two
  training volumes, fixed -> moving LPS mm, ``p -> affine (p + field(p))`` (the library's
  convention): ``affine`` (4 x 4 float64), ``field`` (3, d, h, w) float16 displacement (x, y, z) mm
  on an identity-direction grid of ``field_origin`` and ``field_spacing`` (x, y, z) covering the
  map's working grid, ``valid_lo_mm`` / ``valid_hi_mm`` (x, y, z) the box where the map is defined,
  and ``confidence`` (d, h, w) uint8, the map's local similarity clipped to [0, 1] in 1/255 steps.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

PAIRS_FILE = "pairs.json"
IMAGES_DIR = "images"
TRAIN_ARRAYS = "train.npz"
TRAIN_INDEX = "train.json"
MAPS_DIR = "maps"
SAM_OFFSET = 50.0  # SAM's intensity scale is [-50, 205]; stored shifted into uint8
HU_PER_STEP = 4095.0 / 255.0  # one SAM intensity unit in HU


def hu_to_u8(hu: np.ndarray, body: np.ndarray | None = None) -> np.ndarray:
    """HU -> SAM intensity + 50 as uint8 (0 outside ``body`` when given)."""
    scaled = (np.clip(hu, -1024.0, 3071.0) + 1024.0) / HU_PER_STEP
    if body is not None:
        scaled = np.where(body, scaled, 0.0)
    return np.clip(np.round(scaled), 0, 255).astype(np.uint8)


def u8_to_hu(values: np.ndarray) -> np.ndarray:
    """The inverse of ``hu_to_u8`` up to its 16 HU steps: float32 HU."""
    return (values.astype(np.float32) * np.float32(HU_PER_STEP) - np.float32(1024.0)).astype(
        np.float32
    )


@dataclass
class PackedImage:
    """One working image as stored: arrays and its grid as numbers."""

    name: str
    hu: np.ndarray  # float32 (z, y, x), from the stored uint8
    body: np.ndarray  # bool (z, y, x)
    labels: np.ndarray  # uint8 (z, y, x)
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: np.ndarray  # 3x3


def write_image(
    folder: Path,
    name: str,
    hu: np.ndarray,
    body: np.ndarray,
    labels: np.ndarray,
    spacing,
    origin,
    direction,
) -> Path:
    path = folder / IMAGES_DIR / f"{name}.npz"
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        path,
        sam_u8=hu_to_u8(hu, body),
        body_bits=np.packbits(body.ravel()),
        labels=labels.astype(np.uint8),
        shape=np.array(hu.shape),
        spacing=np.array(spacing, dtype=np.float64),
        origin=np.array(origin, dtype=np.float64),
        direction=np.asarray(direction, dtype=np.float64).reshape(3, 3),
    )
    return path


def read_image(folder: Path, name: str) -> PackedImage:
    with np.load(folder / IMAGES_DIR / f"{name}.npz") as data:
        shape = tuple(int(n) for n in data["shape"])
        body = np.unpackbits(data["body_bits"], count=int(np.prod(shape))).reshape(shape)
        return PackedImage(
            name=name,
            hu=u8_to_hu(data["sam_u8"]),
            body=body.astype(bool),
            labels=data["labels"],
            spacing=tuple(float(s) for s in data["spacing"]),
            origin=tuple(float(o) for o in data["origin"]),
            direction=data["direction"].copy(),
        )


def read_pairs(folder: Path) -> dict:
    path = folder / PAIRS_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"No packed pairs in {folder} ({PAIRS_FILE} missing). Run "
            "'python benchmarks/device/pack.py' first, or pass --data FOLDER."
        )
    return json.loads(path.read_text())


def write_pairs(folder: Path, document: dict) -> None:
    (folder / PAIRS_FILE).write_text(json.dumps(document, indent=1))


@dataclass
class TrainVolume:
    """One SAM training volume: uint8 SAM intensity + 50, its grid and its body box."""

    name: str
    values: np.ndarray  # uint8 (z, y, x)
    spacing: np.ndarray  # (x, y, z) mm
    origin: np.ndarray  # (x, y, z) LPS mm
    box_lo_mm: np.ndarray  # (x, y, z)
    box_hi_mm: np.ndarray


def write_training(folder: Path, volumes: list[TrainVolume]) -> None:
    np.savez_compressed(folder / TRAIN_ARRAYS, **{v.name: v.values for v in volumes})
    index = [
        {
            "name": v.name,
            "spacing": [float(s) for s in v.spacing],
            "origin": [float(o) for o in v.origin],
            "box_lo_mm": [float(b) for b in v.box_lo_mm],
            "box_hi_mm": [float(b) for b in v.box_hi_mm],
        }
        for v in volumes
    ]
    (folder / TRAIN_INDEX).write_text(json.dumps(index, indent=1))


def read_training(folder: Path) -> list[TrainVolume]:
    path = folder / TRAIN_INDEX
    if not path.is_file():
        raise FileNotFoundError(
            f"No packed training volumes in {folder} ({TRAIN_INDEX} missing). Run "
            "'python benchmarks/device/pack.py' first, or pass --data FOLDER."
        )
    index = json.loads(path.read_text())
    with np.load(folder / TRAIN_ARRAYS) as arrays:
        return [
            TrainVolume(
                name=item["name"],
                values=arrays[item["name"]],
                spacing=np.array(item["spacing"]),
                origin=np.array(item["origin"]),
                box_lo_mm=np.array(item["box_lo_mm"]),
                box_hi_mm=np.array(item["box_hi_mm"]),
            )
            for item in index
        ]


@dataclass
class PackedMap:
    """A registration map between two packed training volumes (see the module docstring)."""

    fixed: str
    moving: str
    affine: np.ndarray  # (4, 4) float64, fixed -> moving
    field: np.ndarray  # (3, d, h, w) float16, (x, y, z) mm
    field_origin: np.ndarray  # (x, y, z) mm, the centre of field voxel (0, 0, 0)
    field_spacing: np.ndarray  # (x, y, z) mm
    valid_lo_mm: np.ndarray  # (x, y, z)
    valid_hi_mm: np.ndarray
    confidence: np.ndarray  # (d, h, w) uint8, similarity in [0, 1] * 255


def map_path(folder: Path, fixed: str, moving: str) -> Path:
    return folder / MAPS_DIR / f"{fixed}__{moving}.npz"


def write_pair_map(folder: Path, pair_map: PackedMap) -> Path:
    path = map_path(folder, pair_map.fixed, pair_map.moving)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.stem}.partial.npz")
    np.savez_compressed(
        partial,
        affine=pair_map.affine.astype(np.float64),
        field=pair_map.field.astype(np.float16),
        field_origin=np.asarray(pair_map.field_origin, np.float64),
        field_spacing=np.asarray(pair_map.field_spacing, np.float64),
        valid_lo_mm=np.asarray(pair_map.valid_lo_mm, np.float64),
        valid_hi_mm=np.asarray(pair_map.valid_hi_mm, np.float64),
        confidence=pair_map.confidence.astype(np.uint8),
    )
    partial.replace(path)
    return path


def read_pair_maps(folder: Path) -> list[PackedMap]:
    """Every packed map of ``folder`` (none when it holds no ``maps/``), in name order."""
    maps = []
    for path in sorted((folder / MAPS_DIR).glob("*__*.npz")):
        if path.name.endswith(".partial.npz"):
            continue  # a write that was stopped
        fixed, _, moving = path.stem.partition("__")
        with np.load(path) as data:
            maps.append(PackedMap(fixed, moving, **{key: data[key] for key in data.files}))
    return maps


def folder_size_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20
