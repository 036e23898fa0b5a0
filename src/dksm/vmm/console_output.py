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

import os
import select
from collections.abc import Callable

WAIT_SLICE_S = 0.1


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
