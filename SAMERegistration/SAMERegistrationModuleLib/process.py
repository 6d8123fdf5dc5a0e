"""A child process whose output lines are collected by reader threads and handed over on poll().

Slicer's GUI thread must never block on a pipe: the widget calls ``poll()`` from a timer, scripts
call ``wait()``. ``stop()`` ends the process and everything it started (its process group).
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import subprocess
import threading
import time
from collections.abc import Callable

LineHandler = Callable[[str, str], None]  # (stream name "stdout" or "stderr", line without newline)


class BackgroundProcess:
    def __init__(self, args: list[str], env: dict[str, str] | None = None) -> None:
        self.args = list(args)
        self._lines: queue.Queue[tuple[str, str] | None] = queue.Queue()
        self._open_streams = 2
        options: dict = {}
        if os.name == "nt":
            # Own process group (so taskkill /T reaches the children) and no console window.
            options["creationflags"] = (
                subprocess.CREATE_NEW_PROCESS_GROUP | subprocess.CREATE_NO_WINDOW
            )
        else:
            options["start_new_session"] = True  # own process group, killed as a whole
        self.process = subprocess.Popen(
            self.args,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            encoding="utf-8",
            errors="replace",
            bufsize=1,
            **options,
        )
        for name, stream in (("stdout", self.process.stdout), ("stderr", self.process.stderr)):
            threading.Thread(target=self._read, args=(name, stream), daemon=True).start()

    def _read(self, name: str, stream) -> None:
        for line in stream:
            self._lines.put((name, line.rstrip("\r\n")))
        stream.close()
        self._lines.put(None)

    def poll(self, handler: LineHandler) -> int | None:
        """Hand every line read so far to ``handler``; the exit code once all output is read."""
        while True:
            try:
                item = self._lines.get_nowait()
            except queue.Empty:
                break
            if item is None:
                self._open_streams -= 1
            else:
                handler(*item)
        if self._open_streams == 0:
            return self.process.wait()
        return None

    def wait(self, handler: LineHandler, interval_s: float = 0.05) -> int:
        """Block until the process ends, handing lines to ``handler`` as they come."""
        while (code := self.poll(handler)) is None:
            time.sleep(interval_s)
        return code

    def stop(self, grace_s: float = 3.0) -> None:
        """End the process and its children: politely first, then by force."""
        if self.process.poll() is not None:
            return
        if os.name == "nt":
            subprocess.run(
                ["taskkill", "/F", "/T", "/PID", str(self.process.pid)],
                capture_output=True,
                creationflags=subprocess.CREATE_NO_WINDOW,
            )
        else:
            _signal_group(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(grace_s)
            except subprocess.TimeoutExpired:
                _signal_group(self.process.pid, signal.SIGKILL)
        self.process.wait()


def _signal_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # already gone
        os.killpg(pid, sig)
