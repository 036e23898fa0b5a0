"""Real Unikraft 0.17 unikernels, built for Firecracker from the public tree, boot
unchanged under dksm: alone, with several vCPUs, and as a fleet whose page pool holds
exactly what ``dksm analyze`` predicts.  Images the VMM cannot boot are refused with
one line saying what they are."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from dksm.analyze.pages import read_image
from dksm.analyze.predict import predict_fleet
from dksm.dedup.pool import PagePool
from dksm.fleet import control
from dksm.fleet.instance import DedupMode, InstanceSpec
from dksm.vmm.config import VmConfig

from conftest import UNIKRAFT_IMAGES, dksm, requires_kvm, requires_root, requires_unikraft

pytestmark = [requires_kvm, requires_unikraft]

BANNER_LINES = 7  # "Powered by", the logo, "Calypso 0.17.0"
MIB = 1 << 20
PAGE = 4096


@dataclass(frozen=True)
class RealImage:
    """A Firecracker-platform image, how to start it and what it prints after the banner."""

    name: str
    boot_args: str
    prints: tuple[str, ...]
    initrd: str | None = None

    @property
    def path(self) -> Path:
        return UNIKRAFT_IMAGES / self.name

    @property
    def initrd_path(self) -> str | None:
        return None if self.initrd is None else str(UNIKRAFT_IMAGES / self.initrd)


IMAGES = (
    RealImage("c-hello-fc-x86_64", "c-hello", ("Hello from Unikraft!",)),
    RealImage(
        "helloworld-fc-x86_64",
        "helloworld a b",
        ("Hello world!", 'Arguments:  "helloworld" "a" "b"'),
    ),
    RealImage(
        "c-fs-fc-x86_64",
        'c-fs vfs.fstab=[ "initrd0:/:extract::ramfs=1:" ] -- /hello.txt',
        ("Hello from Unikraft!",),
        initrd="c-fs-initrd.cpio",
    ),
    RealImage(
        "c-count-fc-x86_64",
        "c-count",
        ("c-count: start", "c-count: result a10f153a4e993b7b"),
    ),
)
BY_NAME = {image.name: image for image in IMAGES}


def _after_banner(console: str) -> list[str]:
    lines = console.split("\r\n")
    assert lines[0] == "Powered by", console
    assert lines[BANNER_LINES - 1].strip() == "Calypso 0.17.0", console
    assert lines[-1] == "", "every line ends in CRLF"
    return lines[BANNER_LINES:-1]


def _dksm_raw(*args: str) -> tuple[int, str, str]:
    """``dksm`` with its console bytes as they are (CRLF kept), decoded."""
    result = subprocess.run(
        [sys.executable, "-m", "dksm", *args], capture_output=True, timeout=90, check=False
    )
    return result.returncode, result.stdout.decode(), result.stderr.decode()


def _run(image: RealImage, *extra: str) -> tuple[int, str, str]:
    args = ["run", "--kernel", str(image.path), "--boot-args", image.boot_args, "--mem-mib", "64"]
    if image.initrd_path:
        args += ["--initrd", image.initrd_path]
    return _dksm_raw(*args, "--timeout", "60", *extra)


@pytest.mark.parametrize("name", sorted(BY_NAME))
def test_image_boots_to_exactly_its_lines_and_exits_zero(name: str) -> None:
    image = BY_NAME[name]
    status, out, err = _run(image)
    assert status == 0, err
    assert _after_banner(out) == list(image.prints)
    assert err == ""


def test_c_fs_without_the_app_name_reads_no_file() -> None:
    """The first word of the command line is argv[0], never a parameter (the README)."""
    image = BY_NAME["c-fs-fc-x86_64"]
    status, out, err = _run(
        RealImage(image.name, image.boot_args.removeprefix("c-fs "), (), image.initrd)
    )
    assert status == 0, err
    assert _after_banner(out) == ["fopen: Unable to open file /hello.txt"]


def test_image_boots_with_two_vcpus_from_a_firecracker_config(tmp_path: Path) -> None:
    image = BY_NAME["helloworld-fc-x86_64"]
    config = tmp_path / "vm.json"
    config.write_text(
        json.dumps(
            {
                "boot-source": {"kernel_image_path": str(image.path), "boot_args": image.boot_args},
                "drives": [],
                "machine-config": {"vcpu_count": 2, "mem_size_mib": 64, "smt": False},
            }
        )
    )
    status, out, err = _dksm_raw("run", "--config-file", str(config), "--timeout", "60")
    assert status == 0, err
    assert _after_banner(out) == list(image.prints)


def test_image_boots_without_the_tsc_frequency_leaf() -> None:
    """Without CPUID 0x40000010 Unikraft calibrates its TSC against the PIT (0.1 s)."""
    image = BY_NAME["c-hello-fc-x86_64"]
    status, out, err = _run(image, "--no-tsc-leaf")
    assert status == 0, err
    assert _after_banner(out) == list(image.prints)


def test_qemu_multiboot_image_is_refused_with_what_it_is() -> None:
    result = dksm("run", "--kernel", str(UNIKRAFT_IMAGES / "c-hello-qemu-x86_64"))
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "32-bit ELF with a multiboot header" in lines[0]
    assert "Firecracker" in lines[0]
    assert result.stdout == ""


@requires_root
def test_fleet_of_real_images_pools_exactly_the_predicted_pages() -> None:
    """8 VMs of each of the four images under dksm, in a fresh pool domain.  The launcher
    offers every VM's read-only pages to the pool before any VM ends, so the pages it
    had to store (scanned - merged) are the distinct pages, which ``dksm analyze``
    predicts from the files alone; every VM prints its lines and exits 0, and the pool
    is empty again once they have."""
    instances = 8
    mem_mib = 32
    domain = f"unikraft-{os.getpid()}"
    specs = [
        (
            image.name,
            InstanceSpec(
                VmConfig(
                    kernel_path=str(image.path),
                    boot_args=image.boot_args,
                    mem_mib=mem_mib,
                    initrd_path=image.initrd_path,
                ),
                DedupMode.DKSM,
                domain,
            ),
        )
        for image in IMAGES
        for _ in range(instances)
    ]
    predicted = predict_fleet(
        [read_image(image.path, mem_mib * MIB, image.name) for image in IMAGES],
        [instances] * len(IMAGES),
    )
    handle = control.up(specs, boot_timeout=120)
    try:
        deadline = time.monotonic() + 120
        while any(m.state in ("booting", "running") for m in handle.members()):
            assert time.monotonic() < deadline, handle.members()
            time.sleep(0.1)
        members = handle.members()
        assert [m.state for m in members] == ["exited"] * len(specs), members
        for index, (label, _) in enumerate(specs):
            console = handle.log_path(index).read_bytes().decode()
            assert _after_banner(console) == list(BY_NAME[label].prints), (index, label)
    finally:
        handle.down()
    with contextlib.closing(PagePool.open(domain)) as pool:
        stats = pool.stats()
        pool.purge()
    # Every page of every VM that is not a private copy was offered to the pool, and so
    # was every page of an initrd (loaded like a read-only segment; analysis looks at
    # images alone): each distinct initrd is stored once.
    initrd_pages = [
        -(-Path(image.initrd_path).stat().st_size // PAGE) for image in IMAGES if image.initrd_path
    ]
    assert stats.pages_scanned == (
        predicted.none_pages - predicted.dksm_private_pages + instances * sum(initrd_pages)
    )
    assert stats.pages_scanned - stats.pages_merged == (
        predicted.hashtable_entries + sum(initrd_pages)
    )
    assert stats.merging_failed == 0
    assert (stats.hashtable_entries, stats.leases, stats.file_blocks_bytes) == (0, 0, 0)
