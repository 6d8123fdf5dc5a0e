"""What the training commands (``train-sam``, ``train-deform``) share: run options, progress
bars and the message of an interrupted run."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from .checkpoints import list_checkpoints


def add_input_arguments(parser: argparse.ArgumentParser) -> None:
    """The scans (files or folders), -o/--output and --exclude-pattern."""
    parser.add_argument(
        "scans",
        nargs="+",
        help="CT volumes in Hounsfield units (NIfTI, NRRD, MHA ...), or folders holding only such "
        "files (their sub-folders and hidden files are ignored)",
    )
    parser.add_argument("-o", "--output", required=True, type=Path, help="output folder")
    parser.add_argument(
        "--exclude-pattern",
        action="append",
        default=[],
        metavar="PATTERN",
        help="leave out files whose name or path matches this shell pattern, e.g. "
        "'validation_*' or '*_label*' (repeatable; default: none)",
    )


def add_run_arguments(parser: argparse.ArgumentParser, defaults: Any) -> None:
    """--seed, --device, --checkpoint-every, --resume and --progress, defaulting to ``defaults``."""
    parser.add_argument("--seed", type=int, default=defaults.seed, help="default %(default)s")
    parser.add_argument(
        "--device", default=defaults.device, help="auto (default), cpu, cuda or cuda:N"
    )
    parser.add_argument(
        "--checkpoint-every",
        type=int,
        default=defaults.checkpoint_every,
        metavar="N",
        help="write a checkpoint every N iterations (default %(default)s)",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in the output folder from its latest checkpoint",
    )
    parser.add_argument(
        "--progress", choices=["bars", "none"], default="bars", help="default %(default)s"
    )


class Bars:
    """tqdm bars on standard error, one per named phase, the training one showing the loss."""

    def __init__(self) -> None:
        self.bars: dict[str, Any] = {}

    def update(self, name: str, done: int, total: int, loss: float | None = None) -> None:
        from tqdm import tqdm

        if name not in self.bars:
            self.bars[name] = tqdm(total=total, initial=done - 1, desc=name, file=sys.stderr)
        bar = self.bars[name]
        bar.update(done - bar.n)
        if loss is not None:
            bar.set_postfix(loss=f"{loss:.4f}", refresh=False)

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()


def report_interrupted(output: Path) -> int:
    """Say how to continue an interrupted run; the exit code for Ctrl-C."""
    saved = list_checkpoints(output)
    where = f" from {saved[-1][1].name}" if saved else " (no checkpoint was written yet)"
    print(f"interrupted: continue with --resume{where}.", file=sys.stderr)
    return 130
