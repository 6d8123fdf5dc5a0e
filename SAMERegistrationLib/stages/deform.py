"""SAM-deform: the learned diffeomorphic stage, run after the affine and coarse stages.

The network sees the fixed image, the moving image pulled through the pre-alignment
``phi_pre(p) = A(p + u_coarse(p))`` and the SAM correlation of the two, and predicts a field u on
the fixed working grid. The stage's map is ``phi_pre o (id + u)``: u moves fixed points first, then
the pre-alignment carries them into moving space, so the total displacement becomes
``u(p) + u_coarse(p + u(p))`` with the affine still applied last. Without weights given, the
network shipped with the library runs where it fits (``choose_model``); otherwise the pipeline
skips this stage with a logged reason. The network's field is kept only where it helps: unless it
raises the local NCC of the fixed and the pulled moving image inside the fixed body by
``deform.min_gain``, the stage returns the incoming alignment as "rejected" (a network can move a
perfect alignment, or one of anatomy it was not trained on, for the worse). The shipped network
was trained on head & neck CT only, and on abdominal and thoracic CT under known deformations its
field raised the image similarity and still moved points further from the truth
(``benchmarks/known_deformations.py``): so it runs only on fixed scans that resemble its training
scans (``outside_training_domain``), unless ``deform.domain_check`` is off.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch

from .. import spatial
from ..alignment import Alignment
from ..config import DeformConfig, RegistrationConfig
from ..deform_net.checkpoint import DeformModel, load_deform_weights
from ..deform_net.field import displacement
from ..deform_net.inputs import DeformInputs, build_inputs
from ..device import inference_dtype
from ..errors import ConfigError
from ..features.base import FeatureMaps
from ..shipped import MODELS, file_sha256, read_record, verify_shipped
from ..working import WorkingImage
from . import StageContext, skipped
from .similarity import DESCRIPTION, local_similarity, pulled_window, rejection

log = logging.getLogger(__name__)


#: The SAM-deform network shipped with the library, its record (SHA256, features) and model card.
DEFAULT_WEIGHTS = MODELS / "deform_default.pt"
DEFAULT_RECORD = MODELS / "deform_default.json"


def shipped_weights() -> Path | None:
    """The SAM-deform network shipped with the library, if this installation has it."""
    return DEFAULT_WEIGHTS if DEFAULT_WEIGHTS.is_file() else None


def shipped_features() -> str | None:
    """The features the shipped network was trained on (its correlation input), if one ships."""
    return read_record(DEFAULT_RECORD).get("features") if shipped_weights() else None


def choose_model(
    config: DeformConfig,
    features: str,
    sam_weights: str | os.PathLike[str] | None,
    working_spacing_mm: float,
    device: torch.device,
) -> tuple[DeformModel | None, str]:
    """The network to run and where it came from, or None and why the stage is skipped.

    Weights given in ``config.weights`` must fit this registration: a mismatch stops it before
    any work. Without them the shipped network runs when it was trained on the same features
    (and, for SAM, the same SAM model) and working spacing; otherwise the stage is skipped with
    the reason, since other embeddings or another scale are not what the network learnt.
    """
    if config.weights:
        model = load_model(config.weights, features, sam_weights, working_spacing_mm, device)
        return model, str(config.weights)
    shipped = shipped_weights()
    if shipped is None:
        return None, "no SAM-deform network weights were given (deform.weights)"
    record = read_record(DEFAULT_RECORD)
    trained = record.get("features")
    train_hint = (
        f"train one with 'same-register train-deform --features {features}' and pass it with "
        "--deform-weights"
    )
    if trained != features:
        return None, (
            f"the shipped SAM-deform network was trained with {trained} features and this "
            f"registration uses {features}; {train_hint}"
        )
    trained_spacing = record.get("working_spacing_mm")
    if trained_spacing is not None and not np.isclose(trained_spacing, working_spacing_mm):
        # The network predicts displacements in voxels of the grid it saw: another grid would
        # show it anatomy at another scale.
        return None, (
            f"the shipped SAM-deform network was trained on a {trained_spacing:g} mm working "
            f"grid and this registration uses {working_spacing_mm:g} mm; register with --spacing "
            f"{trained_spacing:g} to use it"
        )
    trained_sam = record.get("sam_weights_sha256")
    if features == "sam" and sam_weights is not None and file_sha256(sam_weights) != trained_sam:
        return None, (
            "the shipped SAM-deform network was trained with another SAM model than "
            f"{sam_weights}; {train_hint}"
        )
    verify_shipped(
        shipped,
        DEFAULT_RECORD,
        "SAM-deform network",
        "pass --deform-weights PATH, or leave the stage out with --stages affine,coarse,instance",
    )
    return load_model(shipped, features, sam_weights, working_spacing_mm, device), shipped.name


def load_model(
    weights: str | os.PathLike[str],
    features: str,
    sam_weights: str | os.PathLike[str] | None,
    working_spacing_mm: float,
    device: torch.device,
) -> DeformModel:
    """Load and check the network before any work: a bad file or a mismatch stops registration."""
    model = load_deform_weights(weights, map_location=device)
    if model.correlation and model.features != features:
        raise ConfigError(
            f"The SAM-deform weights {weights} were trained with {model.features} "
            f"features as the correlation input, but this registration uses {features} features. "
            f"Register with --features {model.features}, or use weights trained with {features}."
        )
    trained_sam = model.sam_weights_sha256 if model.features == "sam" else None
    if trained_sam and sam_weights is not None and file_sha256(sam_weights) != trained_sam:
        log.warning(
            "The SAM-deform weights %s were trained with another SAM model than %s; its "
            "correlation input may not mean what the network learnt.",
            weights,
            sam_weights,
        )
    trained = model.working_spacing_mm
    if trained is not None and not np.isclose(trained, working_spacing_mm):
        log.warning(
            "The SAM-deform weights %s were trained on a %g mm working grid; registering on %g mm.",
            weights,
            trained,
            working_spacing_mm,
        )
    return model


def run(
    fixed_maps: FeatureMaps, moving_maps: FeatureMaps, alignment: Alignment,
    config: RegistrationConfig, context: StageContext,
) -> tuple[Alignment, dict]:  # fmt: skip
    """The alignment composed after the network's field: ``phi_pre o (id + u)``."""
    model = context.deform_model
    if model is None:
        log.info("deform stage skipped: %s", context.deform_source)
        return alignment, skipped(context.deform_source)
    fixed, moving = context.fixed, context.moving
    if config.deform.domain_check and context.deform_source == DEFAULT_WEIGHTS.name:
        domain = read_record(DEFAULT_RECORD).get("domain")
        reason = outside_training_domain(fixed, domain) if domain else None
        if reason is not None:
            log.info("deform stage skipped: %s", reason)
            return alignment, skipped(reason)
    inputs = build_inputs(fixed, moving, fixed_maps, moving_maps, alignment, model.correlation)
    output = predict(model, inputs)
    with torch.no_grad():
        u = displacement(output, fixed.grid, model.variant, model.integration_steps)
        composed = alignment.compose(u)
        before = local_similarity(fixed, inputs.fixed, inputs.moving)
        after = local_similarity(fixed, inputs.fixed, pulled_window(moving, composed, fixed))
    info = {
        "weights": context.deform_source,
        "variant": model.variant,
        "correlation": model.correlation,
        "network_features": model.features,
        "displacement_max_mm": round(float(u.norm(dim=1).max()), 3),
        # Folding of the network's own map (id + u) inside the fixed body.
        "folding_percent": spatial.folding_percent(u, fixed.grid, fixed.body),
        "similarity": DESCRIPTION,
        "similarity_before": round(before, 4),
        "similarity_after": round(after, 4),
    }
    reason = rejection("deform", "the network's field", before, after, config.deform.min_gain)
    if reason is not None:
        return alignment, {"status": "rejected", "reason": reason, **info}
    return composed, info


def predict(model: DeformModel, inputs: DeformInputs) -> torch.Tensor:
    """The network's output for the inputs: (1, 3, D, H, W) float32 in the usual memory layout.

    Inference runs in the channels-last layout, where oneDNN's 3-D convolutions take about a
    quarter less time on a CPU, and in reduced precision where the device computes it natively
    (``inference_dtype``): on such a CPU about 2.5 times faster than float32, the velocity field
    changing by at most about 0.05 voxel (measured on OpenKBP 237 <- 235).
    """
    layout = torch.channels_last_3d
    network = model.network.to(memory_format=layout)
    images = [x.contiguous(memory_format=layout) for x in (inputs.moving, inputs.fixed)]
    correlation = inputs.correlation
    if correlation is not None:
        correlation = correlation.contiguous(memory_format=layout)
    device = inputs.fixed.device
    dtype = inference_dtype(device)
    with torch.no_grad(), torch.autocast(device.type, dtype, enabled=dtype is not None):
        output = network(*images, correlation)
    return output.float().contiguous()


def body_profile(image: WorkingImage) -> tuple[float, float]:
    """The median axial cross-section of the body (cm2) over the slices that hold body, and the
    share of those slices where the body reaches a side (x or y face) of the grid: where the
    scan's field of view cut through the body."""
    body = image.body[image.body.any(axis=(1, 2))]
    if not len(body):
        return 0.0, 0.0
    spacing_x, spacing_y = image.grid.spacing[:2]
    area = float(np.median(body.sum(axis=(1, 2)))) * spacing_x * spacing_y / 100.0
    sides = body[:, :, 0] | body[:, :, -1], body[:, 0, :] | body[:, -1, :]
    cut = float(np.mean(sides[0].any(axis=1) | sides[1].any(axis=1)))
    return area, cut


def outside_training_domain(fixed: WorkingImage, domain: dict) -> str | None:
    """Why the fixed scan is unlike the shipped network's training scans, or None if it is alike.

    ``domain`` (from the network's record) bounds the two figures of ``body_profile``: head &
    neck CT has a small cross-section and is scanned with the whole body outline in view; an
    abdomen or a chest is larger, and a crop of any trunk cuts through the body.
    """
    area, cut = body_profile(fixed)
    max_area, max_cut = domain["median_body_area_cm2_max"], domain["side_cut_share_max"]
    if area <= max_area and cut <= max_cut:
        return None
    return (
        f"the fixed scan does not look like the {domain['scans']} the shipped network was "
        f"trained on (median axial body section {area:.0f} cm2, at most {max_area:g} there; "
        f"field of view cutting the body in {cut:.0%} of slices, at most {max_cut:.0%} there), "
        "and outside them its field can move points away from the truth; set "
        "deform.domain_check=false to run it anyway"
    )
