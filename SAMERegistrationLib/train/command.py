"""What the training commands (``train-sam``, ``train-deform``, ``sam-pair-maps``) share: input and
run options, progress bars, and running the work with its errors and interruption handled."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from functools import partial
from operator import attrgetter
from pathlib import Path
from typing import Any

from ..errors import SameRegistrationError
from .checkpoints import list_checkpoints


def new_parser(
    command: str, description: str, output_help: str = "output folder"
) -> argparse.ArgumentParser:
    """The parser of ``same-register <command>`` with the scans (files or folders), -o/--output and
    --exclude-pattern."""
    parser = argparse.ArgumentParser(prog=f"same-register {command}", description=description)
    parser.add_argument(
        "scans",
        nargs="+",
        help="CT volumes in Hounsfield units (NIfTI, NRRD, MHA ...), or folders holding only such "
        "files (their sub-folders and hidden files are ignored)",
    )
    parser.add_argument("-o", "--output", required=True, type=Path, help=output_help)
    parser.add_argument(
        "--exclude-pattern",
        action="append",
        default=[],
        metavar="PATTERN",
        help="leave out files whose name or path matches this shell pattern, e.g. "
        "'validation_*' or '*_label*' (repeatable; default: none)",
    )
    return parser


#: An option that sets one config field: flag, field (``section.name`` for a field of a nested
#: config), type, choices (or None), help.
Setting = tuple[str, str, type, Sequence[str] | None, str]


def add_settings(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    settings: Sequence[Setting],
    defaults: Any,
) -> None:
    """One option per setting, defaulting to the field's value in ``defaults``."""
    for flag, name, kind, choices, text in settings:
        parser.add_argument(
            flag, dest=name, type=kind, choices=choices, default=attrgetter(name)(defaults),
            help=text, metavar=None if choices else name.rpartition(".")[2].upper(),
        )  # fmt: skip


def setting_values(
    args: argparse.Namespace, settings: Sequence[Setting], section: str = ""
) -> dict[str, Any]:
    """The values of the fields the ``settings`` options set, by field name: the top-level
    fields, or those of the nested config ``section``."""
    values = {}
    for _, name, *_ in settings:
        owner, _, field = name.rpartition(".")
        if owner == section:
            values[field] = getattr(args, name)
    return values


def run_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The fields ``add_run_arguments`` options set, except --resume and --progress."""
    return {"seed": args.seed, "device": args.device, "checkpoint_every": args.checkpoint_every}


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
    add_progress_argument(parser)


def add_progress_argument(parser: argparse.ArgumentParser) -> None:
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


def phase(bars: Bars | None, name: str) -> Callable[..., None] | None:
    """A progress callback ``(done, total[, loss])`` that updates the bar ``name``, or None."""
    return None if bars is None else partial(bars.update, name)


def report_interrupted(output: Path) -> int:
    """Say how to continue an interrupted run; the exit code for Ctrl-C."""
    saved = list_checkpoints(output)
    where = f" from {saved[-1][1].name}" if saved else " (no checkpoint was written yet)"
    print(f"interrupted: continue with --resume{where}.", file=sys.stderr)
    return 130


def run_command(
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None,
    work: Callable[[argparse.Namespace, Bars | None], Path],
    made: str,
    interrupted: Callable[[Path], int] = report_interrupted,
) -> int:
    """Parse ``argv``, run ``work(args, bars)`` and print ``made: <its file>``; 0 on success, 2 on
    a user error (printed as ``error: ...``), ``interrupted(args.output)`` on Ctrl-C."""
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    bars = Bars() if args.progress == "bars" else None
    try:
        result = work(args, bars)
    except SameRegistrationError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return interrupted(args.output)
    finally:
        if bars is not None:
            bars.close()
    print(f"{made}: {result}")
    return 0
