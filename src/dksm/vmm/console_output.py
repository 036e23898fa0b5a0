"""The host side of the serial console's output: a file descriptor that never holds a
stopping VM hostage.

A guest writes its console one byte per port exit, on its vCPU thread.  Written to a
pipe nobody drains (``dksm run | slow-reader``, a FIFO), a blocking ``write`` would
park that thread in the kernel where no kick reaches it, and SIGTERM or ``--timeout``
could not stop the VM.  Here the thread waits for the descriptor to become writable
in short slices instead: a slow reader slows the guest down, as a slow terminal
would, and once the VM is stopping (``abandon`` says so) the bytes still waiting are
dropped and the vCPU leaves.
"""

from __future__ import annotations

import errno
import os
import select
from collections.abc import Callable

from dksm.error import DksmError

WAIT_SLICE_S = 0.1


class ConsoleOutputError(DksmError):
    """The console's output file cannot be opened."""


def open_console_output(path: str | None, *, append: bool = False) -> ConsoleOutput:
    """The console's output: ``path``, or this process's standard output if None.

    Opened without blocking, so that a FIFO nobody reads is an error (ENXIO) rather
    than an open that waits for ever, and never as a controlling terminal."""
    from dksm.loader.host_file import check_path

    try:
        if path is None:
            fd = os.dup(1)  # sys.stdout is None when fd 1 was closed at start
        else:
            check_path(path, "serial output")
            flags = os.O_WRONLY | os.O_CREAT | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
            fd = os.open(path, flags | (os.O_APPEND if append else os.O_TRUNC), 0o666)
            os.set_blocking(fd, True)
    except OSError as exc:
        why = "a FIFO that no process reads" if exc.errno == errno.ENXIO else exc.strerror
        raise ConsoleOutputError(
            f"cannot open serial output {path or 'standard output'}: {why}"
        ) from exc
    return ConsoleOutput(fd)


class ConsoleOutput:
    """Bytes to ``fd`` (owned: closed by :meth:`close`), waiting but never stuck."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.abandon: Callable[[], bool] = lambda: False
        self.bytes_dropped = 0

    def write(self, data: bytes, /) -> int:
        view = memoryview(data)
        written = 0
        while view:
            _, writable, _ = select.select([], [self.fd], [], WAIT_SLICE_S)
            if not writable:
                if self.abandon():
                    self.bytes_dropped += len(view)
                    return written
                continue
            count = os.write(self.fd, view)  # errors go to the caller (GuardedSink)
            view = view[count:]
            written += count
        return written

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> ConsoleOutput:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
