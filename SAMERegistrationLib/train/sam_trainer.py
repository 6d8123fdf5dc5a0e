"""Self-supervised training of the SAM network on unlabelled CT (same-code-facts.md section 3).

``train_sam`` checks every scan's header before any work, then runs SGD with a linear warm-up on
batches of crop pairs (``crops``) and the local + global InfoNCE loss (``sam_losses``), in mixed
precision with loss scaling on CUDA. Every ``checkpoint_every`` iterations it writes a checkpoint
holding the model, optimiser, loss scaler, every random generator's state and the iteration, so
``resume=True`` continues where the run stopped; the batches themselves are keyed by iteration.
On the CPU a resumed run is bit-for-bit the uninterrupted one; on CUDA, non-deterministic GPU
kernels make any two runs differ in the last bits, resumed or not. The final weights are written
with ``save_sam_checkpoint`` for the registration.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch

from ..checkpoint_io import write_checkpoint
from ..device import resolve_device
from ..errors import ConfigError, InputError
from ..features.sam_network import (
    GLOBAL_STRIDE,
    SAMNetwork,
    load_sam_checkpoint,
    save_sam_checkpoint,
)
from ..shipped import file_sha256
from . import run
from .checkpoints import (
    check_same_settings,
    read_checkpoint,
    training_payload,
)
from .crops import CropConfig, CropPairDataset, PairBatch
from .cross_patient import CrossPatientDataset
from .pair_maps import load_pair_maps
from .relative_position import make_probe, position_loss
from .sam_losses import LossConfig, sam_loss

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "same-sam-training"
FINAL_WEIGHTS = "sam_trained.pth"
LOG_HEADER = "iteration\tloss\tlocal\tglobal\tposition\tlr\tseconds\n"
#: Settings a resumed run may change; any other change would break the exact continuation.
RESUMABLE_CHANGES = ("iterations", "checkpoint_every", "keep_checkpoints", "device", "workers")
_SHOW = 5  # how many offending files an error message lists
OPTIMIZERS = ("sgd", "adam")
LR_SCHEDULES = ("constant", "cosine")


@dataclass(frozen=True)
class SAMTrainConfig:
    """Every setting of a SAM training run (defaults: same-code-facts.md section 3)."""

    iterations: int = 20000
    batch: int = 3  # crop pairs per iteration, each from a different scan when there are enough
    width: float = 1.0  # backbone width; 1.0 is the official network
    embedding_dim: int = 128
    lr: float = 0.02
    # sgd: the paper's (momentum SGD); adam learns faster from scratch with few iterations.
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_iterations: int = 500  # linear warm-up from lr / warmup_iterations to lr
    # constant (SAM's) or cosine: after the warm-up, lr decays along a half cosine to 0 at the end.
    lr_schedule: str = "constant"
    # A SAM weights file to start from (fine-tuning); None: a freshly initialised network.
    init_weights: str | None = None
    seed: int = 0
    device: str = "auto"  # auto, cpu, cuda or cuda:N
    mixed_precision: bool = True  # float16 autocast with loss scaling, on CUDA only
    checkpoint_every: int = 500
    keep_checkpoints: int = 2  # older checkpoints are deleted
    workers: int | None = None  # loader processes; None: 4 on CUDA, 0 (in-process) on the CPU
    # A sam-pair-maps cache of registered training pairs (cross_patient); None: same-scan pairs only.
    pair_maps: str | None = None
    cross_patient_share: float = 0.5  # with pair_maps: chance that a crop pair spans two patients
    # The local loss of cross-patient pairs uses only points where the map's local similarity
    # (normalised cross-correlation) reaches this.
    cross_patient_min_similarity: float = 0.3
    crops: CropConfig = field(default_factory=CropConfig)
    loss: LossConfig = field(default_factory=LossConfig)

    def validate(self) -> None:
        """Refuse values that cannot work, saying which and why."""
        problems = []
        for name in (
            "iterations",
            "batch",
            "embedding_dim",
            "checkpoint_every",
            "keep_checkpoints",
        ):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1 (got {getattr(self, name)})")
        for name in ("width", "lr"):
            value = getattr(self, name)
            if not (np.isfinite(value) and value > 0):
                problems.append(f"{name} must be a positive number (got {value})")
        if self.optimizer not in OPTIMIZERS:
            problems.append(
                f"optimizer must be one of {', '.join(OPTIMIZERS)} (got {self.optimizer})"
            )
        if self.lr_schedule not in LR_SCHEDULES:
            problems.append(
                f"lr_schedule must be one of {', '.join(LR_SCHEDULES)} (got {self.lr_schedule})"
            )
        if self.warmup_iterations < 0 or self.momentum < 0 or self.weight_decay < 0:
            problems.append("warmup_iterations, momentum and weight_decay cannot be negative")
        if self.workers is not None and self.workers < 0:
            problems.append(f"workers cannot be negative (got {self.workers})")
        patch = self.crops.patch
        if len(patch) != 3 or any(p < m or p % m for p, m in zip(patch, GLOBAL_STRIDE)):
            problems.append(
                f"patch {tuple(patch)} must be 3 sizes (z, y, x) that are multiples of "
                f"{GLOBAL_STRIDE} (the global map's stride), e.g. 32 96 96"
            )
        low, high = self.crops.scale_range
        if not 0 < low <= high:
            problems.append(f"scale_range {self.crops.scale_range} must satisfy 0 < low <= high")
        if not 0 <= self.crops.overlap_probability <= 1:
            problems.append("crops.overlap_probability must lie in [0, 1]")
        if self.crops.base_spacing_mm <= 0 or self.crops.noise_std < 0:
            problems.append("crops.base_spacing_mm must be positive and noise_std not negative")
        if not 0 <= self.crops.intensity_scale < 1 or self.crops.intensity_shift_hu < 0:
            problems.append(
                f"crops.intensity_scale must lie in [0, 1) (got {self.crops.intensity_scale}) and "
                f"crops.intensity_shift_hu cannot be negative (got {self.crops.intensity_shift_hu})"
            )
        if self.loss.temperature <= 0:
            problems.append(f"loss.temperature must be positive (got {self.loss.temperature})")
        counts = ("local_queries", "local_hard", "local_diverse", "global_hard", "global_diverse")
        if any(getattr(self.loss, name) < 1 for name in counts):
            problems.append(f"loss.{', loss.'.join(counts)} must be at least 1")
        if not 0 <= self.cross_patient_share <= 1:
            problems.append(
                f"cross_patient_share must lie in [0, 1] (got {self.cross_patient_share})"
            )
        if self.loss.cross_local_weight < 0 or self.loss.position_weight < 0:
            problems.append("loss.cross_local_weight and loss.position_weight cannot be negative")
        if self.loss.position_samples < 1:
            problems.append("loss.position_samples must be at least 1")
        if self.loss.global_cross < 0:
            problems.append(f"loss.global_cross cannot be negative (got {self.loss.global_cross})")
        if problems:
            raise ConfigError("Invalid SAM training settings: " + "; ".join(problems) + ".")

    def to_dict(self) -> dict[str, Any]:
        """Plain values (lists, not tuples) for JSON and checkpoints."""
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> SAMTrainConfig:
        """The inverse of ``to_dict``; unknown keys are an error."""
        values = dict(values)
        try:
            crops = CropConfig(**_tuples(values.pop("crops", {})))
            loss = LossConfig(**values.pop("loss", {}))
            return cls(**_tuples(values), crops=crops, loss=loss)
        except TypeError as err:
            known = ", ".join(f.name for f in fields(cls))
            raise ConfigError(f"Unknown SAM training setting ({err}); known: {known}.") from err


def _tuples(values: dict[str, Any]) -> dict[str, Any]:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}


# --- inputs ------------------------------------------------------------------------------------


def collect_scans(
    sources: Sequence[str | os.PathLike[str]], exclude_patterns: Sequence[str] = ()
) -> list[Path]:
    """Training scans from files and folders (their files, not sub-folders; hidden files skipped).

    A file whose name or path matches any of ``exclude_patterns`` (shell wildcards) is left out:
    use them to keep evaluation cases (e.g. 'validation_*') and label maps out of training.
    """
    found: list[Path] = []
    missing = []
    for source in sources:
        path = Path(source)
        if path.is_dir():
            found.extend(
                sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
            )
        elif path.is_file():
            found.append(path)
        else:
            missing.append(str(path))
    if missing:
        raise InputError(
            f"{len(missing)} training input(s) do not exist: {', '.join(missing[:_SHOW])}. Give "
            "existing scan files or folders of scans."
        )
    unique = list(dict.fromkeys(found))
    return [
        p
        for p in unique
        if not any(
            fnmatch.fnmatch(p.name, pat) or fnmatch.fnmatch(str(p), pat) for pat in exclude_patterns
        )
    ]


def check_scan_files(paths: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """Read every header and refuse non-images, 2-D or multi-channel images, pixel types that
    cannot hold Hounsfield units, and fewer than 2 scans; the error names the offending files."""
    paths = [Path(p) for p in paths]
    problems: dict[str, list[str]] = {}
    reader = sitk.ImageFileReader()
    for path in paths:
        reader.SetFileName(str(path))
        try:
            reader.ReadImageInformation()
        except RuntimeError:
            problems.setdefault("not images SimpleITK can read", []).append(str(path))
            continue
        size = reader.GetSize()
        if reader.GetDimension() != 3 or min(size) < 2:
            problems.setdefault("not 3-D volumes (2-D images or single slices)", []).append(
                f"{path} ({'x'.join(map(str, size))})"
            )
        elif reader.GetNumberOfComponents() != 1:
            problems.setdefault("not scalar images", []).append(str(path))
        elif reader.GetPixelID() in (
            sitk.sitkUInt8,
            sitk.sitkUInt16,
            sitk.sitkUInt32,
            sitk.sitkUInt64,
        ):
            problems.setdefault(
                "unsigned integer images, which cannot hold Hounsfield units (label maps?)", []
            ).append(str(path))
    if problems:
        parts = [
            f"{len(files)} {kind}: {', '.join(files[:_SHOW])}{' ...' if len(files) > _SHOW else ''}"
            for kind, files in problems.items()
        ]
        raise InputError(
            "Some training inputs cannot be used as CT scans. "
            + "; ".join(parts)
            + ". Train on 3-D CT volumes in Hounsfield units (NIfTI, NRRD, MHA ...; convert DICOM "
            "series to one volume file each), and leave other files out with --exclude-pattern."
        )
    if len(paths) < 2:
        raise InputError(
            f"Training needs at least 2 scans (negatives come from other volumes); found "
            f"{len(paths)}{': ' + str(paths[0]) if paths else ''}. Give more scans."
        )
    return paths


# --- checkpoints -------------------------------------------------------------------------------


@dataclass
class TrainingState:
    """Everything that evolves during training."""

    model: SAMNetwork
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    device: torch.device
    iteration: int = 0  # iterations done
    probe: torch.nn.Module | None = None  # the relative-position probe, never in the final weights


def new_training_state(config: SAMTrainConfig, device: torch.device) -> TrainingState:
    """A freshly initialised network (seeded) with its optimiser and loss scaler."""
    torch.manual_seed(config.seed)
    model = SAMNetwork(config.width, config.embedding_dim)
    if config.init_weights is not None:
        model.load_state_dict(_initial_weights(config).state_dict())
    model = model.to(device).train()
    probe = None
    parameters = list(model.parameters())
    if config.loss.position_weight > 0:
        probe = make_probe(config.embedding_dim).to(device).train()
        parameters += list(probe.parameters())
    if config.optimizer == "adam":
        optimizer: torch.optim.Optimizer = torch.optim.Adam(
            parameters, lr=config.lr, weight_decay=config.weight_decay
        )
    else:
        optimizer = torch.optim.SGD(
            parameters,
            lr=config.lr,
            momentum=config.momentum,
            weight_decay=config.weight_decay,
        )
    amp = config.mixed_precision and device.type == "cuda"
    scaler = torch.amp.GradScaler(device.type, enabled=amp)
    return TrainingState(model, optimizer, scaler, device, probe=probe)


def _initial_weights(config: SAMTrainConfig) -> SAMNetwork:
    """The network in ``init_weights``, refused unless it has the run's width and embedding size."""
    start = load_sam_checkpoint(config.init_weights)
    if (start.width, start.embedding_dim) != (config.width, config.embedding_dim):
        raise ConfigError(
            f"The initial weights {config.init_weights} are a network of width {start.width:g} "
            f"with {start.embedding_dim}-d embeddings, but this run trains width "
            f"{config.width:g} with {config.embedding_dim}-d embeddings. Train the weights' own "
            f"network: --width {start.width:g}, or leave --width out to take it from the weights."
        )
    return start


def save_training_checkpoint(
    state: TrainingState, config: SAMTrainConfig, scans: Sequence[Path], path: Path
) -> None:
    """Write model, optimiser, scaler, random states and iteration atomically."""
    payload = {
        "format": CHECKPOINT_FORMAT,
        "config": config.to_dict(),
        "scans": [str(p) for p in scans],
        # "state_dict" and "meta" make the file loadable by load_sam_checkpoint as it is.
        "meta": {"width": state.model.width, "embedding_dim": state.model.embedding_dim},
        **training_payload(state),
        "probe": state.probe.state_dict() if state.probe is not None else {},
    }
    write_checkpoint(payload, path)


def load_training_checkpoint(path: Path) -> dict[str, Any]:
    """Read a train-sam checkpoint safely and check its layout."""
    required = ("iteration", "config", "scans", "state_dict", "optimizer", "scaler", "rng")
    return read_checkpoint(path, CHECKPOINT_FORMAT, required, "train-sam")


def _check_same_run(
    payload: dict[str, Any], config: SAMTrainConfig, scans: Sequence[Path], path: Path
) -> None:
    stored = SAMTrainConfig.from_dict(payload["config"]).to_dict()
    resumable = RESUMABLE_CHANGES
    if config.lr_schedule == "cosine":  # the decay is spread over the planned iterations
        resumable = tuple(name for name in resumable if name != "iterations")
    check_same_settings(stored, config.to_dict(), resumable, path)
    if [str(p) for p in scans] != list(payload["scans"]):
        raise ConfigError(
            f"Cannot resume from {path}: the training scans differ from the interrupted run's "
            f"({len(payload['scans'])} then, {len(scans)} now). Give the same scans and exclude "
            "patterns, or start a new run in another output folder."
        )


# --- training ----------------------------------------------------------------------------------


def learning_rate(config: SAMTrainConfig, iteration: int) -> float:
    """Linear warm-up over ``warmup_iterations``, then constant or a cosine decay towards 0."""
    if iteration < config.warmup_iterations:
        return config.lr * (iteration + 1) / config.warmup_iterations
    if config.lr_schedule == "constant":
        return config.lr
    done = (iteration - config.warmup_iterations) / max(
        1, config.iterations - config.warmup_iterations
    )
    return config.lr * 0.5 * (1.0 + math.cos(math.pi * done))


def train_step(state: TrainingState, batch: PairBatch, config: SAMTrainConfig) -> run.LossTerms:
    """One SGD step on one batch (autocast + loss scaling on CUDA); returns the loss terms."""
    for group in state.optimizer.param_groups:
        group["lr"] = learning_rate(config, state.iteration)
    batch = batch.to(state.device)
    with torch.autocast(state.device.type, dtype=torch.float16, enabled=state.scaler.is_enabled()):
        local, global_ = state.model(batch.images)
    terms = sam_loss(local, global_, batch, config.loss)
    position = terms.total.new_zeros(())
    if state.probe is not None:
        position = position_loss(state.probe, global_, batch, config.loss.position_samples)
        terms.total = terms.total + config.loss.position_weight * position
    terms.parts["position"] = position
    run.optimizer_step(state, terms, "SAM", "Lower --lr or lengthen the warm-up.")
    return terms


def _train_loop(
    state: TrainingState,
    config: SAMTrainConfig,
    dataset: CropPairDataset | CrossPatientDataset,
    paths: Sequence[Path],
    output_dir: Path,
    workers: int,
    progress: run.Progress | None,
) -> None:
    # The loader gets its own generator: drawing its seed from the global one would shift the
    # global random stream at every (re)start and break exact resumption.
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=None,
        sampler=range(state.iteration, config.iterations),
        num_workers=workers,
        generator=torch.Generator().manual_seed(config.seed),
    )
    save = partial(save_training_checkpoint, state, config, paths)
    with run.StepLog(
        state, output_dir, LOG_HEADER, config.iterations, config, progress, save
    ) as steps:
        for batch in loader:
            terms = train_step(state, batch, config)
            steps.record(terms, f"{learning_rate(config, state.iteration - 1):.6g}")


def train_sam(
    scans: Sequence[str | os.PathLike[str]],
    output_dir: str | os.PathLike[str],
    config: SAMTrainConfig | None = None,
    progress: run.Progress | None = None,
    resume: bool = False,
) -> Path:
    """Train SAM on ``scans`` (files, checked before any work) and return the final weights file.

    Never train on scans used for evaluation. ``output_dir`` receives checkpoints, ``train_log.tsv``
    (loss per iteration), ``train_config.json``, a cache of body masks and the final
    ``sam_trained.pth`` (loadable with ``load_sam_checkpoint``). With ``resume=True`` the run
    continues from the latest checkpoint in ``output_dir`` as if it had not stopped.
    """
    config = config or SAMTrainConfig()
    config.validate()
    paths = check_scan_files(scans)
    pair_files = load_pair_maps(config.pair_maps, paths) if config.pair_maps is not None else []
    output_dir = Path(output_dir)
    device = resolve_device(config.device)
    existing = run.existing_checkpoints(output_dir, resume)
    state = new_training_state(config, device)  # refuses unusable initial weights
    output_dir.mkdir(parents=True, exist_ok=True)
    log.info("Training SAM on %d scans on %s; outputs in %s", len(paths), device, output_dir)
    if config.batch > len(paths):
        log.warning(
            "batch %d is larger than the %d scans: some pairs share a scan, so some cross-volume "
            "negatives come from the same volume. Use more scans or a smaller --batch.",
            config.batch,
            len(paths),
        )
    path = existing[-1][1] if existing else None
    payload = load_training_checkpoint(path) if path is not None else None
    if payload is not None:
        _check_same_run(payload, config, paths, path)
    run.restore_or_start(state, payload, path, resume, output_dir, "SAM")
    if payload is not None and state.probe is not None:
        state.probe.load_state_dict(payload["probe"])
    record: dict[str, Any] = {"config": config.to_dict(), "scans": [str(p) for p in paths]}
    if config.init_weights is not None:
        record["init_weights_sha256"] = file_sha256(Path(config.init_weights))
    (output_dir / run.CONFIG_FILE).write_text(json.dumps(record, indent=2))

    workers = config.workers if config.workers is not None else (4 if device.type == "cuda" else 0)
    dataset: CropPairDataset | CrossPatientDataset
    if pair_files:
        log.info(
            "Cross-patient pairs: %.0f %% of the crop pairs, through %d cached maps",
            100 * config.cross_patient_share,
            len(pair_files),
        )
        dataset = CrossPatientDataset(
            paths,
            pair_files,
            config.crops,
            config.batch,
            config.seed,
            config.cross_patient_share,
            config.cross_patient_min_similarity,
            output_dir / run.CACHE_DIR,
        )
    else:
        dataset = CropPairDataset(
            paths, config.crops, config.batch, config.seed, output_dir / run.CACHE_DIR
        )
    remedy = "Lower --batch, --patch or --width, then continue with --resume."
    with run.memory_advice(device, "SAM", remedy):
        _train_loop(state, config, dataset, paths, output_dir, workers, progress)
    final = output_dir / FINAL_WEIGHTS
    meta = {
        "iterations": state.iteration,
        "seed": config.seed,
        "patch": list(config.crops.patch),
        "scans": len(paths),
    }
    if config.pair_maps is not None:
        meta["cross_patient_share"] = config.cross_patient_share
    if config.init_weights is not None:
        meta["init_weights"] = Path(config.init_weights).name
        meta["init_weights_sha256"] = record["init_weights_sha256"]
    save_sam_checkpoint(state.model, final, meta=meta)
    return final
