"""Firecracker's own example configs (adapted copies in tests/data/firecracker, see its
README): each either boots, or is refused with exactly one line per problem, and
nothing is half-applied."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import dksm, requires_kvm

CONFIGS = Path(__file__).parent / "data" / "firecracker"
FIRECRACKER = Path(sys.executable).parent / "dksm-firecracker"
DRIVES = "drives: block devices (virtio-blk) are not supported yet"
NETWORK = "network-interfaces: network devices (virtio-net) are not supported yet"
MMDS = "mmds-config: the microVM metadata service (MMDS) is not supported"

REFUSED = {
    "vm_config.json": [
        "machine-config.ht_enabled: unknown field",
        "mmds-version: unknown field",
        DRIVES,
    ],
    "vm_config_network.json": [DRIVES, NETWORK],
    "vm_config_smt_true.json": [
        DRIVES,
        "machine-config.smt: true is not supported (dksm's vCPUs are single-threaded cores)",
    ],
    "vm_config_cpu_template_C3.json": [DRIVES, "machine-config.cpu_template: C3 is not supported"],
    "vm_config_missing_mem_size_mib.json": [
        "machine-config.mem_size_mib: required field is missing",
        DRIVES,
    ],
    "vm_config_missing_vcpu_count.json": [
        "machine-config.vcpu_count: required field is missing",
        DRIVES,
    ],
    "vm_config_with_mmdsv1.json": [DRIVES, NETWORK, MMDS],
    "vm_config_with_mmdsv2.json": [DRIVES, NETWORK, MMDS],
}


def test_every_example_config_is_accounted_for() -> None:
    assert {p.name for p in CONFIGS.glob("*.json")} == {*REFUSED, "vm_config_no_devices.json"}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_example_config_is_refused_line_by_line(name: str) -> None:
    path = CONFIGS / name
    ran = subprocess.run(
        [str(FIRECRACKER), "--no-api", "--config-file", str(path)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert ran.returncode == 152, ran.stderr  # Firecracker's BadConfiguration
    prefix = f"dksm-firecracker: error: config file {path}: "
    assert ran.stderr.splitlines() == [prefix + line for line in REFUSED[name]]
    assert ran.stdout == ""  # no guest ran


def test_dksm_run_refuses_the_same_way() -> None:
    path = CONFIGS / "vm_config_with_mmdsv2.json"
    ran = dksm("run", "--config-file", str(path))
    assert ran.returncode == 1
    expected = [f"dksm: error: config file {path}: {line}" for line in REFUSED[path.name]]
    assert ran.stderr.splitlines() == expected


@requires_kvm
def test_the_example_without_devices_boots_with_two_vcpus() -> None:
    path = CONFIGS / "vm_config_no_devices.json"
    ran = subprocess.run(
        [str(FIRECRACKER), "--no-api", "--config-file", str(path)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert ran.returncode == 0, ran.stderr
    assert 'hello: cmdline="console=ttyS0 reboot=k panic=1"' in ran.stdout
    # 1024 MiB as configured: RAM above 1 MiB ends at 1 GiB - 1.
    assert "0x0000000000100000-0x000000003fffffff" in ran.stdout
    via_run = dksm("run", "--config-file", str(path), "--dedup", "none")
    assert via_run.returncode == 0, via_run.stderr
    assert via_run.stdout == ran.stdout
