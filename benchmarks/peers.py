"""SAME side by side with ConvexAdam, NiftyReg, elastix, ANTs and SimpleITK on seeded OpenKBP
validation pairs.

    python benchmarks/peers.py                 # the full run: 20 pairs, every method
    python benchmarks/peers.py --pairs 5       # the first 5 pairs of the same pairing
    python benchmarks/peers.py --methods niftyreg_f3d,convexadam
    python benchmarks/peers.py --quick         # smoke check: 1 pair, the cheap methods, few iterations

Every method is a wrapper ``register_<method>(fixed, moving, quick) -> sitk.Transform`` whose
transform maps fixed-space points to moving-space points (LPS mm, ITK's resampling direction).
Every peer starts from the initialisation its own documentation recommends (named at each
wrapper). All methods are scored by the same code: the moving label map resampled (nearest
neighbour) onto the fixed grid through the transform, Dice per organ present in both images, and
the folding % of the transform's dense displacement on the fixed grid, inside the fixed body.
Each registration runs in a fresh child process (this script in worker mode), which reports its
wall time and peak RSS. Each (method, pair) result is kept in ``<output-dir>/peers-cache/``, so
an interrupted run, started again with the same command, continues where it stopped.
Results: ``benchmarks/results/peers-<time>.{json,md}`` and two PNG plots. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from pathlib import Path

import _common as common
import numpy as np
import SimpleITK as sitk

HU_MIN, HU_MAX = -1024.0, 3071.0
INSTALL_HINT = "install the benchmark extra: pip install -e '.[bench]'"
NO_SAM = "no SAM weights"
NO_DEFORM = (
    "the shipped SAM-deform network was trained on other features; pass --deform-weights "
    "with weights for these features to run this row"
)
CACHE = "peers-cache"

Wrapper = Callable[[sitk.Image, sitk.Image, bool], sitk.Transform]


# --------------------------------------------------------------------------------------------
# Shared conversions
# --------------------------------------------------------------------------------------------


def peer_intensity(image: sitk.Image) -> sitk.Image:
    """CT as float32 HU clipped to [-1024, 3071] and shifted to >= 0.

    Mutual information and correlation ignore the shift; intensity-weighted initialisers (centre
    of mass, image moments) need non-negative "mass", else the air pulls the centre away.
    """
    clipped = sitk.Clamp(sitk.Cast(image, sitk.sitkFloat32), sitk.sitkFloat32, HU_MIN, HU_MAX)
    return clipped - HU_MIN


def displacement_transform(
    displacement_zyx3: np.ndarray, reference: sitk.Image
) -> sitk.DisplacementFieldTransform:
    """A (z, y, x, 3) LPS-mm displacement on ``reference``'s grid as a SimpleITK transform."""
    field = sitk.GetImageFromArray(np.asarray(displacement_zyx3, dtype=np.float64), isVector=True)
    if field.GetSize() != reference.GetSize():
        raise ValueError(
            f"displacement grid {field.GetSize()} differs from the fixed grid {reference.GetSize()}"
        )
    field.CopyInformation(reference)
    return sitk.DisplacementFieldTransform(field)


def dense_displacement(transform: sitk.Transform, reference: sitk.Image) -> np.ndarray:
    """The transform's displacement p -> T(p) - p at every voxel of ``reference``: (z, y, x, 3)."""
    field = sitk.TransformToDisplacementField(
        transform,
        sitk.sitkVectorFloat64,
        reference.GetSize(),
        reference.GetOrigin(),
        reference.GetSpacing(),
        reference.GetDirection(),
    )
    return sitk.GetArrayFromImage(field)


# --------------------------------------------------------------------------------------------
# Scoring, the same for every method
# --------------------------------------------------------------------------------------------


def warp_labels(
    moving_labels: sitk.Image, fixed_reference: sitk.Image, transform: sitk.Transform
) -> sitk.Image:
    """The moving label map on the fixed grid (nearest neighbour, 0 outside)."""
    return sitk.Resample(
        moving_labels,
        fixed_reference,
        transform,
        sitk.sitkNearestNeighbor,
        0,
        moving_labels.GetPixelID(),
    )


def label_dice(
    fixed_labels: sitk.Image, moving_labels: sitk.Image, transform: sitk.Transform
) -> dict[int, float]:
    """Dice of each organ present in both label maps, after warping the moving one."""
    from SAMERegistrationLib.evaluate import dice_per_label

    reference = sitk.GetArrayFromImage(fixed_labels)
    present = set(np.unique(reference)) & set(np.unique(sitk.GetArrayViewFromImage(moving_labels)))
    warped = sitk.GetArrayFromImage(warp_labels(moving_labels, fixed_labels, transform))
    return dice_per_label(reference, warped, sorted(int(v) for v in present - {0}))


def folding_percent_of(
    transform: sitk.Transform, reference: sitk.Image, mask: np.ndarray | None = None
) -> float:
    """% of ``reference`` voxels (inside ``mask``) where the transform folds (det J <= 0).

    The transform is sampled as a dense displacement on the reference grid, and its Jacobian is
    taken by the library's own finite differences (spatial.jacobian_determinant), for affine and
    deformable methods alike.
    """
    import torch

    from SAMERegistrationLib import spatial
    from SAMERegistrationLib.grid import Grid

    grid = Grid.from_sitk(reference)
    if not grid.is_axis_aligned:
        raise ValueError(
            "folding is computed on axis-aligned fixed grids only (identity direction); "
            "resample the fixed image to an identity direction first"
        )
    field = torch.from_numpy(dense_displacement(transform, reference)).permute(3, 0, 1, 2)[None]
    return spatial.folding_percent(field, grid, mask)


def fixed_body(fixed: sitk.Image) -> np.ndarray:
    """The fixed patient body (the library's definition), where folding is counted."""
    from SAMERegistrationLib.image import body_mask

    return body_mask(sitk.GetArrayFromImage(fixed).astype(np.float32))


def score(
    transform: sitk.Transform,
    fixed: sitk.Image,
    fixed_labels: sitk.Image,
    moving_labels: sitk.Image,
) -> dict:
    from SAMERegistrationLib.evaluate import mean_dice

    dice = label_dice(fixed_labels, moving_labels, transform)
    return {
        "dice": {str(k): v for k, v in dice.items()},
        "mean_dice": mean_dice(dice),
        "folding_percent": folding_percent_of(transform, fixed, fixed_body(fixed)),
    }


# --------------------------------------------------------------------------------------------
# Peer wrappers: (fixed, moving, quick) -> transform from fixed to moving space
# --------------------------------------------------------------------------------------------


def register_unregistered(fixed: sitk.Image, moving: sitk.Image, quick: bool = False):
    """The identity in physical space: the scores before registration."""
    return sitk.Transform(3, sitk.sitkIdentity)


def register_sitk_affine(
    fixed: sitk.Image, moving: sitk.Image, quick: bool = False
) -> sitk.Transform:
    """A textbook SimpleITK affine: Mattes MI, regular-step gradient descent, 3-level pyramid."""
    f, m = peer_intensity(fixed), peer_intensity(moving)
    # The scans start far apart (origins at the first voxel): start from the centres of mass.
    start = sitk.CenteredTransformInitializer(
        f, m, sitk.AffineTransform(3), sitk.CenteredTransformInitializerFilter.MOMENTS
    )
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=50)
    method.SetMetricSamplingStrategy(method.RANDOM)
    method.SetMetricSamplingPercentage(0.02 if quick else 0.1, seed=0)
    method.SetInterpolator(sitk.sitkLinear)
    # Regular-step descent halves its step when the direction turns, so it settles on the optimum
    # (plain gradient descent with an estimated rate wandered off by ~5 mm on a pure translation).
    method.SetOptimizerAsRegularStepGradientDescent(
        learningRate=2.0,
        minStep=1e-3,
        numberOfIterations=50 if quick else 200,
        relaxationFactor=0.5,
        gradientMagnitudeTolerance=1e-8,
    )
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel([4, 2, 1])
    method.SetSmoothingSigmasPerLevel([2.0, 1.0, 0.0])
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    method.SetInitialTransform(start, inPlace=False)
    return method.Execute(f, m)


def _to_itk(image: sitk.Image):
    import itk

    out = itk.image_from_array(sitk.GetArrayFromImage(image).astype(np.float32))
    out.SetOrigin(image.GetOrigin())
    out.SetSpacing(image.GetSpacing())
    out.SetDirection(itk.matrix_from_array(np.array(image.GetDirection()).reshape(3, 3)))
    return out


def _elastix(fixed: sitk.Image, moving: sitk.Image, maps: list[str], quick: bool):
    """Run elastix with its default multi-resolution maps; return the transform as a field."""
    import itk

    parameters = itk.ParameterObject.New()
    for name in maps:
        pmap = parameters.GetDefaultParameterMap(name, 2 if quick else 4)
        pmap["MaximumNumberOfIterations"] = ["40" if quick else "256"]
        pmap["WriteResultImage"] = ["false"]
        if name == "bspline":  # elastix's fast step-size estimate; the original one takes minutes
            pmap["ASGDParameterEstimationMethod"] = ["DisplacementDistribution"]
        if name == "affine":  # the scans start far apart: begin from the centres of gravity
            pmap["AutomaticTransformInitialization"] = ["true"]
            pmap["AutomaticTransformInitializationMethod"] = ["CenterOfGravity"]
        parameters.AddParameterMap(pmap)
    f, m = _to_itk(peer_intensity(fixed)), _to_itk(peer_intensity(moving))
    method = itk.ElastixRegistrationMethod.New(f, m)
    method.SetParameterObject(parameters)
    method.SetLogToConsole(False)
    method.Update()
    # transformix gives elastix's own fixed -> moving displacement on the fixed grid.
    # transformix also writes the field to its output directory (else the working directory).
    with tempfile.TemporaryDirectory(prefix="peers-transformix-") as scratch:
        field = itk.transformix_deformation_field(
            m, method.GetTransformParameterObject(), output_directory=scratch
        )
        return displacement_transform(itk.array_from_image(field), fixed)


def register_elastix_affine(
    fixed: sitk.Image, moving: sitk.Image, quick: bool = False
) -> sitk.Transform:
    """elastix affine (default map: Mattes MI, adaptive SGD, 4 resolutions), centre of gravity."""
    return _elastix(fixed, moving, ["affine"], quick)


def register_elastix_bspline(
    fixed: sitk.Image, moving: sitk.Image, quick: bool = False
) -> sitk.Transform:
    """elastix affine then B-spline (default maps: Mattes MI, 10 mm final grid, bending energy)."""
    return _elastix(fixed, moving, ["affine", "bspline"], quick)


def _to_ants(image: sitk.Image):
    import ants

    return ants.from_numpy(
        sitk.GetArrayFromImage(image).astype(np.float32).transpose(2, 1, 0),  # to (x, y, z)
        origin=list(image.GetOrigin()),
        spacing=list(image.GetSpacing()),
        direction=np.array(image.GetDirection()).reshape(3, 3),
    )


def _ants(fixed: sitk.Image, moving: sitk.Image, options: dict) -> sitk.Transform:
    """Run ants.registration; return its forward transforms composed into one field.

    ANTs' ``fwdtransforms`` are what ``apply_transforms`` uses to pull the moving image onto the
    fixed grid, i.e. fixed -> moving; ANTs composes them itself (``compose=``) so that the order
    of the warp and the affine is ANTs' own. Both sides are ITK images, so the vectors are LPS.
    """
    import ants

    f, m = _to_ants(peer_intensity(fixed)), _to_ants(peer_intensity(moving))
    with tempfile.TemporaryDirectory(prefix="peers-ants-") as scratch:
        found = ants.registration(f, m, outprefix=str(Path(scratch) / "reg_"), **options)
        total = ants.apply_transforms(
            f, m, found["fwdtransforms"], compose=str(Path(scratch) / "total_")
        )
        field = ants.image_read(total).numpy()  # (x, y, z, 3)
    return displacement_transform(field.transpose(2, 1, 0, 3), fixed)


# --quick: a short affine that stops at half resolution.
QUICK_ANTS_AFFINE = {
    "aff_iterations": (100, 50, 20),
    "aff_shrink_factors": (8, 4, 2),
    "aff_smoothing_sigmas": (3, 2, 1),
}


def register_ants_affine(
    fixed: sitk.Image, moving: sitk.Image, quick: bool = False
) -> sitk.Transform:
    """ANTs affine (Mattes MI, 4 levels), started from the centres of mass (ANTs' default)."""
    options: dict = {"type_of_transform": "Affine"}
    if quick:
        options.update(QUICK_ANTS_AFFINE)
    return _ants(fixed, moving, options)


def register_ants_syn(fixed: sitk.Image, moving: sitk.Image, quick: bool = False) -> sitk.Transform:
    """ANTs rigid + affine + SyN as antsRegistrationSyNQuick.sh does (MI throughout)."""
    if quick:  # the same kind of map (affine then SyN) with a fraction of the iterations
        options = {"type_of_transform": "SyN", "reg_iterations": (20, 10, 0), **QUICK_ANTS_AFFINE}
    else:
        options = {"type_of_transform": "antsRegistrationSyNQuick[s]"}
    return _ants(fixed, moving, options)


def _niftyreg(tool: str, *args: str) -> None:
    """Run one NiftyReg binary of the ``niftyreg`` wheel; its output only on failure."""
    import niftyreg

    done = subprocess.run(
        [str(niftyreg.bin_path / tool), *args], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(
            f"{tool} failed ({done.returncode}): {(done.stdout + done.stderr)[-800:]}"
        )


def _niftyreg_field(scratch: Path, transformation: Path, fixed: sitk.Image) -> sitk.Transform:
    """A NiftyReg transformation (affine text or control-point grid) as a field on the fixed grid.

    ``reg_transform -def`` writes, at every fixed voxel, the position it maps to in the floating
    (moving) image: NiftyReg's own fixed -> moving direction, in NIfTI world (RAS) mm. The scans
    go in as NIfTI written by SimpleITK, so RAS = diag(-1, -1, 1) LPS on both sides.
    """
    import nibabel

    reference, out = scratch / "fixed.nii.gz", scratch / "deformation.nii.gz"
    _niftyreg("reg_transform", "-ref", str(reference), "-def", str(transformation), str(out))
    position_ras = np.asarray(nibabel.load(str(out)).dataobj, dtype=np.float64)
    position_lps = position_ras.reshape(*fixed.GetSize(), 3) * np.array([-1.0, -1.0, 1.0])
    return displacement_transform(position_lps.transpose(2, 1, 0, 3) - voxel_points(fixed), fixed)


def voxel_points(image: sitk.Image) -> np.ndarray:
    """The LPS position of every voxel of ``image``: (z, y, x, 3)."""
    index = np.stack(np.meshgrid(*(np.arange(n) for n in image.GetSize()), indexing="ij"), -1)
    direction = np.array(image.GetDirection()).reshape(3, 3)
    points = (index * np.array(image.GetSpacing())) @ direction.T + np.array(image.GetOrigin())
    return points.transpose(2, 1, 0, 3)  # (x, y, z, 3) -> (z, y, x, 3)


def _niftyreg_run(fixed: sitk.Image, moving: sitk.Image, deformable: bool, quick: bool):
    """reg_aladin (affine), then optionally reg_f3d started from that affine.

    Initialisation as NiftyReg's reg_aladin usage text offers it: ``-comi``, "use the input
    images centre of mass to initialise the transformation" (the default, the image centres, is
    wrong for scans of different fields of view). reg_f3d starts from aladin's affine through
    ``-aff``, as its usage text and the NiftyReg documentation's affine-then-f3d pipeline do.
    """
    with tempfile.TemporaryDirectory(prefix="peers-niftyreg-") as name:
        scratch = Path(name)
        ref, flo = scratch / "fixed.nii.gz", scratch / "moving.nii.gz"
        sitk.WriteImage(peer_intensity(fixed), str(ref))
        sitk.WriteImage(peer_intensity(moving), str(flo))
        images = ["-ref", str(ref), "-flo", str(flo)]
        affine = scratch / "affine.txt"
        levels = ["-lp", "2"] if quick else []  # quick: stop one level short of full resolution
        resampled = ["-res", str(scratch / "aladin.nii.gz")]  # else written to the working folder
        _niftyreg("reg_aladin", *images, "-aff", str(affine), "-comi", *levels, *resampled)
        if not deformable:
            return _niftyreg_field(scratch, affine, fixed)
        grid = scratch / "cpp.nii.gz"
        iterations = ["-maxit", "30", "-lp", "2"] if quick else []
        result = ["-res", str(scratch / "f3d.nii.gz")]
        _niftyreg("reg_f3d", *images, "-aff", str(affine), "-cpp", str(grid), *iterations, *result)
        return _niftyreg_field(scratch, grid, fixed)


def register_niftyreg_aladin(
    fixed: sitk.Image, moving: sitk.Image, quick: bool = False
) -> sitk.Transform:
    """NiftyReg reg_aladin affine (block matching, symmetric), from the centres of mass."""
    return _niftyreg_run(fixed, moving, False, quick)


def register_niftyreg_f3d(
    fixed: sitk.Image, moving: sitk.Image, quick: bool = False
) -> sitk.Transform:
    """NiftyReg reg_aladin affine then reg_f3d B-spline (NMI, bending energy), default options."""
    return _niftyreg_run(fixed, moving, True, quick)


CONVEXADAM_SPACING_MM = 2.0  # about the spacing of the Learn2Reg CT tasks it is tuned on


def register_convexadam(
    fixed: sitk.Image,
    moving: sitk.Image,
    quick: bool = False,
    *,
    pre_align: Wrapper = register_sitk_affine,
) -> sitk.Transform:
    """ConvexAdam (MIND-SSC features, convex coupling then Adam), default hyper-parameters.

    ConvexAdam registers two images on one grid (the package resamples the moving scan onto the
    fixed one, ``convex_adam_utils.resample_moving_to_fixed``) that are already roughly aligned:
    its README presents it on the Learn2Reg tasks, whose CT pairs come affinely pre-registered
    (the Learn2Reg task descriptions). So the moving scan is pre-aligned by ``pre_align`` (the
    SimpleITK affine above, centre-of-mass start, or NiftyReg's aladin) and resampled with it onto
    a 2 mm grid over the fixed scan; the map is that affine after ConvexAdam's field.
    """
    import torch
    from convexAdam.convex_adam_MIND import convex_adam_pt

    pre = pre_align(fixed, moving, quick)
    spacing = (CONVEXADAM_SPACING_MM,) * 3
    size = [
        round(n * s / CONVEXADAM_SPACING_MM) for n, s in zip(fixed.GetSize(), fixed.GetSpacing())
    ]
    grid = sitk.Image(size, sitk.sitkFloat32)
    grid.SetSpacing(spacing)
    grid.SetOrigin(fixed.GetOrigin())
    grid.SetDirection(fixed.GetDirection())
    f = sitk.Resample(peer_intensity(fixed), grid, sitk.Transform(), sitk.sitkLinear, 0.0)
    m = sitk.Resample(peer_intensity(moving), grid, pre, sitk.sitkLinear, 0.0)
    voxels = convex_adam_pt(
        sitk.GetArrayFromImage(f),
        sitk.GetArrayFromImage(m),
        selected_niter=20 if quick else 80,
        dtype=torch.float32,
        device=torch.device("cpu"),
    )  # (z, y, x, 3): fixed -> moving, in voxels along the array's axes
    direction = np.array(fixed.GetDirection()).reshape(3, 3)
    field_mm = (voxels[..., ::-1] * CONVEXADAM_SPACING_MM) @ direction.T
    composite = sitk.CompositeTransform(3)
    composite.AddTransform(pre)  # applied last: p -> pre(p + u(p))
    composite.AddTransform(displacement_transform(field_mm, grid))
    return composite


# --------------------------------------------------------------------------------------------
# SAME through the library
# --------------------------------------------------------------------------------------------

SAME_STAGES = {
    "affine": {"coarse__enabled": False, "deform__enabled": False, "instance__enabled": False},
    "coarse": {"deform__enabled": False, "instance__enabled": False},
    "deform": {"instance__enabled": False},
    "instance": {},
}
SAME_LABELS = {
    "affine": "affine",
    "coarse": "+coarse",
    "deform": "+deform",
    "instance": "+instance",
}


def register_same(
    fixed: sitk.Image,
    moving: sitk.Image,
    quick: bool = False,
    *,
    features: str = "mind",
    stage: str = "instance",
    deform_weights: str | None = None,
) -> sitk.Transform:
    """SAME up to ``stage``; the whole map (affine and field) as one SimpleITK transform."""
    overrides = {"features": features, "seed": 0, **SAME_STAGES[stage]}
    if stage in ("deform", "instance") and deform_weights:
        overrides["deform__weights"] = deform_weights
    return common.register_case({"fixed": fixed, "moving": moving}, **overrides).transform()


# --------------------------------------------------------------------------------------------
# The methods
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Method:
    name: str
    label: str
    wrapper: Wrapper
    package: str | None = None  # module the wrapper needs beyond the library's own
    pip_name: str | None = None
    quick: bool = False  # run by --quick
    feature: str | None = None  # SAME rows: the feature type
    stage: str | None = None  # SAME rows: the last stage
    also_needs: tuple[tuple[str, str], ...] = ()  # further (module, pip name) pairs


def _methods() -> dict[str, Method]:
    methods = [
        Method("unregistered", "unregistered (physical space)", register_unregistered, quick=True),
        Method("sitk_affine", "SimpleITK affine", register_sitk_affine, quick=True),
        Method(
            "elastix_affine", "elastix affine", register_elastix_affine, "itk", "itk-elastix", True
        ),
        Method(
            "elastix_bspline",
            "elastix affine+B-spline",
            register_elastix_bspline,
            "itk",
            "itk-elastix",
        ),  # fmt: skip
        Method("ants_affine", "ANTs affine", register_ants_affine, "ants", "antspyx", True),
        Method("ants_syn", "ANTs SyN (SyNQuick)", register_ants_syn, "ants", "antspyx"),
        Method(
            "niftyreg_aladin",
            "NiftyReg aladin affine",
            register_niftyreg_aladin,
            "niftyreg",
            "niftyreg",
            True,
        ),
        Method(
            "niftyreg_f3d", "NiftyReg aladin+f3d", register_niftyreg_f3d, "niftyreg", "niftyreg"
        ),
        Method("convexadam", "ConvexAdam (MIND)", register_convexadam, "convexAdam", "convexadam"),
        Method(
            "convexadam_aladin",
            "ConvexAdam (MIND), aladin start",
            partial(register_convexadam, pre_align=register_niftyreg_aladin),
            "convexAdam",
            "convexadam",
            also_needs=(("niftyreg", "niftyreg"),),
        ),
    ]
    for feature in ("mind", "sam"):
        for stage in SAME_STAGES:
            methods.append(
                Method(
                    f"same_{feature}_{stage}",
                    f"SAME-{feature.upper()} {SAME_LABELS[stage]}",
                    partial(register_same, features=feature, stage=stage),
                    quick=feature == "mind" and stage == "affine",
                    feature=feature,
                    stage=stage,
                )
            )
    return {m.name: m for m in methods}


METHODS = _methods()


def package_problem(method: Method) -> str | None:
    """Why the method's optional packages cannot be used, or None when they can."""
    needs = [(method.package, method.pip_name), *method.also_needs] if method.package else []
    for package, pip_name in needs:
        try:
            found = importlib.util.find_spec(package)
        except (ImportError, ValueError) as err:
            found, detail = None, f": {err}"
        else:
            detail = ""
        if found is None:
            return f"{pip_name} is not installed ({package} cannot be imported{detail}); {INSTALL_HINT}"
    return None


def skip_reason(method: Method, deform_weights: str | None) -> str | None:
    """Why a method's rows are skipped before any run, or None."""
    problem = package_problem(method)
    if problem:
        return problem
    if method.feature == "sam":
        from SAMERegistrationLib.features.sam import default_weights

        if default_weights() is None:
            return NO_SAM
    if method.stage == "deform" and not deform_weights:
        from SAMERegistrationLib.stages.deform import shipped_features

        if shipped_features() != method.feature:
            return NO_DEFORM
    return None


# --------------------------------------------------------------------------------------------
# Worker: one method on one pair in its own process
# --------------------------------------------------------------------------------------------


def run_worker(job_path: str, out_path: str) -> int:
    return common.run_as_worker(job_path, out_path, _work)


def _work(job: dict, out: dict) -> None:
    """One method on one pair: time, peak RSS and scores into ``out``."""
    import torch  # every child loads the library's stack, so baselines of RSS match

    from SAMERegistrationLib import spatial  # noqa: F401

    method = METHODS[job["method"]]
    if job.get("threads"):
        torch.set_num_threads(int(job["threads"]))
    case = job["case"]
    fixed, moving = sitk.ReadImage(case["fixed"]), sitk.ReadImage(case["moving"])
    wrapper = method.wrapper
    if method.stage and job.get("deform_weights"):
        wrapper = partial(wrapper, deform_weights=job["deform_weights"])
    clock = time.perf_counter()
    try:
        transform = wrapper(fixed, moving, bool(job.get("quick")))
    except ImportError as err:
        if method.package is None:
            raise
        out.update(
            status="skipped", reason=f"{method.pip_name} cannot be imported ({err}); {INSTALL_HINT}"
        )
        return
    out["seconds"] = round(time.perf_counter() - clock, 3)
    out["maxrss_kb"] = common.peak_rss_kb()
    labels = sitk.ReadImage(case["fixed_labels"]), sitk.ReadImage(case["moving_labels"])
    out.update(score(transform, fixed, *labels))


def child_env(threads: int | None) -> dict[str, str]:
    """ITK (SimpleITK, elastix, ANTs), NiftyReg's OpenMP and torch read these at start."""
    if not threads:
        return {}
    names = ("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
    return {name: str(threads) for name in names}


# --------------------------------------------------------------------------------------------
# Summaries, table and plots
# --------------------------------------------------------------------------------------------


def summarise(rows: list[dict], methods: list[str], organs: dict[str, str]) -> list[dict]:
    """One summary per method: the figures of the table, as numbers."""
    out = []
    for name in methods:
        mine = [r for r in rows if r["method"] == name]
        ok = [r for r in mine if r["status"] == "ok"]
        dice = [r["mean_dice"] for r in ok]
        folding = [r["folding_percent"] for r in ok]
        seconds = [r["seconds"] for r in ok]
        reasons = sorted({r["reason"] for r in mine if r["status"] == "skipped"})
        failed = [r for r in mine if r["status"] == "failed"]
        notes = [f"skipped: {reason}" for reason in reasons]
        if failed:
            notes.append(f"{len(failed)} failed")
        out.append(
            {
                "method": name,
                "label": METHODS[name].label,
                "runs": len(mine),
                "ok": len(ok),
                "skipped": len(mine) - len(ok) - len(failed),
                "cached": sum(1 for r in mine if r.get("cached")),
                "dice_mean": common.mean_or_none(dice),
                "dice_sd": common.sd_or_none(dice),
                "organ_dice_mean": {
                    k: common.mean_or_none(r["dice"].get(k) for r in ok) for k in organs
                },
                "folding_percent_mean": common.mean_or_none(folding),
                "folding_percent_max": max(folding, default=None),
                "seconds_mean": common.mean_or_none(seconds),
                "seconds_median": common.median_or_none(seconds),
                "peak_rss_gb_max": max((r["peak_rss_gb"] for r in ok), default=None),
                "note": "; ".join(notes),
            }
        )
    return out


def results_table(summaries: list[dict], organs: dict[str, str]) -> str:
    head = ["method", "ok/runs", "Dice (mean ± sd)", *organs.values()]
    head += ["folding % mean (max)", "time s mean (median)", "peak RSS GB", "note"]
    rows = []
    for s in summaries:
        dice = common.fmt(s["dice_mean"], 3) + (f" ± {s['dice_sd']:.3f}" if s["dice_sd"] else "")
        cells = [s["label"], f"{s['ok']}/{s['runs']}", dice]
        cells += [common.fmt(s["organ_dice_mean"][k], 3) for k in organs]
        cells.append(
            f"{common.fmt(s['folding_percent_mean'], 3)} ({common.fmt(s['folding_percent_max'], 3)})"
        )
        cells.append(f"{common.fmt(s['seconds_mean'], 1)} ({common.fmt(s['seconds_median'], 1)})")
        rows.append([*cells, common.fmt(s["peak_rss_gb_max"], 2), s["note"]])
    return common.markdown_table(head, rows)


def plot(rows: list[dict], methods: list[str], organs: dict[str, str], prefix: Path) -> list[Path]:
    """Per-organ Dice box plots by method, and time against mean Dice; PNG paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["status"] == "ok"]
    shown = [m for m in methods if any(r["method"] == m for r in ok)]
    names = [METHODS[m].label for m in shown]
    panels = [*organs.items(), ("mean", "mean over organs")]
    columns = 4
    fig, axes = plt.subplots(
        math.ceil(len(panels) / columns), columns, figsize=(4.5 * columns, 8), squeeze=False
    )
    for ax, (key, title) in zip(axes.flat, panels):
        data = [
            [
                r["mean_dice"] if key == "mean" else r["dice"][key]
                for r in ok
                if r["method"] == m and (key == "mean" or key in r["dice"])
            ]
            for m in shown
        ]
        ax.boxplot([d if d else [math.nan] for d in data], orientation="horizontal")
        ax.set_yticks(range(1, len(names) + 1), names, fontsize=7)
        ax.set_xlim(0, 1)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("Dice", fontsize=8)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.tight_layout()
    dice_png = prefix.with_name(prefix.name + "-dice.png")
    fig.savefig(dice_png, dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 5))
    for m, name in zip(shown, names):
        mine = [r for r in ok if r["method"] == m]
        ax.scatter([r["seconds"] for r in mine], [r["mean_dice"] for r in mine], label=name, s=18)
    ax.set_xscale("log")
    ax.set_xlabel("wall time per pair (s, log scale)")
    ax.set_ylabel("mean Dice over organs")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    time_png = prefix.with_name(prefix.name + "-time.png")
    fig.savefig(time_png, dpi=100)
    plt.close(fig)
    return [dice_png, time_png]


def organ_names(openkbp: Path) -> dict[str, str]:
    path = openkbp / "labels.json"
    names = (
        json.loads(path.read_text()) if path.is_file() else {str(i): str(i) for i in range(1, 8)}
    )
    return {k: v for k, v in sorted(names.items(), key=lambda kv: int(kv[0])) if k != "0"}


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=20, help="number of pairs (20; --quick: 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the pairing (0)")
    parser.add_argument(
        "--methods",
        help=f"comma-separated methods (default: all; --quick: the cheap ones): {', '.join(METHODS)}",
    )
    parser.add_argument(
        "--data", type=Path, help="shared data folder or its openkbp/ (as run_pairs.py)"
    )
    parser.add_argument("--threads", type=int, help="threads for every method (default: their own)")
    parser.add_argument("--deform-weights", help="SAM-deform weights for the SAME +deform rows")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per run (3600)")
    parser.add_argument(
        "--output-dir", type=Path, default=common.RESULTS, help="benchmarks/results/"
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke check: 1 pair, cheap methods, few iterations"
    )
    parser.add_argument(
        "--fresh",
        action="store_true",
        help=f"run every (method, pair) again instead of reusing <output-dir>/{CACHE}/",
    )
    parser.add_argument("--worker", nargs=2, metavar=("JOB", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return args
    if args.methods:
        args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        unknown = sorted(set(args.methods) - set(METHODS))
        if unknown:
            parser.error(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
    else:
        args.methods = [m for m, method in METHODS.items() if method.quick or not args.quick]
    if args.quick and "--pairs" not in " ".join(argv if argv is not None else sys.argv):
        args.pairs = 1
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return run_worker(*args.worker)
    openkbp = common.find_openkbp(args.data)
    pairs = common.draw_pairs(common.validation_patients(openkbp), args.pairs, args.seed)
    organs = organ_names(openkbp)
    prefix = common.new_results_prefix(args.output_dir, "peers")
    skips = {m: skip_reason(METHODS[m], args.deform_weights) for m in args.methods}
    rows: list[dict] = []
    document = {
        "script": "benchmarks/peers.py",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "started": datetime.now().isoformat(timespec="seconds"),
        "options": {k: v for k, v in vars(args).items() if k != "worker"},
        "data": str(openkbp),
        "pairing": [{"pair": i, "fixed": f, "moving": m} for i, (f, m) in enumerate(pairs, 1)],
        "organs": organs,
        "machine": common.machine_info(),
        "rows": rows,
    }
    print(f"Pairs (seed {args.seed}, fixed <- moving): {[f'{f} <- {m}' for f, m in pairs]}")
    for name, why in skips.items():
        if why:
            print(f"skipping {name}: {why}")
    with tempfile.TemporaryDirectory(prefix="peers-") as scratch:
        for index, (fixed, moving) in enumerate(pairs, 1):
            for name in args.methods:
                row = run_one(name, index, fixed, moving, openkbp, args, skips[name], Path(scratch))
                rows.append(row)
                print(progress_line(row, len(pairs)), flush=True)
                common.write_json(prefix.with_suffix(".json"), document)
    summaries = summarise(rows, args.methods, organs)
    table = results_table(summaries, organs)
    pngs = plot(rows, args.methods, organs, prefix)
    document.update(
        summary=summaries,
        table_markdown=table,
        plots=[str(p) for p in pngs],
        finished=datetime.now().isoformat(timespec="seconds"),
    )
    document["machine"]["load_average_at_end"] = list(os.getloadavg())
    common.write_json(prefix.with_suffix(".json"), document)
    cached = sum(1 for r in rows if r.get("cached"))
    header = (
        f"{len(pairs)} OpenKBP validation pairs (seed {args.seed}); "
        f"{common.machine_line(document['machine'], 'cpu', [])}; threads: {args.threads or 'default'}"
        + (f"; {cached} of {len(rows)} rows from {args.output_dir / CACHE}" if cached else "")
    )
    prefix.with_suffix(".md").write_text(f"{header}\n\n{table}\n", encoding="utf-8")
    print(f"\n{header}\n\n{table}\n")
    print(
        f"Saved {prefix.with_suffix('.json')}, {prefix.with_suffix('.md')}, {', '.join(map(str, pngs))}"
    )
    return 0


def cache_file(folder: Path, job: dict) -> Path:
    """Where one (method, pair) result is kept, named by what decides it.

    The key holds the inputs and options of the run, and for SAME rows the library's source, so
    a changed library or option runs again instead of reusing an old figure.
    """
    key = {k: job[k] for k in ("method", "case", "quick", "threads", "deform_weights")}
    if METHODS[job["method"]].stage:
        key["library"] = common.library_hash()
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    pair = f"{job['fixed_name']}--{job['moving_name']}"
    return folder / CACHE / job["method"] / f"{pair}--{digest}.json"


def run_one(
    name: str,
    index: int,
    fixed: str,
    moving: str,
    openkbp: Path,
    args,
    skip: str | None,
    scratch: Path,
) -> dict:
    """One method on one pair: from the cache when it holds the run, else in a child process."""
    row = {"method": name, "pair": index, "fixed": fixed, "moving": moving}
    if skip:
        return {**row, "status": "skipped", "reason": skip}
    job = {
        "method": name,
        "case": common.case_files(openkbp, fixed, moving),
        "fixed_name": fixed,
        "moving_name": moving,
        "quick": args.quick,
        "threads": args.threads,
        "deform_weights": args.deform_weights,
    }
    kept = cache_file(args.output_dir, job)
    if kept.is_file() and not args.fresh:
        return {**row, **json.loads(kept.read_text()), "cached": str(kept)}
    script = Path(__file__).resolve()
    report, wall = common.run_child(script, job, scratch, args.timeout, child_env(args.threads))
    report["process_seconds"] = wall
    report["peak_rss_gb"] = (
        round(report.pop("maxrss_kb", 0) / 2**20, 3) if "maxrss_kb" in report else None
    )
    report["load_average_after"] = list(os.getloadavg())
    if report["status"] == "ok":  # failures and skips are tried again on the next run
        kept.parent.mkdir(parents=True, exist_ok=True)
        common.write_json(kept, report)
    return {**row, **report}


def progress_line(row: dict, total: int) -> str:
    head = f"[{row['pair']}/{total} {row['method']:18s}] {row['fixed']} <- {row['moving']}"
    if row["status"] == "skipped":
        return f"{head}  skipped: {row['reason']}"
    if row["status"] != "ok":
        return f"{head}  FAILED {row.get('error', '')[:300]}"
    return (
        f"{head}  Dice {row['mean_dice']:.3f}  fold {row['folding_percent']:.3f}%  "
        f"{row['seconds']:.1f} s  {row['peak_rss_gb']:.2f} GB"
    )


if __name__ == "__main__":
    sys.exit(main())
