"""What ``train_sam`` and ``train_deform`` share around their step: the loss terms, the optimiser
step, the per-iteration log with its checkpoint cadence, and the output folder's checks."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import torch

from ..errors import ConfigError, OutputError
from .checkpoints import TrainingState, checkpoint_path, list_checkpoints, remove_old_checkpoints

LOG_FILE = "train_log.tsv"
CACHE_DIR = "cache"
CONFIG_FILE = "train_config.json"

#: ``progress(iterations_done, iterations_total, loss)``, called after every iteration.
Progress = Callable[[int, int, float], None]


@dataclass
class LossTerms:
    """A training loss and its named parts, in the order of the log's columns."""

    total: torch.Tensor
    parts: dict[str, torch.Tensor]


def existing_checkpoints(output_dir: Path, resume: bool) -> list[tuple[int, Path]]:
    """The checkpoints already in ``output_dir``; refused unless the run is to be resumed."""
    existing = list_checkpoints(output_dir)
    if existing and not resume:
        raise OutputError(
            f"{output_dir} already holds checkpoints of a training run (latest: "
            f"{existing[-1][1].name}). Resume it with --resume, or choose another output folder."
        )
    return existing


def optimizer_step(state: TrainingState, terms: LossTerms, run: str, remedy: str) -> None:
    """Back-propagate ``terms.total`` and step (with loss scaling where enabled); refuse a
    non-finite loss, which without loss scaling means the ``run`` diverged."""
    if not state.scaler.is_enabled() and not torch.isfinite(terms.total):
        raise ConfigError(
            f"{run} training diverged at iteration {state.iteration + 1} (loss "
            f"{terms.total.item()}). {remedy}"
        )
    state.optimizer.zero_grad(set_to_none=True)
    state.scaler.scale(terms.total).backward()
    state.scaler.step(state.optimizer)
    state.scaler.update()
    state.iteration += 1


class StepLog:
    """One log line per iteration (iteration, loss, its parts, extra columns, seconds), progress,
    and a checkpoint every ``every`` iterations and at the last one, keeping the ``keep`` newest."""

    def __init__(
        self,
        log_file: TextIO,
        total: int,
        every: int,
        keep: int,
        progress: Progress | None,
        save: Callable[[Path], None],
    ) -> None:
        self.log_file, self.total, self.every, self.keep = log_file, total, every, keep
        self.progress, self.save = progress, save
        self.output_dir = Path(log_file.name).parent
        self.tick = time.perf_counter()

    def record(self, iteration: int, terms: LossTerms, *extra: str) -> None:
        loss = terms.total.item()
        now = time.perf_counter()
        parts = (f"{part.item():.6f}" for part in terms.parts.values())
        columns = "\t".join(
            [str(iteration), f"{loss:.5f}", *parts, *extra, f"{now - self.tick:.3f}"]
        )
        self.log_file.write(columns + "\n")
        self.tick = now
        if self.progress is not None:
            self.progress(iteration, self.total, loss)
        if iteration % self.every == 0 or iteration == self.total:
            self.log_file.flush()
            self.save(checkpoint_path(self.output_dir, iteration))
            remove_old_checkpoints(self.output_dir, self.keep)
