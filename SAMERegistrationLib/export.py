"""Writing a registration to a folder that 3D Slicer, SimpleITK and ITK-SNAP open unchanged.

Everything is first written to a hidden staging folder beside the output folder and moved in only
when all files are complete, so a failure never leaves partial results, and existing files are
never replaced unless the caller allows it.
"""

from __future__ import annotations

import csv
import json
import platform
import shutil
import tempfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from .errors import OutputError
from .matching import Matches
from .result import RegistrationResult


def output_names(config_export) -> dict[str, str]:
    """The files a registration writes, by role."""
    return {
        "affine": "affine.tfm",
        "transform": f"transform.{config_export.field_format}",
        "warped": f"warped_moving.{config_export.image_format}",
        "warped_labels": f"warped_moving_labels.{config_export.image_format}",
        "matches_csv": "matches.csv",
        "matches_fixed": "matches_fixed.mrk.json",
        "matches_moving": "matches_moving.mrk.json",
        "report": "report.json",
    }


def check_output_folder(folder: str | Path, names: list[str], overwrite: bool = False) -> Path:
    """Fail early when the folder cannot take the outputs without losing existing data."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"The output path '{folder}' is a file, not a folder. Choose a folder.")
    if folder.is_dir() and not overwrite:
        clashes = [n for n in names if (folder / n).exists()]
        if clashes:
            raise OutputError(
                f"The output folder '{folder}' already holds {', '.join(clashes)}. Choose another "
                "folder, or pass --overwrite to replace these files."
            )
    parent = folder.parent if not folder.exists() else folder
    while not parent.exists():
        parent = parent.parent
    if not _writable(parent):
        raise OutputError(f"The output folder '{folder}' cannot be written (no permission).")
    return folder


def _writable(folder: Path) -> bool:
    try:
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False


def write_outputs(
    result: RegistrationResult,
    folder: str | Path,
    moving: sitk.Image,
    moving_labels: sitk.Image | None = None,
    inputs: dict | None = None,
    overwrite: bool = False,
) -> dict[str, Path]:
    """Write transforms, warped images, correspondences and the report; return the paths."""
    names = output_names(result.config.export)
    if moving_labels is None:
        names.pop("warped_labels")
    folder = check_output_folder(folder, list(names.values()), overwrite)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.partial-", dir=folder.parent))
    try:
        sitk.WriteTransform(result.affine_transform(), str(staging / names["affine"]))
        _write_field(result, staging / names["transform"])
        sitk.WriteImage(result.warp(moving), str(staging / names["warped"]), useCompression=True)
        if moving_labels is not None:
            warped = result.warped_labels or result.warp(moving_labels, labels=True)
            sitk.WriteImage(warped, str(staging / names["warped_labels"]), useCompression=True)
        write_matches_csv(result.matches, staging / names["matches_csv"])
        write_markups(result.matches, staging / names["matches_fixed"], "fixed")
        write_markups(result.matches, staging / names["matches_moving"], "moving")
        report = build_report(result, inputs or {}, names)
        (staging / names["report"]).write_text(json.dumps(report, indent=2, default=_json_default))
        folder.mkdir(parents=True, exist_ok=True)
        for name in names.values():
            (staging / name).replace(folder / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {role: folder / name for role, name in names.items()}


def _write_field(result: RegistrationResult, path: Path) -> None:
    if path.suffix == ".h5":
        sitk.WriteTransform(result.transform(), str(path))
    else:
        field = sitk.Cast(result.displacement_image(), sitk.sitkVectorFloat32)
        sitk.WriteImage(field, str(path), useCompression=True)


def write_matches_csv(matches: Matches, path: Path) -> None:
    """One row per correspondence: LPS mm positions in both images and their similarity."""
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            ["id", "fixed_x_lps", "fixed_y_lps", "fixed_z_lps"]
            + ["moving_x_lps", "moving_y_lps", "moving_z_lps", "similarity"]
        )
        for i, (f, m, s) in enumerate(zip(matches.fixed, matches.moving, matches.similarity)):
            writer.writerow([i + 1, *np.round(f, 3), *np.round(m, 3), round(float(s), 4)])


def write_markups(matches: Matches, path: Path, side: str) -> None:
    """A Slicer point list (.mrk.json, LPS) of one side of the matches, labelled F-i / M-i."""
    points = matches.fixed if side == "fixed" else matches.moving
    prefix = "F" if side == "fixed" else "M"
    control_points = [
        {
            "id": str(i + 1),
            "label": f"{prefix}-{i + 1}",
            "description": f"similarity {float(s):.3f}",
            "position": [round(float(v), 4) for v in p],
            "orientation": [-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0],
            "selected": True,
            "locked": True,
            "visibility": True,
            "positionStatus": "defined",
        }
        for i, (p, s) in enumerate(zip(points, matches.similarity))
    ]
    document = {
        "@schema": "https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/"
        "Markups/Resources/Schema/markups-schema-v1.0.3.json#",
        "markups": [
            {
                "type": "Fiducial",
                "coordinateSystem": "LPS",
                "coordinateUnits": "mm",
                "locked": True,
                "labelFormat": f"{prefix}-%d",
                "controlPoints": control_points,
                "display": {"glyphScale": 1.5, "textScale": 1.5},
            }
        ],
    }
    path.write_text(json.dumps(document, indent=1))


def build_report(result: RegistrationResult, inputs: dict, names: dict[str, str]) -> dict:
    seconds = sum(float(s.get("seconds", 0.0)) for s in result.stages.values())
    return {
        "software": software_versions(),
        "device": result.device,
        "features": result.features,
        "inputs": inputs,
        "outputs": names,
        "conventions": {
            "space": "LPS mm",
            "transform_direction": "fixed -> moving (resampling direction, as ITK and Slicer)",
            "composition": "p -> A (p + u(p)); the transform file holds the whole map",
        },
        "total_seconds": round(seconds, 3),
        "stages": result.stages,
        "warnings": result.warnings,
        "matches": result.matches.summary(),
        "metrics": result.metrics,
        "affine_matrix": result.affine.tolist(),
        "config": result.config.to_dict(),
    }


def software_versions() -> dict[str, str]:
    from . import __version__

    return {
        "SAMERegistrationLib": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "SimpleITK": sitk.Version_VersionString(),
        "platform": platform.platform(),
    }


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")
