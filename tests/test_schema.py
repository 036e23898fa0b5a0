"""The one schema of config files and API bodies, alone: strict, closed, every problem
at once, and what dksm cannot do refused by name (never silently dropped)."""

from __future__ import annotations

import pytest

from dksm.vmm.config import ConfigError, accept_document, parse_json
from dksm.vmm.schema import Logger, MachineConfiguration, VmConfigDocument, unsupported


def _problems(doc: object) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        accept_document(doc, "cfg")
    return str(caught.value).splitlines()


def test_every_problem_of_a_document_is_reported_at_once() -> None:
    lines = _problems(
        {
            "boot-source": {"kernel_image_path": 7, "colour": "red"},
            "machine-config": {"vcpu_count": 33, "mem_size_mib": "64"},
            "network-interfaces": [{"iface_id": "eth0", "host_dev_name": "tap0"}],
            "mystery": {},
        }
    )
    assert lines == [
        "cfg: boot-source.kernel_image_path: Input should be a valid string",
        "cfg: boot-source.colour: unknown field",
        "cfg: machine-config.vcpu_count: Input should be less than or equal to 32",
        "cfg: machine-config.mem_size_mib: Input should be a valid integer",
        "cfg: mystery: unknown field",
        "cfg: network-interfaces: network devices (virtio-net) are not supported yet",
    ]


def test_well_formed_but_unsupported_fields_are_refused_by_name() -> None:
    doc = VmConfigDocument.model_validate(
        {
            "boot-source": {"kernel_image_path": "k"},
            "machine-config": {
                "vcpu_count": 2,
                "mem_size_mib": 64,
                "smt": True,
                "cpu_template": "T2",
                "huge_pages": "2M",
                "track_dirty_pages": True,
            },
            "entropy": {},
            "drives": [],
            "balloon": None,
        }
    )
    assert [line.split(":")[0] for line in unsupported(doc)] == [
        "entropy",
        "machine-config.smt",
        "machine-config.track_dirty_pages",
        "machine-config.cpu_template",
        "machine-config.huge_pages",
    ]


def test_accepted_fields_take_effect() -> None:
    accepted = accept_document(
        {
            "boot-source": {"kernel_image_path": "hello", "boot_args": "a=1"},
            "machine-config": {"vcpu_count": 3, "mem_size_mib": 40, "smt": False},
            "serial": {"serial_out_path": "/tmp/x"},
            "dksm": {"dedup": "ksm", "domain": "blue", "tsc_leaf": False},
        },
        "cfg",
    )
    vm = accepted.vm
    assert vm.kernel_path.endswith("/hello.elf")  # a shipped guest's name
    assert (vm.boot_args, vm.vcpu_count, vm.mem_mib, vm.tsc_frequency_leaf) == (
        "a=1", 3, 40, False,
    )  # fmt: skip
    assert (accepted.dedup, accepted.domain, accepted.serial_out_path) == ("ksm", "blue", "/tmp/x")


def test_json_is_read_as_firecracker_reads_it() -> None:
    with pytest.raises(ConfigError, match="given twice"):
        parse_json('{"a": 1, "a": 2}', "x")
    with pytest.raises(ConfigError, match="nested too deeply"):
        parse_json("[" * 50000 + "]" * 50000, "x")
    assert Logger.model_validate({"level": "warning"}).level == "Warning"
    with pytest.raises(ValueError, match="one of Error"):
        Logger.model_validate({"level": "loud"})
    with pytest.raises(ValueError):
        MachineConfiguration.model_validate({"vcpu_count": 2.0, "mem_size_mib": 64})


def test_run_with_a_kernel_never_imports_pydantic() -> None:
    """Start-up time is measured: only what reads a config file pays for the schema."""
    import subprocess
    import sys

    probe = (
        "import sys\n"
        "from dksm.cli.main import build_parser\n"
        "from dksm.cli import run\n"
        "args = build_parser('run').parse_args(['run', '--kernel', 'hello'])\n"
        "run._config(args)\n"
        "print(sorted(m for m in ('pydantic', 'h11', 'dksm.vmm.schema') if m in sys.modules))\n"
    )
    ran = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert ran.stdout.strip() == "[]"
