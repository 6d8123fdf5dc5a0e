"""Train SAM on a GPU from the packed volumes, within a time budget (torch and numpy only).

    python benchmarks/device/train_sam_gpu.py --out "$OUT" --budget-s 300
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

Pair sources are pluggable (``PairSource``): ``SelfPairs`` draws two crops of one volume. A
map-based cross-patient source would read, per training pair, ``maps/<fixed>__<moving>.npz``
holding ``affine`` (4 x 4, fixed -> moving LPS mm), ``field`` (3, d, h, w) float16 displacement in
mm with ``field_spacing`` and ``field_origin`` (x, y, z) on an axis-aligned grid over the fixed
volume (the map is ``p -> affine (p + field(p))``, the library's convention), and optionally
``confidence`` (d, h, w) uint8; since its correspondences are not axis-aligned, it needs its own
positive lookup in the loss (the library's ``nearest_partners`` assumes the two views share axes).
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

from SAMERegistrationLib.features.sam_network import GLOBAL_STRIDE, LOCAL_STRIDE, SAMNetwork  # noqa: E402
from SAMERegistrationLib.train.sam_losses import LossConfig, sam_loss  # noqa: E402
from SAMERegistrationLib.train.views import (  # noqa: E402
    GLOBAL_OFFSET,
    LOCAL_OFFSET,
    CropConfig,
    PairBatch,
    View,
    ViewGeometry,
    draw_pair_geometry,
    feature_targets,
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
        chosen = rng.choice(len(self.volumes), self.pairs, replace=self.pairs > len(self.volumes))
        images, views, names = [], [], []
        for index in chosen:
            volume = self.volumes[index]
            for geometry in draw_pair_geometry(rng, volume, self.crops):
                image, valid = self._render(index, geometry, rng)
                images.append(image)
                views.append(View(None, geometry.axes_mm(), valid))  # type: ignore[arg-type]
            names.append(volume.name)
        return _batch(torch.stack(images), views, names, self.device)

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


def _batch(
    images: torch.Tensor, views: list[View], names: list[str], device: torch.device
) -> PairBatch:
    """The library's batch layout, with its loss targets (``views.feature_targets``)."""
    local = [feature_targets(v, LOCAL_STRIDE, LOCAL_OFFSET) for v in views]
    global_ = [feature_targets(v, GLOBAL_STRIDE, GLOBAL_OFFSET) for v in views]

    def axes(targets):
        return tuple(
            torch.as_tensor(np.stack([t[0][a] for t in targets]), dtype=torch.float32).to(device)
            for a in range(3)
        )

    def valid(targets):
        return torch.as_tensor(np.stack([t[1] for t in targets])).to(device)

    return PairBatch(images, axes(local), valid(local), axes(global_), valid(global_), names)


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
) -> dict:
    """Train until ``budget_s`` has passed; returns what was measured and where the weights are."""
    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(settings.seed)
    rng = np.random.default_rng(settings.seed)
    cross = settings.variant == "cross"
    loss_config = replace(settings.loss, local_ignore_mm=20.0) if cross else settings.loss
    source = source or SelfPairs(volumes, settings.crops, settings.batch, device, body_only=cross)
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
    result = train(
        volumes, args.out, settings_from_args(args), args.budget_s, device, args.checkpoint_s
    )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
