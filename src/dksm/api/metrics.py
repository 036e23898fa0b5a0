"""Metrics as Firecracker writes them: one JSON object per line, flushed to the
metrics file every minute and on ``FlushMetrics``.

Groups and counter names are Firecracker's where dksm has the same fact
(``api_server``, ``get_api_requests``, ``put_api_requests``, ``patch_api_requests``,
``vcpu``, ``uart``, ``vmm``); like Firecracker's incrementing metrics, each counter
reports what happened since the previous flush.  The ``dksm`` group holds what
Firecracker has no name for: the VM's shared pages and its pool's counters (totals,
not deltas, as the pool keeps them).
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from dksm.error import DksmError

# Firecracker's period for its periodic metrics.
FLUSH_PERIOD_S = 60.0


class MetricsError(DksmError):
    """The metrics file cannot be opened or written."""


class Counters:
    """Named counters in groups, safe to bump from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[str, dict[str, int]] = {}
        self._reported: dict[tuple[str, str], int] = {}

    def add(self, group: str, name: str, n: int = 1) -> None:
        with self._lock:
            counts = self._counts.setdefault(group, {})
            counts[name] = counts.get(name, 0) + n

    def set_total(self, group: str, name: str, total: int) -> None:
        """Record a counter kept elsewhere as a running total (vCPU exits, UART bytes)."""
        with self._lock:
            self._counts.setdefault(group, {})[name] = total

    def total(self, group: str, name: str) -> int:
        with self._lock:
            return self._counts.get(group, {}).get(name, 0)

    def deltas(self) -> dict[str, dict[str, int]]:
        """Each counter's growth since the previous call."""
        with self._lock:
            out: dict[str, dict[str, int]] = {}
            for group, counts in self._counts.items():
                for name, value in counts.items():
                    key = (group, name)
                    out.setdefault(group, {})[name] = value - self._reported.get(key, 0)
                    self._reported[key] = value
            return out


class MetricsFile:
    """The metrics file (or named pipe), opened once, before the VM starts."""

    def __init__(self, path: str) -> None:
        try:
            # Appending, as Firecracker does; a FIFO's reader gets each line as written.
            self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise MetricsError(f"cannot open metrics file {path}: {exc.strerror}") from exc
        self.path = path
        self._lock = threading.Lock()

    def write(self, document: dict[str, Any]) -> None:
        line = (json.dumps(document, separators=(",", ":")) + "\n").encode()
        with self._lock:
            try:
                os.write(self.fd, line)
            except OSError as exc:
                raise MetricsError(
                    f"cannot write metrics file {self.path}: {exc.strerror}"
                ) from exc

    def close(self) -> None:
        os.close(self.fd)


class Metrics:
    """The VMM's counters and where they are flushed."""

    def __init__(self) -> None:
        self.counters = Counters()
        self.file: MetricsFile | None = None
        # Filled in by the controller: the running VM's own counters, read at flush.
        self.sample_vm: Callable[[Counters], dict[str, Any]] | None = None
        self._flush_lock = threading.Lock()

    def open(self, path: str) -> None:
        if self.file is not None:
            raise MetricsError("the metrics system is already initialized")
        self.file = MetricsFile(path)

    def flush(self) -> bool:
        """Write one line of metrics; False if no metrics file is configured."""
        if self.file is None:
            return False
        with self._flush_lock:
            extra: dict[str, Any] = {}
            if self.sample_vm is not None:
                extra = self.sample_vm(self.counters)
            document: dict[str, Any] = {"utc_timestamp_ms": time.time_ns() // 1_000_000}
            document.update(self.counters.deltas())
            document.update(extra)
            self.file.write(document)
        return True

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
