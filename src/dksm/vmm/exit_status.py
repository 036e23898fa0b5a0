"""Exit statuses of a microVM process (`dksm run`, a fleet member), one per way a run
ends; the CLI returns them and a fleet supervisor reads them from its children."""

from __future__ import annotations

import enum

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


CAUSE_STATUS = {
    ExitCause.GUEST_SHUTDOWN: ExitStatus.OK,
    ExitCause.TRIPLE_FAULT: ExitStatus.TRIPLE_FAULT,
    ExitCause.EMULATION_FAILURE: ExitStatus.KVM_ERROR,
    ExitCause.INTERNAL_ERROR: ExitStatus.KVM_ERROR,
    ExitCause.FAIL_ENTRY: ExitStatus.KVM_ERROR,
    ExitCause.HALTED: ExitStatus.VMM_ERROR,
    ExitCause.TIMEOUT: ExitStatus.TIMEOUT,
    ExitCause.INTERRUPTED: ExitStatus.INTERRUPTED,
    ExitCause.VMM_ERROR: ExitStatus.VMM_ERROR,
    ExitCause.HOST_IO_ERROR: ExitStatus.ERROR,
}
