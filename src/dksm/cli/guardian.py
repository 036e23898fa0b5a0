"""A confined VMM under a privileged parent: the parent forks the VMM before anything
is built, forwards SIGTERM, SIGINT and SIGHUP to it, waits for it, removes what the
confined VMM could not (its API socket, its vsock sockets: see
:mod:`dksm.vmm.socket_cleanup`), and exits with the VMM's status, as a jailer does.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Callable


def run_guarded(vmm: Callable[[], int], cleanup: Callable[[], None] = lambda: None) -> int:
    """Run ``vmm`` in a child; ``cleanup`` in this process once the child has ended."""
    from dksm.vmm import socket_cleanup

    reports_r, reports_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(reports_r)
        socket_cleanup.report_to(reports_w)
        status = 1
        try:
            status = vmm()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(status)
    os.close(reports_w)

    def forward(signum: int, _frame: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, forward)
    while True:
        try:
            _, wait_status = os.waitpid(pid, 0)
            break
        except InterruptedError:
            continue
    try:
        socket_cleanup.remove_reported(reports_r)
    finally:
        os.close(reports_r)
    cleanup()
    if os.WIFSIGNALED(wait_status):
        return 128 + os.WTERMSIG(wait_status)
    return os.WEXITSTATUS(wait_status)
