"""Exit statuses of a microVM process (`dksm run`, a fleet member), one per way a run
ends; the CLI returns them and a fleet supervisor reads them from its children.

This module imports nothing of the VM: every dksm command returns these statuses,
and ``dksm pool stats`` should not pay for loading the vCPU loop to do it.  The
causes are therefore named here by their :class:`~dksm.vmm.machine.ExitCause`
member names (tests check that every cause has a status).
"""

from __future__ import annotations

import enum

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing (see dksm.cli)
if TYPE_CHECKING:
    from dksm.vmm.machine import ExitCause


class ExitStatus(enum.IntEnum):
    OK = 0  # the guest asked to shut down, or the command succeeded
    ERROR = 1  # bad input or environment; the message says which
    USAGE = 2  # bad command-line syntax (argparse's own status)
    TRIPLE_FAULT = 3
    KVM_ERROR = 4  # KVM internal error, emulation failure, failed entry
    TIMEOUT = 5
    VMM_ERROR = 6  # a bug in dksm: please report it
    INTERRUPTED = 130  # Ctrl-C or SIGTERM, as a shell reports SIGINT


_STATUS_BY_CAUSE = {
    "GUEST_SHUTDOWN": ExitStatus.OK,
    "TRIPLE_FAULT": ExitStatus.TRIPLE_FAULT,
    "EMULATION_FAILURE": ExitStatus.KVM_ERROR,
    "INTERNAL_ERROR": ExitStatus.KVM_ERROR,
    "FAIL_ENTRY": ExitStatus.KVM_ERROR,
    "HALTED": ExitStatus.VMM_ERROR,
    "TIMEOUT": ExitStatus.TIMEOUT,
    "INTERRUPTED": ExitStatus.INTERRUPTED,
    "VMM_ERROR": ExitStatus.VMM_ERROR,
    "HOST_IO_ERROR": ExitStatus.ERROR,
}


def status_for(cause: ExitCause) -> ExitStatus:
    """The process's exit status when its VM stopped for ``cause``."""
    return _STATUS_BY_CAUSE[cause.name]
