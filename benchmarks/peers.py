"""SAME side by side with elastix, ANTs and SimpleITK on seeded OpenKBP validation pairs.

    python benchmarks/peers.py                 # 20 pairs, every method
    python benchmarks/peers.py --pairs 5       # the first 5 pairs of the same pairing
    python benchmarks/peers.py --quick         # smoke check: 1 pair, the cheap methods, few iterations

Every method is a wrapper ``register_<method>(fixed, moving, quick) -> sitk.Transform`` whose
transform maps fixed-space points to moving-space points (LPS mm, ITK's resampling direction).
All methods are scored by the same code: the moving label map resampled (nearest neighbour) onto
the fixed grid through the transform, Dice per organ present in both images, and the folding % of
the transform's dense displacement on the fixed grid, inside the fixed body. Each registration runs
in a fresh child process (this script in worker mode), which reports its wall time and peak RSS.
Results: ``benchmarks/results/peers-<time>.{json,md}`` and two PNG plots. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from pathlib import Path

import numpy as np
import SimpleITK as sitk

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
for _path in (REPO, BENCH):  # the library from this checkout, and run_pairs beside this script
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import run_pairs  # noqa: E402  (its pairing, data lookup and machine description are reused)

RESULTS = REPO / "benchmarks" / "results"
HU_MIN, HU_MAX = -1024.0, 3071.0
INSTALL_HINT = "install the benchmark extra: pip install -e '.[bench]'"
NO_SAM = "no SAM weights"
NO_DEFORM = (
    "no SAM-deform weights for these features (none given and the shipped network was trained "
    "on others; pass --deform-weights to run this row)"
)

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
    from SAMERegistrationLib import register

    overrides = {"features": features, "seed": 0, **SAME_STAGES[stage]}
    if stage in ("deform", "instance") and deform_weights:
        overrides["deform__weights"] = deform_weights
    return register(fixed, moving, **overrides).transform()


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
    """Why the method's optional package cannot be used, or None when it can."""
    if method.package is None:
        return None
    try:
        found = importlib.util.find_spec(method.package)
    except (ImportError, ValueError) as err:
        found, detail = None, f": {err}"
    else:
        detail = ""
    if found is None:
        return f"{method.pip_name} is not installed ({method.package} cannot be imported{detail}); {INSTALL_HINT}"
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
    job = json.loads(Path(job_path).read_text())
    out: dict = {"status": "failed"}
    method = METHODS[job["method"]]
    try:
        import torch  # every child loads the library's stack, so baselines of RSS match

        from SAMERegistrationLib import spatial  # noqa: F401

        if job.get("threads"):
            torch.set_num_threads(int(job["threads"]))
        fixed, moving = sitk.ReadImage(job["fixed"]), sitk.ReadImage(job["moving"])
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
                status="skipped",
                reason=f"{method.pip_name} cannot be imported ({err}); {INSTALL_HINT}",
            )
            return 0
        out["seconds"] = round(time.perf_counter() - clock, 3)
        out["maxrss_kb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        labels = sitk.ReadImage(job["fixed_labels"]), sitk.ReadImage(job["moving_labels"])
        out.update(score(transform, fixed, *labels))
        out["status"] = "ok"
    except Exception as err:  # a failure is a failed row, never a crash of the benchmark
        out.update(error=f"{type(err).__name__}: {err}", traceback=traceback.format_exc()[-3000:])
    finally:
        out.setdefault("maxrss_kb", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
        Path(out_path).write_text(json.dumps(out, default=run_pairs._jsonable))
    return 0


def run_child(job: dict, scratch: Path, timeout: float) -> dict:
    """Run one job in a fresh Python process; its report, with the process's wall time."""
    job_path, out_path, log_path = (scratch / n for n in ("job.json", "out.json", "child.log"))
    out_path.unlink(missing_ok=True)
    job_path.write_text(json.dumps(job))
    env = dict(os.environ)
    if job.get("threads"):  # ITK (SimpleITK, elastix, ANTs) and OpenMP read these at start
        for name in ("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env[name] = str(job["threads"])
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        str(job_path),
        str(out_path),
    ]
    clock = time.perf_counter()
    with open(log_path, "w") as log:
        try:
            code = subprocess.run(
                command, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=timeout
            ).returncode
        except subprocess.TimeoutExpired:
            code = None
    if out_path.is_file():
        report = json.loads(out_path.read_text())
    else:
        why = f"timed out after {timeout:g} s" if code is None else f"exit status {code}"
        if code is not None and code < 0:
            why += " (killed by a signal; out of memory?)"
        report = {
            "status": "failed",
            "error": why,
            "log": log_path.read_text(encoding="utf-8", errors="replace")[-2000:],
        }
    report["process_seconds"] = round(time.perf_counter() - clock, 3)
    return report


# --------------------------------------------------------------------------------------------
# Summaries, table and plots
# --------------------------------------------------------------------------------------------


def _stats(values: list[float]) -> tuple[float | None, float | None]:
    clean = [v for v in values if v is not None and not math.isnan(v)]
    mean = statistics.fmean(clean) if clean else None
    return mean, statistics.stdev(clean) if len(clean) > 1 else None


def _fmt(value: float | None, digits: int) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def summarise(rows: list[dict], methods: list[str], organs: dict[str, str]) -> list[dict]:
    """One summary per method: the figures of the table, as numbers."""
    out = []
    for name in methods:
        mine = [r for r in rows if r["method"] == name]
        ok = [r for r in mine if r["status"] == "ok"]
        dice_mean, dice_sd = _stats([r["mean_dice"] for r in ok])
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
                "dice_mean": dice_mean,
                "dice_sd": dice_sd,
                "organ_dice_mean": {
                    k: _stats([r["dice"].get(k) for r in ok if k in r["dice"]])[0] for k in organs
                },
                "folding_percent_mean": _stats(folding)[0],
                "folding_percent_max": max(folding, default=None),
                "seconds_mean": _stats(seconds)[0],
                "seconds_median": statistics.median(seconds) if seconds else None,
                "peak_rss_gb_max": max((r["peak_rss_gb"] for r in ok), default=None),
                "note": "; ".join(notes),
            }
        )
    return out


def results_table(summaries: list[dict], organs: dict[str, str]) -> str:
    head = ["method", "ok/runs", "Dice (mean ± sd)", *organs.values()]
    head += ["folding % mean (max)", "time s mean (median)", "peak RSS GB", "note"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in summaries:
        dice = _fmt(s["dice_mean"], 3) + (f" ± {s['dice_sd']:.3f}" if s["dice_sd"] else "")
        cells = [s["label"], f"{s['ok']}/{s['runs']}", dice]
        cells += [_fmt(s["organ_dice_mean"][k], 3) for k in organs]
        cells.append(f"{_fmt(s['folding_percent_mean'], 3)} ({_fmt(s['folding_percent_max'], 3)})")
        cells.append(f"{_fmt(s['seconds_mean'], 1)} ({_fmt(s['seconds_median'], 1)})")
        cells += [_fmt(s["peak_rss_gb_max"], 2), s["note"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


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
        ax.boxplot([d if d else [math.nan] for d in data], vert=False)
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
    parser.add_argument("--output-dir", type=Path, default=RESULTS, help="benchmarks/results/")
    parser.add_argument(
        "--quick", action="store_true", help="smoke check: 1 pair, cheap methods, few iterations"
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
    openkbp = run_pairs.find_openkbp(args.data)
    pairs = run_pairs.draw_pairs(run_pairs.validation_patients(openkbp), args.pairs, args.seed)
    organs = organ_names(openkbp)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    prefix = args.output_dir / f"peers-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
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
        "machine": run_pairs.machine_info(),
        "rows": rows,
    }
    save = lambda: prefix.with_suffix(".json").write_text(  # noqa: E731
        json.dumps(document, indent=1, default=run_pairs._jsonable)
    )
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
                save()
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
    save()
    header = (
        f"{len(pairs)} OpenKBP validation pairs (seed {args.seed}); "
        f"{run_pairs.machine_line(document['machine'], 'cpu', [])}; threads: {args.threads or 'default'}"
    )
    prefix.with_suffix(".md").write_text(f"{header}\n\n{table}\n", encoding="utf-8")
    print(f"\n{header}\n\n{table}\n")
    print(
        f"Saved {prefix.with_suffix('.json')}, {prefix.with_suffix('.md')}, {', '.join(map(str, pngs))}"
    )
    return 0


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
    row = {"method": name, "pair": index, "fixed": fixed, "moving": moving}
    if skip:
        return {**row, "status": "skipped", "reason": skip}
    job = {
        "method": name,
        "fixed": str(openkbp / f"{fixed}_ct.nii.gz"),
        "moving": str(openkbp / f"{moving}_ct.nii.gz"),
        "fixed_labels": str(openkbp / f"{fixed}_label.nii.gz"),
        "moving_labels": str(openkbp / f"{moving}_label.nii.gz"),
        "quick": args.quick,
        "threads": args.threads,
        "deform_weights": args.deform_weights,
    }
    report = run_child(job, scratch, args.timeout)
    report["peak_rss_gb"] = (
        round(report.pop("maxrss_kb", 0) / 2**20, 3) if "maxrss_kb" in report else None
    )
    report["load_average_after"] = list(os.getloadavg())
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
