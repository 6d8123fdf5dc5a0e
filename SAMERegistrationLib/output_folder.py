"""Claiming an output folder for one run, staging its files inside it, and moving them in at once.

A run claims its output folder before any heavy work: it creates the folder, takes a lock file in
it (a second run into the same folder is refused at once) and makes a hidden staging folder in it.
Files are written to the staging folder and renamed into place only when all are complete; staging
on the same filesystem means a rename never crosses devices. On any failure, Ctrl-C or SIGTERM the
staging folder and the lock are removed, and so is the output folder when this run created it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .errors import OutputError

LOCK_NAME = ".same-register.lock"
STAGING_PREFIX = ".same-staging-"


class Interrupted(KeyboardInterrupt):
    """A termination signal arrived while an output folder was claimed."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"signal {signum}")
        self.signum = signum


@dataclass
class OutputClaim:
    """An output folder held by this process: write files to ``staging``, then ``commit`` them."""

    folder: Path
    staging: Path
    overwrite: bool
    committed: bool = False

    def commit(self, names: list[str], report: str | None = None) -> None:
        """Move the staged ``names`` into the folder, ``report`` last.

        With overwrite, the outputs an earlier run listed in its report (``"outputs"``) that this
        run does not write are removed, so no stale result is left beside the new ones.
        """
        if self.overwrite and report is not None:
            for stale in sorted(_earlier_outputs(self.folder / report) - set(names)):
                if (self.folder / stale).is_file():
                    (self.folder / stale).unlink()
        for name in sorted(names, key=lambda n: n == report):
            (self.staging / name).replace(self.folder / name)
        self.committed = True


_CLAIMS: dict[Path, OutputClaim] = {}


@contextmanager
def claim_output_folder(
    folder: str | Path, names: list[str], overwrite: bool = False
) -> Iterator[OutputClaim]:
    """Hold ``folder`` for the files ``names`` for the duration of the block.

    Refuses at once a path that is a file, existing outputs without ``overwrite``, a folder that
    cannot be written, and a folder another run holds. Nested claims of one folder by this process
    share the outer claim.
    """
    folder = Path(folder).absolute()
    _check_targets(folder, names, overwrite)
    held = _CLAIMS.get(folder)
    if held is not None:
        yield held
        return
    created = _create(folder)
    try:
        lock = _take_lock(folder)
        staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=folder))
    except BaseException:
        _remove_created(created, folder)
        raise
    claim = OutputClaim(folder, staging, overwrite)
    _CLAIMS[folder] = claim
    previous = _terminate_as_interrupt()
    try:
        yield claim
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        del _CLAIMS[folder]
        shutil.rmtree(staging, ignore_errors=True)
        lock.unlink(missing_ok=True)
        if not claim.committed:
            _remove_created(created, folder)


def _check_targets(folder: Path, names: list[str], overwrite: bool) -> None:
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"The output path '{folder}' is a file, not a folder. Choose a folder.")
    if not folder.is_dir():
        return
    blocked = [n for n in names if (folder / n).is_dir()]
    if blocked:
        raise OutputError(
            f"The output folder '{folder}' holds folders named {', '.join(blocked)} where files "
            "are to be written. Move them away or choose another folder."
        )
    clashes = [n for n in names if (folder / n).exists()]
    if clashes and not overwrite:
        raise OutputError(
            f"The output folder '{folder}' already holds {', '.join(clashes)}. Choose another "
            "folder, or pass --overwrite to replace these files."
        )


def _create(folder: Path) -> Path | None:
    """Make the folder (and missing parents); return the topmost folder made, or None."""
    top = None
    for candidate in (folder, *folder.parents):
        if candidate.exists():
            break
        top = candidate
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(
            f"The output folder '{folder}' cannot be created ({err.strerror or err}). Choose a "
            "folder you can write to."
        ) from err
    return top


def _remove_created(top: Path | None, folder: Path) -> None:
    """Remove the folders this claim made, from ``folder`` up to ``top``, where they are empty."""
    if top is None:
        return
    for path in (folder, *folder.parents):
        try:
            path.rmdir()
        except OSError:
            return
        if path == top:
            return


def _take_lock(folder: Path) -> Path:
    lock = folder / LOCK_NAME
    owner = f"{os.getpid()} {socket.gethostname()}\n"
    for _ in range(2):
        try:
            descriptor = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            if not _stale(lock):
                raise OutputError(
                    f"The output folder '{folder}' is in use by another registration "
                    f"({_describe_owner(lock)}). Wait for it to finish or choose another folder; "
                    f"if no registration is running, delete '{lock}'."
                ) from None
            _clear_stale(folder, lock)
            continue
        except OSError as err:
            raise OutputError(
                f"The output folder '{folder}' cannot be written ({err.strerror or err}). Choose "
                "a folder you can write to."
            ) from err
        with os.fdopen(descriptor, "w") as handle:
            handle.write(owner)
        return lock
    raise OutputError(f"The output folder '{folder}' could not be claimed; try again.")


def _owner(lock: Path) -> tuple[int, str] | None:
    try:
        pid, host = lock.read_text(encoding="utf-8").split()
        return int(pid), host
    except (OSError, ValueError):
        return None


def _describe_owner(lock: Path) -> str:
    owner = _owner(lock)
    return f"process {owner[0]} on {owner[1]}" if owner else "unknown process"


def _stale(lock: Path) -> bool:
    """A lock left by a process of this machine that no longer runs (killed with SIGKILL)."""
    owner = _owner(lock)
    if owner is None or owner[1] != socket.gethostname():
        return False
    pid = owner[0]
    if pid == os.getpid():
        return True  # this process holds no claim on the folder (see _CLAIMS): a leftover
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _clear_stale(folder: Path, lock: Path) -> None:
    for leftover in folder.glob(f"{STAGING_PREFIX}*"):
        shutil.rmtree(leftover, ignore_errors=True)
    lock.unlink(missing_ok=True)


def _terminate_as_interrupt():
    """Make SIGTERM unwind like Ctrl-C, so that the staging folder is removed; return the old
    handler (None where signals cannot be handled: outside the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame):
        raise Interrupted(signum)

    return signal.signal(signal.SIGTERM, handler)


def _earlier_outputs(report: Path) -> set[str]:
    """The plain file names an earlier run's report lists as its outputs."""
    try:
        outputs = json.loads(report.read_text(encoding="utf-8")).get("outputs", {})
    except (OSError, ValueError, AttributeError):
        return set()
    if not isinstance(outputs, dict):
        return set()
    return {
        n
        for n in outputs.values()
        if isinstance(n, str) and n == Path(n).name and n not in ("", ".", "..")
    }
