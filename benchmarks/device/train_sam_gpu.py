"""Train SAM on a GPU from the packed volumes, within a time budget (torch and numpy only).

    python benchmarks/device/train_sam_gpu.py --out "$OUT" --budget-s 300
    python benchmarks/device/train_sam_gpu.py --out "$OUT" --variant cross  # + packed maps if any
    python benchmarks/device/train_sam_gpu.py --out /tmp/t --tiny          # CPU smoke run

The official regime (sam-cross-patient.md section 1): width 0.5, SGD lr 0.02 with momentum 0.9 and
weight decay 1e-4, a linear warm-up over 500 iterations then a constant rate, fp16 or bf16
autocast, 3 crop pairs per step (two crops of one volume each, U(0.8, 1.2) x 2 mm, 32 x 96 x 96,
overlapping per axis with probability 0.8), the library's local + global InfoNCE. The views are
drawn with the library's crop geometry (``train/views.py``) and rendered on the GPU by trilinear
sampling of the packed uint8 volumes, so nothing leaves the device but the loss.

``--variant cross`` adds what the notes propose for cross-patient matching: a relative-position
probe (a linear map of the difference of two global embeddings to the mm offset between their
voxels, discarded after training), queries inside the body only, and a 20 mm local ignore radius.

The schedule is driven by elapsed time: training stops ``--budget-s`` seconds after it starts
(``--lr-schedule cosine`` decays the rate along the elapsed share of the budget). Every
``--checkpoint-s`` seconds the weights are written, in float16 and the library's SAM weights format,
as byte shards of at most 15 MiB (``sam_gpu.pth.part0``, ``.part1``, ...) that replace the previous
ones; the last write is the final model. Join them with ``cat sam_gpu.pth.part* > sam_gpu.pth``
and register with ``--features sam --weights sam_gpu.pth``.

Pair sources are pluggable (``PairSource``): ``SelfPairs`` draws two crops of one volume;
``CrossPairs`` makes a share of the crop pairs (``--cross-share``, 0.5 by default with ``--variant
cross`` when the data folder holds packed maps, ``pack.py --pair-maps``) cross-patient, as the
library's ``train/cross_patient.py`` does: both views are laid out in the fixed volume's space, the
first shows the fixed volume and the second the moving volume pulled through the map
``p -> affine (p + field(p))`` (rendered on the device by trilinear sampling), so the two views
share one frame and the loss finds positives as for two crops of one volume. The global loss uses
every valid voxel (positives within its radius); the local loss only voxels where the map's local
similarity reaches ``--min-similarity`` (0.3), with the library's cross-patient positive radius
(8 mm) and ignore radius (20 mm). The remaining pairs are ``SelfPairs``.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import os
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

KIT = Path(__file__).resolve().parent
REPO = KIT.parent.parent
for path in (str(REPO), str(KIT)):
    if path not in sys.path:
        sys.path.insert(0, path)

import numpy as np  # noqa: E402
import packed  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from SAMERegistrationLib.features.sam_network import SAMNetwork  # noqa: E402
from SAMERegistrationLib.train.sam_losses import LossConfig, sam_loss  # noqa: E402
from SAMERegistrationLib.train.views import (  # noqa: E402
    CropConfig,
    PairBatch,
    View,
    ViewGeometry,
    draw_pair_geometry,
    view_targets,
)

WEIGHTS_NAME = "sam_gpu.pth"
SHARD_BYTES = 15 * 2**20
LOG_NAME = "train_log.tsv"
POSITION_SCALE_MM = 100.0  # the probe predicts offsets in units of 100 mm


@dataclass(frozen=True)
class TrainSettings:
    width: float = 0.5
    embedding_dim: int = 128
    batch: int = 3  # crop pairs per step
    lr: float = 0.02
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_iterations: int = 500
    lr_schedule: str = "constant"  # or cosine over the elapsed share of the budget
    precision: str = "bf16"  # bf16, fp16 (with loss scaling) or fp32; autocast on CUDA only
    variant: str = "official"  # or cross
    probe_weight: float = 1.0
    cross_share: float = 0.5  # with --variant cross and packed maps: cross-patient crop pairs
    min_similarity: float = 0.3  # the local loss of cross pairs trusts the map from here on
    seed: int = 0
    crops: CropConfig = CropConfig()
    loss: LossConfig = LossConfig()


TINY = {
    "width": 0.125,
    "embedding_dim": 16,
    "batch": 2,
    "warmup_iterations": 2,
    "crops": CropConfig(patch=(16, 32, 32), min_overlap_voxels=(3, 6, 6)),
    "loss": LossConfig(local_queries=20, local_hard=50, local_diverse=20, global_cross=20),
}


class PairSource(Protocol):
    """Where crop pairs come from: ``draw`` returns the batch of one step."""

    def draw(self, rng: np.random.Generator) -> PairBatch: ...


@dataclass
class CropPair:
    """The two rendered views of one crop pair (images on the device) with their geometry."""

    images: list[torch.Tensor]  # two (1, D, H, W)
    views: list[View]  # geometry and validity (``reliable`` where the local loss may use a voxel)
    name: str
    cross_patient: bool


class SelfPairs:
    """Two crops of one volume (SAM's pairs), rendered on the device from the packed volumes."""

    def __init__(
        self,
        volumes: list[packed.TrainVolume],
        crops: CropConfig,
        pairs: int,
        device: torch.device,
        body_only: bool = False,
    ) -> None:
        self.volumes = volumes
        self.tensors = [torch.as_tensor(v.values, device=device)[None, None] for v in volumes]
        self.crops, self.pairs, self.device, self.body_only = crops, pairs, device, body_only

    def draw(self, rng: np.random.Generator) -> PairBatch:
        chosen = self.choose(rng)
        return _batch([self.pair(int(index), rng) for index in chosen], self.device)

    def choose(self, rng: np.random.Generator) -> np.ndarray:
        """The volumes of one step's pairs: different ones while there are enough."""
        return rng.choice(len(self.volumes), self.pairs, replace=self.pairs > len(self.volumes))

    def pair(self, index: int, rng: np.random.Generator) -> CropPair:
        images, views = [], []
        for geometry in draw_pair_geometry(rng, self.volumes[index], self.crops):
            image, valid = self._render(index, geometry, rng)
            images.append(image)
            views.append(View(None, geometry.axes_mm(), valid))  # type: ignore[arg-type]
        return CropPair(images, views, self.volumes[index].name, cross_patient=False)

    def _render(
        self, index: int, geometry: ViewGeometry, rng: np.random.Generator
    ) -> tuple[torch.Tensor, np.ndarray]:
        volume, tensor = self.volumes[index], self.tensors[index]
        axes = geometry.axes_mm()  # z, y, x coordinates, mm
        size_zyx = tensor.shape[2:]
        position = [
            (axes[a] - volume.origin[2 - a]) / volume.spacing[2 - a] for a in range(3)
        ]  # continuous voxel index along z, y, x
        inside = [(p >= -0.5) & (p <= n - 0.5) for p, n in zip(position, size_zyx)]
        valid = inside[0][:, None, None] & inside[1][None, :, None] & inside[2][None, None, :]
        normalised = [
            torch.as_tensor(p / max(n - 1, 1) * 2 - 1, dtype=torch.float32, device=self.device)
            for p, n in zip(position, size_zyx)
        ]
        z, y, x = torch.meshgrid(*normalised, indexing="ij")
        grid = torch.stack([x, y, z], dim=-1)[None]
        # Outside the volume the zero padding is air (0 in the packed scale, -50 for SAM).
        image = F.grid_sample(tensor.float(), grid, align_corners=True, padding_mode="zeros")
        image = image[0] - packed.SAM_OFFSET
        if self.crops.noise_std > 0:
            image = image + torch.randn_like(image) * float(rng.uniform(0, self.crops.noise_std))
        if self.body_only:
            nearest = F.grid_sample(tensor.float(), grid, mode="nearest", align_corners=True)
            valid = valid & (nearest[0, 0] > 0).cpu().numpy()
        return image, valid


class CrossPairs:
    """With probability ``share`` per crop pair, a cross-patient pair through a random packed map
    (``train/cross_patient.py`` on the device); otherwise a pair of ``SelfPairs``."""

    def __init__(
        self,
        self_pairs: SelfPairs,
        maps: list[packed.PackedMap],
        share: float,
        min_similarity: float,
    ) -> None:
        index = {volume.name: i for i, volume in enumerate(self_pairs.volumes)}
        device = self_pairs.device
        self.self_pairs, self.share, self.min_similarity = self_pairs, share, min_similarity
        self.maps = [_DeviceMap(index[m.fixed], index[m.moving], m, device) for m in maps]
        self.cross_drawn = 0

    def draw(self, rng: np.random.Generator) -> PairBatch:
        pairs = []
        for index in self.self_pairs.choose(rng):
            if rng.random() < self.share:
                pairs.append(self.cross_pair(self.maps[rng.integers(len(self.maps))], rng))
                self.cross_drawn += 1
            else:
                pairs.append(self.self_pairs.pair(int(index), rng))
        return _batch(pairs, self.self_pairs.device)

    def cross_pair(self, pair_map: _DeviceMap, rng: np.random.Generator) -> CropPair:
        source = self.self_pairs
        fixed, moving = source.volumes[pair_map.fixed], source.volumes[pair_map.moving]
        first, second = draw_pair_geometry(rng, fixed, source.crops)
        image, valid = source._render(pair_map.fixed, first, rng)
        moved, moved_valid, reliable = self._render_through_map(pair_map, second, rng)
        views = [
            View(None, first.axes_mm(), valid),  # type: ignore[arg-type]
            View(None, second.axes_mm(), moved_valid, reliable),  # type: ignore[arg-type]
        ]
        return CropPair([image, moved], views, f"{fixed.name} <- {moving.name}", cross_patient=True)

    def _render_through_map(
        self, pair_map: _DeviceMap, geometry: ViewGeometry, rng: np.random.Generator
    ) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
        """The moving volume on a fixed-space view through the map: (image, valid, reliable).

        Valid where the view point lies in the map's box and its image in the moving volume (and,
        with ``body_only``, in its body); reliable where the map's confidence reaches
        ``min_similarity``."""
        source = self.self_pairs
        device = source.device
        axes = [torch.as_tensor(a, dtype=torch.float32, device=device) for a in geometry.axes_mm()]
        z, y, x = torch.meshgrid(*axes, indexing="ij")
        points = torch.stack([x, y, z], dim=-1)  # (D, H, W, 3), x, y, z mm
        moved = pair_map.map_points(points)
        volume = source.volumes[pair_map.moving]
        tensor = source.tensors[pair_map.moving].float()
        origin = torch.as_tensor(volume.origin, dtype=torch.float32, device=device)
        spacing = torch.as_tensor(volume.spacing, dtype=torch.float32, device=device)
        image = _sample_at(tensor, origin, spacing, moved, padding="zeros")
        image = image - packed.SAM_OFFSET  # outside the volume: air, as in SelfPairs
        if source.crops.noise_std > 0:
            image = image + torch.randn_like(image) * float(rng.uniform(0, source.crops.noise_std))
        index = (moved - origin) / spacing
        size = torch.as_tensor(tensor.shape[2:][::-1], dtype=torch.float32, device=device)
        valid = ((index >= -0.5) & (index <= size - 0.5)).all(dim=-1)
        valid &= ((points >= pair_map.valid_lo) & (points <= pair_map.valid_hi)).all(dim=-1)
        if source.body_only:
            body = _sample_at(tensor, origin, spacing, moved, padding="zeros", mode="nearest")
            valid &= body[0] > 0
        confidence = _sample_at(
            pair_map.confidence, pair_map.field_origin, pair_map.field_spacing, points
        )
        reliable = confidence[0] >= self.min_similarity * 255
        return image, valid.cpu().numpy(), reliable.cpu().numpy()


class _DeviceMap:
    """A packed map on the device: ``p -> linear (p + field(p)) + translation``."""

    def __init__(
        self, fixed: int, moving: int, pair_map: packed.PackedMap, device: torch.device
    ) -> None:
        def tensor(values) -> torch.Tensor:
            return torch.as_tensor(np.asarray(values, np.float32), device=device)

        self.fixed, self.moving = fixed, moving
        self.linear = tensor(pair_map.affine[:3, :3])
        self.translation = tensor(pair_map.affine[:3, 3])
        self.field = tensor(pair_map.field)[None]  # (1, 3, d, h, w)
        self.confidence = tensor(pair_map.confidence)[None, None]
        self.field_origin, self.field_spacing = (
            tensor(pair_map.field_origin),
            tensor(pair_map.field_spacing),
        )
        self.valid_lo, self.valid_hi = tensor(pair_map.valid_lo_mm), tensor(pair_map.valid_hi_mm)

    def map_points(self, points: torch.Tensor) -> torch.Tensor:
        """Fixed-space points (D, H, W, 3), x, y, z mm, to moving space."""
        field = _sample_at(self.field, self.field_origin, self.field_spacing, points)
        return (points + field.permute(1, 2, 3, 0)) @ self.linear.T + self.translation


def _sample_at(
    volume: torch.Tensor,
    origin: torch.Tensor,
    spacing: torch.Tensor,
    points: torch.Tensor,
    padding: str = "border",
    mode: str = "bilinear",
) -> torch.Tensor:
    """Trilinear (or nearest) values of a (1, C, d, h, w) volume on an identity-direction grid at
    points (D, H, W, 3) x, y, z mm -> (C, D, H, W); outside, the border value or zero."""
    size = torch.as_tensor(volume.shape[2:][::-1], dtype=torch.float32, device=points.device)
    grid = (points - origin) / spacing / (size - 1).clamp_min(1) * 2 - 1
    return F.grid_sample(volume, grid[None], mode=mode, padding_mode=padding, align_corners=True)[0]


def _batch(pairs: list[CropPair], device: torch.device) -> PairBatch:
    """The library's batch layout, with its loss targets (as ``views.collate_views``: the local
    targets only where a view is ``reliable``)."""
    local, global_ = view_targets([view for pair in pairs for view in pair.views])

    def axes(targets):
        return tuple(
            torch.as_tensor(np.stack([t[0][a] for t in targets]), dtype=torch.float32).to(device)
            for a in range(3)
        )

    def valid(targets):
        return torch.as_tensor(np.stack([t[1] for t in targets])).to(device)

    images = torch.stack([image for pair in pairs for image in pair.images])
    return PairBatch(
        images,
        axes(local),
        valid(local),
        axes(global_),
        valid(global_),
        [pair.name for pair in pairs],
        [pair.cross_patient for pair in pairs],
    )


def position_probe_loss(
    probe: torch.nn.Linear, global_: torch.Tensor, batch: PairBatch, samples: int = 64
) -> torch.Tensor:
    """Per pair: the probe maps g_b - g_a to the offset (mm / 100) between the two voxels."""
    terms = []
    for pair in range(global_.shape[0] // 2):
        points, features = [], []
        for view in (2 * pair, 2 * pair + 1):
            valid = batch.global_valid[view].reshape(-1).nonzero()[:, 0]
            if not valid.numel():
                break
            pick = valid[torch.randint(valid.numel(), (samples,), device=valid.device)]
            d, h, w = batch.global_valid.shape[1:]
            axes = [a[view] for a in batch.global_axes]
            points.append(
                torch.stack(
                    [axes[0][pick // (h * w)], axes[1][pick // w % h], axes[2][pick % w]], 1
                )
            )
            features.append(global_[view].float().reshape(global_.shape[1], -1)[:, pick].T)
        if len(points) == 2:
            offset = (points[1] - points[0]) / POSITION_SCALE_MM
            terms.append(F.mse_loss(probe(features[1] - features[0]), offset))
    return torch.stack(terms).mean() if terms else global_.sum() * 0.0


def write_weights(model: SAMNetwork, out: Path, meta: dict) -> dict:
    """The weights in float16, ``{"state_dict", "meta"}``, as byte shards replacing older ones."""
    state = {
        k: (v.detach().half() if v.is_floating_point() else v.detach()).cpu()
        for k, v in model.state_dict().items()
    }
    meta = {**meta, "width": model.width, "embedding_dim": model.embedding_dim}
    buffer = io.BytesIO()
    torch.save({"state_dict": state, "meta": meta}, buffer)
    data = buffer.getvalue()
    shards = []
    for i, start in enumerate(range(0, len(data), SHARD_BYTES)):
        name = f"{WEIGHTS_NAME}.part{i}"
        partial = out / f"{name}.tmp"
        partial.write_bytes(data[start : start + SHARD_BYTES])
        os.replace(partial, out / name)
        shards.append(name)
    for stale in out.glob(f"{WEIGHTS_NAME}.part*"):
        if stale.name not in shards:
            stale.unlink()
    return {"shards": shards, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def learning_rate(settings: TrainSettings, iteration: int, elapsed_share: float) -> float:
    warm = min(1.0, (iteration + 1) / max(settings.warmup_iterations, 1))
    if settings.lr_schedule == "cosine":
        return settings.lr * warm * 0.5 * (1.0 + math.cos(math.pi * min(elapsed_share, 1.0)))
    return settings.lr * warm


def train(
    volumes: list[packed.TrainVolume],
    out: Path,
    settings: TrainSettings,
    budget_s: float,
    device: torch.device,
    checkpoint_s: float = 60.0,
    source: PairSource | None = None,
    log=print,
    maps: list[packed.PackedMap] | None = None,
) -> dict:
    """Train until ``budget_s`` has passed; returns what was measured and where the weights are.

    With ``--variant cross`` and ``maps``, ``settings.cross_share`` of the crop pairs are
    cross-patient (``CrossPairs``)."""
    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(settings.seed)
    rng = np.random.default_rng(settings.seed)
    cross = settings.variant == "cross"
    loss_config = replace(settings.loss, local_ignore_mm=20.0) if cross else settings.loss
    if source is None:
        source = SelfPairs(volumes, settings.crops, settings.batch, device, body_only=cross)
        if cross and maps and settings.cross_share > 0:
            source = CrossPairs(source, maps, settings.cross_share, settings.min_similarity)
            log(f"  cross-patient pairs: {settings.cross_share:.0%} through {len(maps)} maps")
    model = SAMNetwork(settings.width, settings.embedding_dim).to(device).train()
    probe = torch.nn.Linear(settings.embedding_dim, 3).to(device) if cross else None
    parameters = list(model.parameters()) + (list(probe.parameters()) if probe else [])
    optimiser = torch.optim.SGD(
        parameters, lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay
    )
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True
        torch.cuda.reset_peak_memory_stats(device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(settings.precision)
    autocast = cuda and dtype is not None
    scaler = torch.amp.GradScaler("cuda", enabled=autocast and dtype == torch.float16)
    meta = {"regime": "official", "variant": settings.variant, "volumes": len(volumes)}
    if isinstance(source, CrossPairs):
        meta.update(pair_maps=len(source.maps), cross_share=settings.cross_share)
    iteration, last_checkpoint, curve, weights = 0, time.perf_counter(), [], {}
    step_times: list[float] = []
    with open(out / LOG_NAME, "w") as log_file:
        log_file.write("iteration\tseconds\tloss\tlocal\tglobal\tprobe\tlr\n")
        while iteration == 0 or time.perf_counter() - start < budget_s:  # at least one step
            tick = time.perf_counter()
            share = (tick - start) / budget_s
            for group in optimiser.param_groups:
                group["lr"] = learning_rate(settings, iteration, share)
            batch = source.draw(rng)
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=autocast):
                local, global_ = model(batch.images)
            terms = sam_loss(local, global_, batch, loss_config)
            total = terms.total
            probe_loss = torch.zeros((), device=device)
            if probe is not None:
                probe_loss = position_probe_loss(probe, global_, batch)
                total = total + settings.probe_weight * probe_loss
            optimiser.zero_grad(set_to_none=True)
            scaler.scale(total).backward()
            scaler.step(optimiser)
            scaler.update()
            iteration += 1
            if iteration % 10 == 0 or iteration <= 3:
                values = [
                    float(x.detach())
                    for x in (total, terms.parts["local"], terms.parts["global"], probe_loss)
                ]
                if not all(math.isfinite(v) for v in values) and not scaler.is_enabled():
                    raise SystemExit(f"error: training diverged at iteration {iteration}")
                elapsed = time.perf_counter() - start
                log_file.write(
                    f"{iteration}\t{elapsed:.1f}\t"
                    + "\t".join(f"{v:.4f}" for v in values)
                    + f"\t{optimiser.param_groups[0]['lr']:.5g}\n"
                )
                curve.append([iteration, round(elapsed, 1), round(values[0], 4)])
            step_times.append(time.perf_counter() - tick)
            if time.perf_counter() - last_checkpoint >= checkpoint_s:
                log_file.flush()
                meta.update(iterations=iteration, seconds=round(time.perf_counter() - start, 1))
                weights = write_weights(model, out, meta)
                last_checkpoint = time.perf_counter()
                log(f"  checkpoint at iteration {iteration} ({weights['bytes'] / 2**20:.1f} MiB)")
    meta.update(iterations=iteration, seconds=round(time.perf_counter() - start, 1))
    weights = write_weights(model, out, meta)
    steady = step_times[len(step_times) // 5 :] or step_times
    result = {
        "settings": {k: v for k, v in settings.__dict__.items() if k not in ("crops", "loss")},
        "patch": list(settings.crops.patch),
        "device": str(device),
        "iterations": iteration,
        "seconds": meta["seconds"],
        "steps_per_s": round(1.0 / float(np.mean(steady)), 3) if steady else None,
        "final_loss": curve[-1][2] if curve else None,
        "loss_curve": curve[:: max(1, len(curve) // 50)],
        "weights": weights,
        "pair_maps": meta.get("pair_maps", 0),
        "cross_pairs": getattr(source, "cross_drawn", 0),
    }
    if cuda:
        result["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=KIT / "data")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--budget-s", type=float, default=300.0)
    parser.add_argument("--checkpoint-s", type=float, default=60.0)
    parser.add_argument("--variant", choices=("official", "cross"), default="official")
    parser.add_argument("--precision", choices=("bf16", "fp16", "fp32"), default="bf16")
    parser.add_argument("--lr-schedule", choices=("constant", "cosine"), default="constant")
    parser.add_argument("--batch", type=int, default=3)
    parser.add_argument("--width", type=float, default=0.5)
    parser.add_argument(
        "--cross-share",
        type=float,
        default=None,
        help="share of cross-patient crop pairs (cross variant with packed maps: 0.5)",
    )
    parser.add_argument("--min-similarity", type=float, default=0.3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--tiny", action="store_true", help="a tiny network and crops (CPU smoke)")
    return parser.parse_args(argv)


def settings_from_args(args: argparse.Namespace) -> TrainSettings:
    settings = TrainSettings(
        width=args.width,
        batch=args.batch,
        precision=args.precision,
        lr_schedule=args.lr_schedule,
        variant=args.variant,
        cross_share=0.5 if args.cross_share is None else args.cross_share,
        min_similarity=args.min_similarity,
    )
    return replace(settings, **TINY) if args.tiny else settings


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from SAMERegistrationLib.device import resolve_device

    device = resolve_device(args.device)
    try:
        volumes = packed.read_training(args.data)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    maps = packed.read_pair_maps(args.data) if args.variant == "cross" else []
    names = {volume.name for volume in volumes}
    stray = [m for m in maps if not {m.fixed, m.moving} <= names]
    if stray:
        path = packed.map_path(args.data, stray[0].fixed, stray[0].moving)
        print(
            f"error: the packed map {path} joins volumes that are not packed for training; "
            "pack the training volumes and the maps together (pack.py --pair-maps)",
            file=sys.stderr,
        )
        return 2
    if args.cross_share is not None and not 0 <= args.cross_share <= 1:
        print(f"error: --cross-share {args.cross_share} is not a share in [0, 1]", file=sys.stderr)
        return 2
    if args.cross_share and not maps:
        folder = args.data / packed.MAPS_DIR
        print(
            f"error: --cross-share needs --variant cross and packed maps in {folder}; "
            "pack them with 'pack.py --pair-maps CACHE'",
            file=sys.stderr,
        )
        return 2
    result = train(
        volumes,
        args.out,
        settings_from_args(args),
        args.budget_s,
        device,
        args.checkpoint_s,
        maps=maps,
    )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
