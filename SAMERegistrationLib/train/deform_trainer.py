"""Training SAM-deform on pairs of CT scans (same-code-facts.md section 4.4).

``train_deform`` checks every scan's header and the settings before any work, draws a seeded set of
ordered (fixed, moving) pairs, pre-aligns each with the library's own affine and coarse stages
(cached on disk, ``deform_cache``), and trains the U-Net with Adam on one pair per iteration, the
pairs shuffled per epoch from the seed. The features of the pre-alignment, the correlation input
and the SAM loss are frozen: they are computed once, with the SAM network in eval mode (or MIND).
Every ``checkpoint_every`` iterations a checkpoint holds the network, the optimiser, the loss
scaler, every random generator's state and the iteration, so ``resume=True`` continues exactly (on
the CPU bit for bit; on CUDA, non-deterministic kernels make any two runs differ in the last bits).
The final weights go to ``deform_trained.pth`` for ``--deform-weights``.
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .. import spatial
from ..checkpoint_io import write_checkpoint
from ..config import FEATURES, SPACING_RANGE_MM, RegistrationConfig
from ..deform_net.checkpoint import deform_meta, save_deform_weights
from ..deform_net.field import VARIANTS, displacement
from ..deform_net.inputs import DeformInputs
from ..deform_net.network import DeformNetwork
from ..device import resolve_device
from ..errors import CheckpointError, ConfigError, InputError
from ..features.base import FeatureMaps
from ..shipped import file_sha256
from . import run
from .checkpoints import (
    check_same_settings,
    read_checkpoint,
    training_payload,
)
from .deform_cache import PairCache, TrainingPair
from .deform_losses import MASK_LEVEL, SIMILARITIES, masked_mean, similarity_loss
from .sam_trainer import check_scan_files

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "same-deform-training"
FINAL_WEIGHTS = "deform_trained.pth"
LOG_HEADER = "iteration\tloss\tsimilarity\tsam\tsmoothness\tpair\tseconds\n"
#: Settings a resumed run may change; any other change would break the exact continuation.
RESUMABLE_CHANGES = ("epochs", "checkpoint_every", "keep_checkpoints", "device")


@dataclass(frozen=True)
class DeformTrainConfig:
    """Every setting of a SAM-deform training run."""

    epochs: int = 100
    pairs: int = 200  # ordered (fixed, moving) pairs drawn from the scans, no self-pairs
    features: str = "auto"  # sam, mind, or auto (as registration resolves it: resolve_features)
    sam_weights: str | None = None  # default: the SAM model shipped with the library
    working_spacing_mm: float = 2.0
    variant: str = "svf"  # svf (scaling and squaring) or dvf (direct displacement)
    correlation: bool = True  # the SAM correlation input at half resolution
    integration_steps: int = 7
    similarity: str = "lncc"  # lncc (local NCC) or ncc (global)
    window: int = 21  # local NCC window, voxels
    similarity_weight: float = 1.0
    sam_loss_weight: float = 1.0  # 1 - cosine of fixed and warped moving embeddings
    # Squared gradient of the network's output in voxels: SAME's weight (10, on a field in
    # normalised units, with its NCC at 0.01) converted to voxel units at its image size.
    smoothness: float = 0.2
    lr: float = 1e-4
    seed: int = 0
    device: str = "auto"
    mixed_precision: bool = True  # float16 autocast with loss scaling, on CUDA only
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    # Train on a random (z, y, x) box of the fixed working grid per iteration (less memory and
    # time; the whole map is still used outside it); None: the whole grid, as SAME does.
    patch: tuple[int, int, int] | None = None
    # Registration configuration overrides for the pre-alignment, e.g. {"coarse.iterations": 200}.
    prealign: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        """Refuse values that cannot work, saying which and why."""
        problems = []
        for name in (
            "epochs",
            "pairs",
            "integration_steps",
            "checkpoint_every",
            "keep_checkpoints",
        ):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1 (got {getattr(self, name)})")
        if self.features not in FEATURES:
            problems.append(f"features must be one of {FEATURES} (got {self.features!r})")
        low, high = SPACING_RANGE_MM
        if not low <= self.working_spacing_mm <= high:
            problems.append(
                f"working_spacing_mm must lie between {low:g} and {high:g} mm "
                f"(got {self.working_spacing_mm})"
            )
        if self.variant not in VARIANTS:
            problems.append(f"variant must be one of {VARIANTS} (got {self.variant!r})")
        if self.similarity not in SIMILARITIES:
            problems.append(f"similarity must be one of {SIMILARITIES} (got {self.similarity!r})")
        if self.patch is not None and (len(self.patch) != 3 or min(self.patch) < 2):
            problems.append(f"patch must be 3 sizes (z, y, x) of at least 2 (got {self.patch})")
        if self.window < 3 or self.window % 2 == 0:
            problems.append(f"window must be an odd number of voxels >= 3 (got {self.window})")
        if not (np.isfinite(self.lr) and self.lr > 0):
            problems.append(f"lr must be a positive number (got {self.lr})")
        weights = ("similarity_weight", "sam_loss_weight", "smoothness")
        if any(not np.isfinite(getattr(self, w)) or getattr(self, w) < 0 for w in weights):
            problems.append(f"{', '.join(weights)} must be finite and not negative")
        if problems:
            raise ConfigError("Invalid SAM-deform training settings: " + "; ".join(problems) + ".")

    @property
    def needs_features(self) -> bool:
        return self.correlation or self.sam_loss_weight > 0

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> DeformTrainConfig:
        values = dict(values)
        if values.get("patch") is not None:
            values["patch"] = tuple(values["patch"])
        try:
            return cls(**values)
        except TypeError as err:
            known = ", ".join(f.name for f in fields(cls))
            raise ConfigError(
                f"Unknown SAM-deform training setting ({err}); known: {known}."
            ) from err

    def registration_config(self) -> RegistrationConfig:
        """The pre-alignment's configuration: affine and coarse only, on this run's grid."""
        base = RegistrationConfig(
            features=self.features,
            sam_weights=self.sam_weights,
            device=self.device,
            working_spacing_mm=self.working_spacing_mm,
            seed=self.seed,
        )
        overrides = {**self.prealign, "deform.enabled": False, "instance.enabled": False}
        return base.with_overrides(overrides)


def resolve_features(config: DeformTrainConfig) -> DeformTrainConfig:
    """Fix ``auto`` as registration does (``features.resolve_features``), to sam or mind."""
    from ..features import resolve_features as resolve  # late: it loads the SAM network code

    features, weights = resolve(config.features, config.sam_weights)
    if config.features == "sam" and features == "mind":
        raise CheckpointError(
            "SAM features were requested for SAM-deform training but no SAM weights were given "
            "and none ship with this installation. Pass --weights PATH/TO/SAM.pth, or use "
            "--features mind."
        )
    if features == "mind":
        return replace(config, features="mind", sam_weights=None)
    if not Path(weights).is_file():
        raise CheckpointError(
            f"SAM weights file {weights} does not exist. Give an existing SAM checkpoint with "
            "--weights, or use --features mind."
        )
    return replace(config, features="sam", sam_weights=str(Path(weights).resolve()))


def draw_pairs(scans: Sequence[Path], count: int, seed: int) -> list[tuple[Path, Path]]:
    """``count`` ordered (fixed, moving) pairs of different scans, shuffled with ``seed``."""
    ordered = [(f, m) for f in scans for m in scans if f != m]
    random.Random(seed).shuffle(ordered)
    if count > len(ordered):
        log.info("Only %d ordered pairs exist; training on all of them.", len(ordered))
    return ordered[:count]


def crop_pair(pair: TrainingPair, start: Sequence[int], size: Sequence[int]) -> TrainingPair:
    """The pair restricted to the fixed-grid box [start, start + size) (start even, (z, y, x)).

    The moving side stays whole: it is sampled at physical positions. The half-resolution inputs
    (correlation, feature maps) keep voxel i on working voxel 2i because ``start`` is even.
    """
    stop = [min(a + n, full) for a, n, full in zip(start, size, pair.inputs.grid.shape)]
    box = (..., *(slice(a, b) for a, b in zip(start, stop)))
    half = (..., *(slice(a // 2, (b + 1) // 2) for a, b in zip(start, stop)))
    inputs = pair.inputs
    moving_features = inputs.moving_features
    if moving_features is not None:
        moving_features = tuple(m[half] for m in moving_features)
    maps = pair.fixed_maps
    if maps is not None:
        lo = [a // 2 for a in start]
        hi = [min((b + 1) // 2, n) for b, n in zip(stop, maps.grid.shape)]
        maps = FeatureMaps(
            maps.local[half], maps.global_[half], maps.grid.crop(lo, hi), maps.body[half[1:]]
        )
    return TrainingPair(
        inputs=DeformInputs(
            inputs.fixed[box],
            inputs.moving[box],
            None if inputs.correlation is None else inputs.correlation[half],
            inputs.grid.crop(start, stop),
            moving_features,
        ),
        affine=pair.affine,
        dense=pair.dense[box],
        fixed_body=pair.fixed_body[box],
        moving_window=pair.moving_window,
        moving_body=pair.moving_body,
        moving_grid=pair.moving_grid,
        fixed_maps=maps,
    )


def random_box(config: DeformTrainConfig, iteration: int, shape: Sequence[int]) -> list[int]:
    """An even start of the ``patch`` box inside ``shape``, drawn from (seed, iteration)."""
    rng = np.random.default_rng([config.seed, iteration, 1])
    return [2 * int(rng.integers(0, max(n - p, 0) // 2 + 1)) for n, p in zip(shape, config.patch)]


# --- the step ------------------------------------------------------------------------------------


def deform_loss(
    output: torch.Tensor, pair: TrainingPair, config: DeformTrainConfig
) -> run.LossTerms:
    """The weighted loss of the network's ``output`` (voxels) for one pre-aligned pair."""
    grid = pair.inputs.grid
    u = displacement(output, grid, config.variant, config.integration_steps)
    total_map = spatial.compose(pair.dense, u, grid)  # phi_pre o (id + u), as registration does
    both = torch.cat([pair.moving_window, pair.moving_body], dim=1)
    warped = spatial.pull(both, pair.moving_grid, pair.affine, total_map, grid, grid)
    mask = warped[:, 1:] > MASK_LEVEL
    similarity = similarity_loss(
        pair.inputs.fixed, warped[:, :1], mask, config.similarity, config.window
    )
    sam = output.new_zeros(())
    if config.sam_loss_weight > 0 and pair.fixed_maps is not None:
        sam = _sam_loss(u, pair)
    smooth = spatial.roughness(output, mean_over_axes=True)
    total = (
        config.similarity_weight * similarity
        + config.sam_loss_weight * sam
        + config.smoothness * smooth
    )
    return run.LossTerms(total, {"similarity": similarity, "sam": sam, "smoothness": smooth})


def _sam_loss(u: torch.Tensor, pair: TrainingPair) -> torch.Tensor:
    """1 - cosine of the fixed and moving embeddings, the moving ones pulled through the whole map.

    The moving maps were already pulled through the pre-alignment onto the fixed feature grid;
    sampling them at ``p + u(p)`` completes ``phi_pre o (id + u)``. Warping embeddings instead of
    re-running SAM on the warped image keeps SAM out of the training step.
    """
    maps = pair.fixed_maps
    grid = maps.grid
    u_features = spatial.resample_field(u, pair.inputs.grid, grid)
    points = spatial.voxel_points(grid, u.device) + u_features.permute(0, 2, 3, 4, 1)
    body = torch.as_tensor(maps.body, device=u.device)
    cosines = []
    for fixed, moving in zip((maps.global_, maps.local), pair.inputs.moving_features):
        warped = spatial.sample(moving, grid, points)
        cosines.append(masked_mean(F.cosine_similarity(fixed, warped, dim=1, eps=1e-6)[0], body))
    return 1.0 - torch.stack(cosines).mean()


@dataclass
class TrainingState:
    model: DeformNetwork
    optimizer: torch.optim.Adam
    scaler: torch.amp.GradScaler
    device: torch.device
    iteration: int = 0
    sam_sha256: str | None = None  # of the SAM weights behind the features, for the meta


def new_training_state(config: DeformTrainConfig, device: torch.device) -> TrainingState:
    torch.manual_seed(config.seed)
    model = DeformNetwork(correlation=config.correlation).to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    amp = config.mixed_precision and device.type == "cuda"
    return TrainingState(model, optimizer, torch.amp.GradScaler(device.type, enabled=amp), device)


def train_step(
    state: TrainingState, pair: TrainingPair, config: DeformTrainConfig
) -> run.LossTerms:
    """One Adam step on one pair (network under float16 autocast on CUDA, the rest in float32)."""
    inputs = pair.inputs
    with torch.autocast(state.device.type, dtype=torch.float16, enabled=state.scaler.is_enabled()):
        output = state.model(inputs.moving, inputs.fixed, inputs.correlation)
    terms = deform_loss(output.float(), pair, config)
    run.optimizer_step(state, terms, "SAM-deform", "Lower --lr.")
    return terms


# --- checkpoints ---------------------------------------------------------------------------------


def save_training_checkpoint(
    state: TrainingState, config: DeformTrainConfig, pairs: Sequence, path: Path
) -> None:
    """Write network, optimiser, scaler, random states and iteration atomically."""
    payload = {
        "format": CHECKPOINT_FORMAT,
        "config": config.to_dict(),
        "pairs": [[str(f), str(m)] for f, m in pairs],
        # "state_dict" and "meta" make a checkpoint usable as --deform-weights as it is.
        "meta": _weights_meta(config, state),
        **training_payload(state),
    }
    write_checkpoint(payload, path)


def load_training_checkpoint(path: Path) -> dict[str, Any]:
    """Read a train-deform checkpoint safely and check its layout."""
    required = ("iteration", "config", "pairs", "state_dict", "optimizer", "scaler", "rng")
    return read_checkpoint(path, CHECKPOINT_FORMAT, required, "train-deform")


def _check_same_run(
    payload: dict[str, Any], config: DeformTrainConfig, pairs: Sequence, path: Path
) -> None:
    stored = DeformTrainConfig.from_dict(payload["config"]).to_dict()
    check_same_settings(stored, config.to_dict(), RESUMABLE_CHANGES, path)
    if [[str(f), str(m)] for f, m in pairs] != payload["pairs"]:
        raise ConfigError(
            f"Cannot resume from {path}: the training pairs differ from the interrupted run's. "
            "Give the same scans, exclude patterns and --pairs, or start a new run elsewhere."
        )


def _weights_meta(config: DeformTrainConfig, state: TrainingState) -> dict[str, Any]:
    return deform_meta(
        config.variant,
        config.correlation,
        config.integration_steps,
        config.features,
        config.working_spacing_mm,
        state.sam_sha256,
        sam_weights=Path(config.sam_weights).name if config.sam_weights else None,
        iterations=state.iteration,
        similarity=config.similarity,
        sam_loss_weight=config.sam_loss_weight,
        smoothness=config.smoothness,
        seed=config.seed,
    )


# --- the run -------------------------------------------------------------------------------------


def _pair_order(config: DeformTrainConfig, epoch: int, count: int) -> np.ndarray:
    """The pairs' order in ``epoch``: a permutation keyed by (seed, epoch), so resuming finds it."""
    return np.random.default_rng([config.seed, epoch]).permutation(count)


def _train_loop(
    state: TrainingState,
    config: DeformTrainConfig,
    cache: PairCache,
    pairs: Sequence[tuple[Path, Path]],
    usable: Sequence[int],
    output_dir: Path,
    progress: run.Progress | None,
) -> None:
    total = config.epochs * len(usable)
    save = partial(save_training_checkpoint, state, config, pairs)
    with run.StepLog(state, output_dir, LOG_HEADER, total, config, progress, save) as steps:
        while state.iteration < total:
            epoch, position = divmod(state.iteration, len(usable))
            index = usable[_pair_order(config, epoch, len(usable))[position]]
            pair = cache.load(index, pairs[index], config.correlation)
            if config.patch is not None:
                start = random_box(config, state.iteration, pair.inputs.grid.shape)
                pair = crop_pair(pair, start, config.patch)
            terms = train_step(state, pair, config)
            steps.record(terms, str(index))


def train_deform(
    scans: Sequence[str | os.PathLike[str]],
    output_dir: str | os.PathLike[str],
    config: DeformTrainConfig | None = None,
    *,
    resume: bool = False,
    progress: run.Progress | None = None,
    prepare_progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Train SAM-deform on pairs of ``scans`` and return the final weights file.

    Never train on scans used for evaluation. ``output_dir`` receives checkpoints, ``train_log.tsv``
    (loss terms per iteration), ``train_config.json``, the pre-alignment cache and the final
    ``deform_trained.pth``. With ``resume=True`` the run continues from its latest checkpoint.
    """
    config = config or DeformTrainConfig()
    config.validate()
    paths = check_scan_files(scans)
    config = resolve_features(config)
    registration = config.registration_config().resolved_for(config.features)
    output_dir = Path(output_dir)
    device = resolve_device(config.device)
    existing = run.existing_checkpoints(output_dir, resume)
    pairs = draw_pairs(paths, config.pairs, config.seed)
    payload = None
    if existing:
        payload = load_training_checkpoint(existing[-1][1])
        _check_same_run(payload, config, pairs, existing[-1][1])
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / run.CONFIG_FILE).write_text(
        json.dumps(
            {"config": config.to_dict(), "pairs": [[str(f), str(m)] for f, m in pairs]}, indent=2
        )
    )
    sam_sha = file_sha256(config.sam_weights) if config.features == "sam" else None
    cache = PairCache(
        output_dir / run.CACHE_DIR, registration, sam_sha, config.needs_features, device
    )
    log.info(
        "Pre-aligning %d pairs with %s features (cached in %s)",
        len(pairs),
        config.features,
        cache.folder,
    )
    usable = cache.prepare(pairs, prepare_progress)
    if not usable:
        raise InputError(
            f"None of the {len(pairs)} training pairs could be pre-aligned (see the warnings "
            "above). Check that the scans show the same body region."
        )
    state = new_training_state(config, device)
    state.sam_sha256 = sam_sha
    path = existing[-1][1] if existing else None
    run.restore_or_start(state, payload, path, resume, output_dir, "SAM-deform")
    remedy = "Use a coarser --spacing, then continue with --resume."
    with run.memory_advice(device, "SAM-deform", remedy):
        _train_loop(state, config, cache, pairs, usable, output_dir, progress)
    final = output_dir / FINAL_WEIGHTS
    save_deform_weights(state.model, final, _weights_meta(config, state))
    return final
