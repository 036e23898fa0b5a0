"""Exit statuses: one for every way a VM stops, and no VM code loaded to return one."""

from __future__ import annotations

import subprocess
import sys

from dksm.vmm.exit_status import ExitStatus, status_for
from dksm.vmm.machine import ExitCause


def test_every_exit_cause_has_its_status() -> None:
    statuses = {cause: status_for(cause) for cause in ExitCause}
    assert statuses[ExitCause.GUEST_SHUTDOWN] == ExitStatus.OK
    assert statuses[ExitCause.TRIPLE_FAULT] == ExitStatus.TRIPLE_FAULT
    assert statuses[ExitCause.EMULATION_FAILURE] == ExitStatus.KVM_ERROR
    assert statuses[ExitCause.TIMEOUT] == ExitStatus.TIMEOUT
    assert statuses[ExitCause.INTERRUPTED] == 130
    assert statuses[ExitCause.HOST_IO_ERROR] == ExitStatus.ERROR


def test_the_command_line_loads_no_vm_code_to_parse_and_print_help() -> None:
    """Start-up time is measured: `dksm --help`, `dksm pool`, `dksm guests` and the
    parser of every command load neither the vCPU loop nor the KVM bindings."""
    probe = (
        "import sys\n"
        "from dksm.cli.main import build_parser\n"
        "build_parser().format_help()\n"
        "print(sorted(m for m in sys.modules if m.startswith(('dksm.vmm.machine', 'dksm.kvm'))))\n"
    )
    ran = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert ran.stdout.strip() == "[]"
