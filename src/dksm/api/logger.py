"""The VMM's log, as Firecracker writes it: one line per event,
``TIMESTAMP [INSTANCE:THREAD(:LEVEL)(:FILE:LINE)] message``, filtered by level.

The file (or named pipe) is opened once, before the VM starts, and appended to.
Until one is configured (``--log-path`` or ``PUT /logger``) nothing is logged:
standard output is the guest's console, and standard error carries only the one-line
errors the process exits with.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time

from dksm.error import DksmError

# Firecracker's levels, most severe first; "Off" logs nothing.
LEVELS = ("Error", "Warning", "Info", "Debug", "Trace")
DEFAULT_LEVEL = "Info"
NO_FILE = -1


class LoggerError(DksmError):
    """The log file cannot be opened."""


def _timestamp() -> str:
    now = time.time_ns()
    seconds, nanos = divmod(now, 1_000_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{nanos:09d}"


class VmmLog:
    def __init__(self, instance_id: str) -> None:
        self.instance_id = instance_id
        self.level = DEFAULT_LEVEL
        self.show_level = False
        self.show_origin = False
        self.fd = NO_FILE
        self.path: str | None = None
        self._lock = threading.Lock()

    def configure(
        self,
        *,
        path: str | None = None,
        level: str | None = None,
        show_level: bool | None = None,
        show_origin: bool | None = None,
    ) -> None:
        """Change what is given; a new path is opened before anything else changes."""
        if path is not None:
            try:
                fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
            except OSError as exc:
                raise LoggerError(f"cannot open log file {path}: {exc.strerror}") from exc
            with self._lock:
                if self.fd != NO_FILE:
                    os.close(self.fd)
                self.fd, self.path = fd, path
        if level is not None:
            self.level = level
        if show_level is not None:
            self.show_level = show_level
        if show_origin is not None:
            self.show_origin = show_origin

    def enabled(self, level: str) -> bool:
        return (
            self.fd != NO_FILE
            and self.level != "Off"
            and LEVELS.index(level) <= LEVELS.index(self.level)
        )

    def log(self, level: str, message: str) -> None:
        if not self.enabled(level):
            return
        tags = f"{self.instance_id}:{threading.current_thread().name}"
        if self.show_level:
            tags += f":{level.upper()}"
        if self.show_origin:
            caller = sys._getframe(2)
            tags += f":{caller.f_code.co_filename}:{caller.f_lineno}"
        line = f"{_timestamp()} [{tags}] {message}\n".encode(errors="replace")
        # A log reader that went away must not stop the VM.
        with self._lock, contextlib.suppress(OSError):
            os.write(self.fd, line)

    def error(self, message: str) -> None:
        self.log("Error", message)

    def warning(self, message: str) -> None:
        self.log("Warning", message)

    def info(self, message: str) -> None:
        self.log("Info", message)

    def debug(self, message: str) -> None:
        self.log("Debug", message)

    def close(self) -> None:
        with self._lock:
            if self.fd != NO_FILE:
                os.close(self.fd)
                self.fd = NO_FILE
