"""A VM build that fails at any step leaves the process holding what it held before:
the same descriptors, the same mappings, no thread.  The builds run in a process of
their own (``tests/build_failures.py``, in a network namespace of its own where a tap
can be made), since they lower that process's resource limits."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from typing import Any

import pytest

from conftest import IS_ROOT, TESTS_DIR, requires_kvm

MIB = 1 << 20
GUEST_RAM = 32 * MIB  # build_failures.MEM_MIB
ARENA_SIZE = MIB  # CPython's object allocator (3.10 on, 64-bit)


@pytest.fixture(scope="module")
def report() -> dict[str, Any]:
    command = [sys.executable, str(TESTS_DIR / "build_failures.py")]
    env = dict(os.environ)
    if IS_ROOT and shutil.which("unshare") and shutil.which("ip"):
        command = ["unshare", "--net", *command]
        env["DKSM_TEST_NETNS"] = "1"
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=300, check=False, env=env
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def assert_holds_the_same(before: dict[str, Any], after: dict[str, Any], what: str) -> None:
    assert after["fds"] == before["fds"], f"{what}: descriptors {before['fds']} -> {after['fds']}"
    assert after["named_maps"] == before["named_maps"], f"{what}: named mappings differ"
    # The interpreter's allocator may grow its heap by an arena (1 MiB, anonymous)
    # between two snapshots, a mapping of its own (whether it does depends on how
    # full its arenas were, which any change of imports shifts); a leaked guest RAM
    # (or anything of its size) cannot hide in that, nor can a mapping that grows
    # the count without an arena's worth of bytes.
    grown = after["mapped_bytes"] - before["mapped_bytes"]
    assert grown < GUEST_RAM, f"{what}: {grown} more bytes mapped"
    arenas = max(grown, 0) // ARENA_SIZE
    assert after["maps"] - before["maps"] <= arenas, (
        f"{what}: {before['maps']} -> {after['maps']} mappings, {grown} more bytes"
    )
    assert after["threads"] == before["threads"], f"{what}: threads left running"


@requires_kvm
def test_the_full_config_builds(report: dict[str, Any]) -> None:
    """The config every failure below is made from builds when nothing is wrong."""
    assert report["warm_build"] is None
    if IS_ROOT:
        assert report["tap"] == "dksmtap0"


@requires_kvm
@pytest.mark.parametrize(
    ("case", "error"),
    [
        ("bad_config", "ConfigError: vcpu_count must be 1 to 32, not 0"),
        ("bad_image", "LoaderError: "),
        ("missing_drive", "BackingFileError: cannot open drive file "),
        ("missing_tap", "TapError: tap device dksmnotap9 does not exist"),
        ("vsock_directory_missing", "VsockSocketError: cannot listen on vsock socket "),
        ("address_space", "HostMappingError: mapping 33554432 bytes of anonymous memory"),
        ("not_kvm", "KvmError: KVM_GET_API_VERSION failed"),
    ],
)
def test_five_failed_builds_hold_nothing(report: dict[str, Any], case: str, error: str) -> None:
    result = report[case]
    assert len(result["errors"]) == 5
    assert all(e is not None and e.startswith(error) for e in result["errors"]), result["errors"]
    assert_holds_the_same(result["before"], result["after"], case)


@requires_kvm
def test_a_build_short_of_descriptors_fails_cleanly_at_every_step(report: dict[str, Any]) -> None:
    """With room for k more descriptors, for every k until the build succeeds: each
    failure is one line (a dksm error) and leaves the process as it was."""
    steps = report["fd_sweep"]["steps"]
    assert steps[-1]["error"] is None, "the build never succeeded"
    failures = [s["error"] for s in steps[:-1]]
    assert all(e is not None and not e.startswith("UNEXPECTED") for e in failures), failures
    # Every acquisition met the limit: the kernel image, drives, the vsock socket,
    # /dev/kvm, the VM, both vCPUs, and each virtio device's eventfds and epoll set.
    seen = " | ".join(failures)
    for where in (
        "cannot read kernel image",
        "cannot open drive file",
        "cannot make vsock socket",
        "cannot open /dev/kvm",
        "KVM_CREATE_VM failed",
        "KVM_CREATE_VCPU failed",
        "cannot attach virtio-block root",
        "cannot attach virtio-block spare",
        "cannot attach virtio-vsock",
        "cannot attach virtio-rng",
    ):
        assert where in seen, f"no build failed at {where!r}: {seen}"
    if report["tap"]:
        assert "cannot attach virtio-net eth0" in seen
    assert sum("KVM_CREATE_VCPU" in e for e in failures) == 2  # the second vCPU's too
    for step in steps:
        assert_holds_the_same(step["before"], step["after"], f"{step['extra']} more fds")


@requires_kvm
def test_failed_builds_leave_no_files(report: dict[str, Any]) -> None:
    """A vsock socket made before a later step failed is removed with the rest."""
    assert report["leftover_files"] == ["disk.img", "not-an-image", "spare.img"]
