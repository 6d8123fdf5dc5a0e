"""Writing a registration to a folder that 3D Slicer, SimpleITK and ITK-SNAP open unchanged.

Everything is first written to a hidden staging folder inside the output folder and moved in only
when all files are complete (``output_folder``), so a failure never leaves partial results, and
existing files are never replaced unless the caller allows it.
"""

from __future__ import annotations

import csv
import json
import platform
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from .feature_export import FEATURE_MAPS_NAME, write_feature_maps
from .matching import Matches
from .output_folder import claim_output_folder
from .result import RegistrationResult


def output_names(config_export) -> dict[str, str]:
    """The files a registration writes, by role."""
    return {
        "affine": "affine.tfm",
        "transform": f"transform.{config_export.field_format}",
        "deformable": f"deformable.{config_export.field_format}",
        "warped": f"warped_moving.{config_export.image_format}",
        "warped_labels": f"warped_moving_labels.{config_export.image_format}",
        "matches_csv": "matches.csv",
        "matches_fixed": "matches_fixed.mrk.json",
        "matches_moving": "matches_moving.mrk.json",
        "report": "report.json",
    }


def write_outputs(
    result: RegistrationResult,
    folder: str | Path,
    moving: sitk.Image,
    moving_labels: sitk.Image | None = None,
    inputs: dict | None = None,
    overwrite: bool = False,
    feature_maps: bool = False,
) -> dict[str, Path]:
    """Write transforms, warped images, correspondences and the report; return the paths.

    ``feature_maps`` also writes the descriptors of both images (feature_maps.npz), which the
    Slicer module's match search reads without PyTorch.
    """
    names = output_names(result.config.export)
    if moving_labels is None:
        names.pop("warped_labels")
    if feature_maps:
        names["feature_maps"] = FEATURE_MAPS_NAME
    with claim_output_folder(folder, list(names.values()), overwrite) as claim:
        staging = claim.staging
        sitk.WriteTransform(result.affine_transform(), str(staging / names["affine"]))
        _write_whole_map(result, staging / names["transform"])
        _write_deformable(result, staging / names["deformable"])
        if feature_maps:
            write_feature_maps(result, staging / names["feature_maps"])
        sitk.WriteImage(result.warp(moving), str(staging / names["warped"]), useCompression=True)
        if moving_labels is not None:
            warped = result.warped_labels or result.warp(moving_labels, labels=True)
            sitk.WriteImage(warped, str(staging / names["warped_labels"]), useCompression=True)
        write_matches_csv(result.matches, staging / names["matches_csv"])
        write_markups(result.matches, staging / names["matches_fixed"], "fixed")
        write_markups(result.matches, staging / names["matches_moving"], "moving")
        report = build_report(result, inputs or {}, names)
        (staging / names["report"]).write_text(json.dumps(report, indent=2, default=_json_default))
        claim.commit(list(names.values()), report=names["report"])
    return {role: Path(folder) / name for role, name in names.items()}


def _write_whole_map(result: RegistrationResult, path: Path) -> None:
    """The whole map ``p -> A(p + u(p))`` as a displacement on the full fixed image grid."""
    dtype = np.dtype(result.config.export.field_precision)
    if path.suffix == ".h5":
        transform = result.alignment.sitk_transform(result.fixed_grid, dtype)
        sitk.WriteTransform(transform, str(path))
    else:
        field = result.alignment.displacement_image(result.fixed_grid, dtype=dtype)
        sitk.WriteImage(field, str(path), useCompression=True)


def _write_deformable(result: RegistrationResult, path: Path) -> None:
    """The deformable part u alone, float32 on the full fixed image grid: the whole map is
    ``affine.tfm`` applied after ``id + u``."""
    field = result.alignment.displacement_image(result.fixed_grid, True, np.float32)
    if path.suffix == ".h5":
        field = sitk.Cast(
            field, sitk.sitkVectorFloat64
        )  # ITK's displacement transform holds doubles
        sitk.WriteTransform(sitk.DisplacementFieldTransform(field), str(path))
    else:
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
            "composition": "p -> A (p + u(p)); the transform file holds the whole map, the "
            "affine file A and the deformable file u (on the fixed image grid)",
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
