"""Time every stage on the packed pairs and score each run with Dice on the working grid.

On CUDA each stage is timed with CUDA events (``torch.cuda.Event``) and the peak GPU memory of each
pair is read after it; on the CPU, plain ``perf_counter``. The first pair of every variant runs
once untimed first (warm-up: kernels, cuDNN choices, caches). ``pack.py`` runs the same code on the
CPU to record the reference Dice that the device run is checked against.
"""

from __future__ import annotations

import contextlib
import time
import traceback
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import packed
import stages
import torch

from SAMERegistrationLib.errors import InputError, RegistrationFailed

DICE_TOLERANCE = 0.01  # the largest CUDA-vs-CPU difference in mean Dice that counts as agreeing


class StageTimer:
    """Seconds per named section: CUDA events on a GPU, ``perf_counter`` on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.seconds: dict[str, float] = {}
        self._events: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []

    @contextlib.contextmanager
    def section(self, name: str) -> Iterator[None]:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._events.append((name, start, end))
        else:
            tick = time.perf_counter()
            yield
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - tick

    def result(self) -> dict[str, float]:
        if self.cuda:
            torch.cuda.synchronize()
            for name, start, end in self._events:
                self.seconds[name] = self.seconds.get(name, 0.0) + start.elapsed_time(end) / 1e3
            self._events.clear()
        return {name: round(s, 4) for name, s in self.seconds.items()}


def load_pair_images(folder: Path, names: set[str]) -> dict[str, packed.PackedImage]:
    return {name: packed.read_image(folder, name) for name in sorted(names)}


def _working(image: packed.PackedImage):
    return stages.working_image(image.hu, image.body, image.spacing, image.origin, image.direction)


def run_pair(
    fixed: packed.PackedImage,
    moving: packed.PackedImage,
    models: stages.Models,
    device: torch.device,
) -> dict:
    """One timed registration: seconds per stage and in total, peak GPU memory, Dice per stage."""
    timer = StageTimer(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    fixed_work, moving_work = _working(fixed), _working(moving)
    try:
        with timer.section("total"):
            run = stages.register_working(fixed_work, moving_work, models, device, timer.section)
    except (RegistrationFailed, InputError) as err:  # the pipeline refuses the pair
        timer.result()
        return {"status": "refused", "error": str(err).splitlines()[0][:300]}
    seconds = timer.result()
    result = {
        "status": "ok",
        "seconds": {k: v for k, v in seconds.items() if k != "total"},
        "total_s": seconds["total"],
        "dice": {
            stage: round(
                stages.mean_dice_after(
                    fixed.labels, moving.labels, moving_work.grid, alignment, fixed_work.grid
                ),
                4,
            )
            for stage, alignment in run.after.items()
        },
    }
    if device.type == "cuda":
        result["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return result


def run_variant(
    folder: Path,
    pairs: list[dict],
    variant: str,
    device: torch.device,
    deadline: float = float("inf"),
    warmup: bool = True,
    log=print,
    previous: dict | None = None,
    save=None,
) -> dict:
    """Every pair of one variant; pairs left when ``deadline`` (perf_counter) passes are skipped.

    Pairs with a result in ``previous`` (a run of this function) keep it; ``save(run)`` is called
    after every pair, so that a long CPU run can stop and continue.
    """
    done = {p["pair"]: p for p in (previous or {}).get("pairs", []) if p["status"] == "ok"}
    images = load_pair_images(folder, {p["fixed"] for p in pairs} | {p["moving"] for p in pairs})
    models = stages.load_models(variant, device)
    out: dict = {"deform": models.deform_note, "pairs": []}
    if warmup and pairs:
        tick = time.perf_counter()
        run_pair(images[pairs[0]["fixed"]], images[pairs[0]["moving"]], models, device)
        out["warmup_s"] = round(time.perf_counter() - tick, 3)
    for pair in pairs:
        label = f"{pair['fixed']} <- {pair['moving']}"
        if label in done:
            out["pairs"].append(done[label])
            continue
        if time.perf_counter() > deadline:
            out["pairs"].append({"pair": label, "status": "not run (time budget)"})
            continue
        try:
            result = run_pair(images[pair["fixed"]], images[pair["moving"]], models, device)
        except Exception as err:  # one failing pair must not lose the others' figures
            result = {"status": "failed", "error": f"{type(err).__name__}: {err}"[:500]}
            log(traceback.format_exc())
        out["pairs"].append({"pair": label, **result})
        log(f"  {variant} {label}: {_short(result)}")
        if save is not None:
            save(out)
    return out


def _short(result: dict) -> str:
    if result["status"] != "ok":
        return f"{result['status']}: {result.get('error', '')[:120]}"
    dice = ", ".join(f"{k} {v:.3f}" for k, v in result["dice"].items())
    return f"{result['total_s']:.2f} s, Dice {dice}"


def compare_with_cpu(device_run: dict, cpu_run: dict) -> dict:
    """Per pair and stage, |device Dice - CPU Dice|; agreement when all are within tolerance."""
    cpu_pairs = {p["pair"]: p for p in cpu_run["pairs"]}
    differences, mismatched_status = [], []
    for pair in device_run["pairs"]:
        reference = cpu_pairs.get(pair["pair"])
        if reference is None or pair["status"].startswith("not run"):
            continue
        if pair["status"] != reference["status"]:
            mismatched_status.append(pair["pair"])
            continue
        for stage, value in pair.get("dice", {}).items():
            if stage in reference.get("dice", {}):
                differences.append(abs(value - reference["dice"][stage]))
                pair.setdefault("dice_cpu", {})[stage] = reference["dice"][stage]
    largest = max(differences) if differences else None
    return {
        "pairs_with_cpu_result": len(cpu_pairs),
        "compared": len(differences),
        "max_abs_dice_difference": None if largest is None else round(largest, 4),
        "status_differs": mismatched_status,
        "agree": bool(differences) and largest <= DICE_TOLERANCE and not mismatched_status,
    }


def summarise(variant_run: dict) -> dict:
    """Mean seconds per stage and in total, mean Dice per stage, peak memory, over the ok pairs."""
    ok = [p for p in variant_run["pairs"] if p["status"] == "ok"]
    if not ok:
        return {"pairs_ok": 0, "pairs": len(variant_run["pairs"])}
    stage_names = [s for s in ("total", *stages.STAGES) if s == "total" or s in ok[0]["seconds"]]
    seconds = {
        s: round(float(np.mean([p["total_s"] if s == "total" else p["seconds"][s] for p in ok])), 4)
        for s in stage_names
    }
    dice = {s: round(float(np.mean([p["dice"][s] for p in ok])), 4) for s in ok[0]["dice"]}
    summary = {"pairs_ok": len(ok), "pairs": len(variant_run["pairs"]), "mean_seconds": seconds}
    summary["mean_dice"] = dice
    peaks = [p["peak_gpu_mb"] for p in ok if "peak_gpu_mb" in p]
    if peaks:
        summary["peak_gpu_mb"] = max(peaks)
    return summary
