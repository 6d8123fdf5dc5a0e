"""One run of the registration's child process, from start to loaded outputs."""

from __future__ import annotations

import enum
import json
import shutil
import signal
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from SAMERegistrationLib.config import STEPS
from SAMERegistrationLib.errors import RegistrationFailed

from .settings import RegistrationOutputs, RegistrationSettings

GPU_FAILURE_HINTS = ("cuda", "gpu", "cudnn", "nvidia")
LOG_LINES = 2000  # lines of child output kept in memory for the panel

ProgressHandler = Callable[[str, int, int, float], None]  # stage, done, total, overall 0..1
LogHandler = Callable[[str], None]


class JobState(enum.Enum):
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


@dataclass
class JobInputs:
    fixed: object
    moving: object
    labels: object
    segments: dict[int, tuple[str, tuple]] = field(default_factory=dict)  # label -> name, colour

    def nodes(self) -> list:
        return [node for node in (self.fixed, self.moving, self.labels) if node is not None]


def failure(message: str, deviceFailure: bool = False) -> RegistrationFailed:
    """The library's RegistrationFailed; ``deviceFailure``: a GPU problem, the CPU may work."""
    error = RegistrationFailed(message)
    error.deviceFailure = deviceFailure
    return error


def exitMessage(code: int) -> str:
    """What an exit code without an error message of the library means, and what to do."""
    if code < 0:
        number = -code
        try:
            name = signal.Signals(number).name
        except ValueError:
            name = f"signal {number}"
        if number == getattr(signal, "SIGKILL", 9):
            return (
                f"The registration process was killed by the system ({name}), most often because "
                "the computer ran out of memory. Choose a coarser working spacing (for example "
                "3 mm) or fewer stages, or close other programs, and run again."
            )
        return f"The registration process was stopped by {name}."
    return f"The registration process exited with code {code}."


class RegistrationJob:
    """One run of the child process, from start to loaded outputs.

    ``state`` goes RUNNING -> COMPLETED, FAILED or CANCELLED. ``poll()`` advances it (call it
    from a timer); ``wait()`` blocks; ``cancel()`` stops the process and removes its files.
    ``load(job)`` fills the output nodes once the process has succeeded.
    """

    def __init__(
        self,
        inputs: JobInputs,
        outputs: RegistrationOutputs,
        settings: RegistrationSettings,
        folder: Path,
        process,
        load: Callable[[RegistrationJob], None],
        keepFiles: bool = False,
        onProgress: ProgressHandler | None = None,
        onLog: LogHandler | None = None,
        onFinished: Callable[[RegistrationJob], None] | None = None,
    ) -> None:
        self.inputs = inputs
        self.outputs = outputs
        self.settings = settings
        self.folder = folder
        self.process = process
        self.state = JobState.RUNNING
        self.stage = ""
        self.progress = 0.0
        self.log: list[str] = []
        self.error: str | None = None
        self.deviceFailure = False
        self.report: dict | None = None
        self.reportPath: Path | None = None
        self.features = None  # (fixed, moving, kind) StoredFeatures, when the run wrote them
        self._load = load
        self._keepFiles = keepFiles
        self._errorLines: list[str] = []
        self._onProgress = onProgress
        self._onLog = onLog
        self._finishedHandlers = [onFinished] if onFinished else []

    @property
    def finished(self) -> bool:
        return self.state is not JobState.RUNNING

    def whenFinished(self, handler: Callable[[RegistrationJob], None]) -> None:
        self._finishedHandlers.insert(0, handler)

    def poll(self) -> bool:
        """Handle the output so far; when the process has ended, load the results. True when done."""
        if self.finished:
            return True
        code = self.process.poll(self._handleLine)
        if code is not None:
            self._conclude(code)
        return self.finished

    def wait(self) -> RegistrationJob:
        """Block until the run ends; raise RegistrationFailed unless it completed or the caller
        cancelled it."""
        if not self.finished:
            code = self.process.wait(self._handleLine)
            self._conclude(code)
        if self.state is JobState.FAILED or (self.state is JobState.CANCELLED and self.error):
            raise failure(self.error or "The registration failed.", self.deviceFailure)
        return self

    def cancel(self, reason: str | None = None) -> None:
        """Stop the child process (and its children) and remove the temporary folder.

        ``reason`` (say, an input node was deleted) is kept as the job's error.
        """
        if self.finished:
            return
        self.error = reason
        self.process.stop()
        self.process.poll(self._handleLine)
        self._finish(JobState.CANCELLED)

    def _handleLine(self, stream: str, line: str) -> None:
        if stream == "stdout" and line.startswith("{"):
            try:
                message = json.loads(line)
            except json.JSONDecodeError:
                message = None
            if isinstance(message, dict) and "stage" in message:
                self._progress(message["stage"], int(message["done"]), int(message["total"]))
                return
            if isinstance(message, dict) and message.get("finished"):
                self.reportPath = Path(message["report"])
                return
        if stream == "stderr":
            self._errorLines.append(line)
        self.addLog(line)

    def _progress(self, stage: str, done: int, total: int) -> None:
        self.stage = stage
        index = STEPS.index(stage) if stage in STEPS else 0
        self.progress = (index + (done / total if total else 1.0)) / len(STEPS)
        if self._onProgress:
            self._onProgress(stage, done, total, self.progress)

    def addLog(self, line: str) -> None:
        self.log.append(line)
        del self.log[:-LOG_LINES]
        if self._onLog:
            self._onLog(line)

    def _conclude(self, code: int) -> None:
        if self.finished:
            return
        if code == 0 and self.reportPath is not None:
            try:
                self._load(self)
            except Exception as error:
                self.addLog(traceback.format_exc())
                self.error = (
                    f"The registration finished, but its results could not be loaded: {error}"
                )
                self._finish(JobState.FAILED)
                return
            self._finish(JobState.COMPLETED)
            return
        # The library's own errors are one "error: ..." line; anything else ends in a traceback.
        errors = [line[len("error: ") :] for line in self._errorLines if line.startswith("error: ")]
        tail = "\n".join(self._errorLines[-15:]).strip()
        self.error = errors[-1] if errors else tail
        self.deviceFailure = self.settings.device != "cpu" and any(
            hint in self.error.lower() for hint in GPU_FAILURE_HINTS
        )
        if code < 0 or not self.error:
            self.error = "\n".join(
                filter(None, [exitMessage(code), self.error if code < 0 else ""])
            )
        if self.deviceFailure:
            self.error += "\nThe GPU failed; the registration can run on the CPU instead."
        self._finish(JobState.FAILED)

    def _finish(self, state: JobState) -> None:
        self.state = state
        if not self._keepFiles:
            shutil.rmtree(self.folder, ignore_errors=True)
        elif state is not JobState.CANCELLED:
            self.addLog(f"Temporary files kept in {self.folder}")
        for handler in self._finishedHandlers:
            handler(self)
