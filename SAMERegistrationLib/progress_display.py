"""How the command line shows progress and log messages on standard error.

On a terminal each stage gets a tqdm bar, and log lines go through tqdm's writer so that they are
printed above the bars instead of breaking them. When standard error is not a terminal (a log
file, a pipe, the Slicer module) there are no bars: one log line per stage instead.
"""

from __future__ import annotations

import logging
import sys

from tqdm import tqdm

log = logging.getLogger("SAMERegistrationLib.progress")


class TqdmLogHandler(logging.Handler):
    """A log handler that writes through ``tqdm.write``: safe while bars are shown."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:
            self.handleError(record)


class StageProgress:
    """progress(stage, done, total): a bar per stage on a terminal, else one log line per stage."""

    def __init__(self, enabled: bool, terminal: bool | None = None) -> None:
        self.enabled = enabled
        self.terminal = sys.stderr.isatty() if terminal is None else terminal
        self.stage: str | None = None
        self.bar: tqdm | None = None

    def __call__(self, stage: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        if stage != self.stage:
            self.close()
            self.stage = stage
            if not self.terminal:
                log.info("stage: %s", stage)
                return
            self.bar = tqdm(total=total, desc=f"{stage:>9}", leave=True, file=sys.stderr)
        if self.bar is not None:
            self.bar.total = total
            self.bar.n = done
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
