"""What ``train_sam`` and ``train_deform`` share around their step: the loss terms, the optimiser
step, the per-iteration log with its checkpoint cadence, and the output folder's checks."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError, DeviceError, OutputError
from .checkpoints import (
    TrainingState,
    checkpoint_path,
    list_checkpoints,
    prepare_log,
    remove_old_checkpoints,
    restore,
)

log = logging.getLogger(__name__)

LOG_FILE = "train_log.tsv"
CACHE_DIR = "cache"
CONFIG_FILE = "train_config.json"  # the run's settings and inputs

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


def restore_or_start(
    state: TrainingState,
    payload: dict[str, Any] | None,
    path: Path | None,
    resume: bool,
    output_dir: Path,
    what: str,
) -> None:
    """Put the checkpoint ``payload`` read from ``path`` into ``state``; without one, say that a
    resumed ``what`` run starts afresh."""
    if payload is not None:
        restore(state, payload, path)
        log.info("Resuming %s training from %s (iteration %d)", what, path, state.iteration)
    elif resume:
        log.warning("No checkpoint in %s: starting a new %s training run.", output_dir, what)


@contextmanager
def memory_advice(device: torch.device, what: str, remedy: str) -> Iterator[None]:
    """Turn running out of device memory during ``what`` training into a DeviceError."""
    try:
        yield
    except torch.OutOfMemoryError as err:
        raise DeviceError(
            f"The {device.type.upper()} ran out of memory during {what} training. {remedy}"
        ) from err


def optimizer_step(state: TrainingState, terms: LossTerms, what: str, remedy: str) -> None:
    """Back-propagate ``terms.total`` and step (with loss scaling where enabled); refuse a
    non-finite loss, which without loss scaling means the ``what`` training diverged."""
    if not state.scaler.is_enabled() and not torch.isfinite(terms.total):
        raise ConfigError(
            f"{what} training diverged at iteration {state.iteration + 1} (loss "
            f"{terms.total.item()}). {remedy}"
        )
    state.optimizer.zero_grad(set_to_none=True)
    state.scaler.scale(terms.total).backward()
    state.scaler.step(state.optimizer)
    state.scaler.update()
    state.iteration += 1


class StepLog:
    """The run's log, one line per iteration (iteration, loss, its parts, extra columns, seconds),
    written line by line to be followed; progress; and a checkpoint every ``checkpoint_every``
    iterations and at the last one, keeping the ``keep_checkpoints`` newest (``config``'s)."""

    def __init__(
        self,
        state: TrainingState,
        output_dir: Path,
        header: str,
        total: int,
        config: Any,
        progress: Progress | None,
        save: Callable[[Path], None],
    ) -> None:
        self.state, self.output_dir, self.total, self.config = state, output_dir, total, config
        self.progress, self.save = progress, save
        self.path = output_dir / LOG_FILE
        prepare_log(self.path, header, state.iteration)

    def __enter__(self) -> StepLog:
        self.file = open(self.path, "a", buffering=1)
        self.tick = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.file.close()

    def record(self, terms: LossTerms, *extra: str) -> None:
        """Log the iteration just done, report progress and write a checkpoint when one is due."""
        iteration, loss = self.state.iteration, terms.total.item()
        now = time.perf_counter()
        parts = (f"{part.item():.6f}" for part in terms.parts.values())
        columns = [str(iteration), f"{loss:.5f}", *parts, *extra, f"{now - self.tick:.3f}"]
        self.file.write("\t".join(columns) + "\n")
        self.tick = now
        if self.progress is not None:
            self.progress(iteration, self.total, loss)
        if iteration % self.config.checkpoint_every == 0 or iteration == self.total:
            self.file.flush()
            self.save(checkpoint_path(self.output_dir, iteration))
            remove_old_checkpoints(self.output_dir, self.config.keep_checkpoints)
