"""The shipped guests boot for real under ``dksm run`` and do what they promise;
rebuilding them from source reproduces the shipped bytes."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from dksm.guests import catalog, guest_path
from dksm.loader.elf import load_elf
from dksm.loader.segment import shareable_span

from conftest import dksm, requires_kvm

REPO = Path(__file__).parent.parent
MASK64 = (1 << 64) - 1


def compute_checksum(rounds: int = 10) -> int:
    """The ``compute`` guest's work, done independently on the host (guests/README.md)."""
    seed = 0x0123456789ABCDEF
    state, h = seed, 0xCBF29CE484222325
    for _ in range(rounds):
        buf = bytearray()
        for _ in range(512):
            state ^= (state << 13) & MASK64
            state ^= state >> 7
            state ^= (state << 17) & MASK64
            buf += state.to_bytes(8, "little")
        for c in buf:
            h = ((h ^ c) * 0x100000001B3) & MASK64
        state ^= h
        if state == 0:
            state = seed
    return h


def test_guests_list_and_path() -> None:
    result = dksm("guests", "list")
    assert result.returncode == 0
    header, *rows = result.stdout.splitlines()
    assert header.split() == ["guest", "size", "what", "it", "does"]
    described = {row.split()[0]: row for row in rows}
    assert {"hello", "idle", "compute", "cowprobe"} <= set(described)
    assert "powers off" in described["hello"]  # each guest says what it does
    assert all(len(row.split()) > 3 for row in rows)
    paths = dksm("guests", "list", "--paths")
    names = [line.split("\t")[0] for line in paths.stdout.splitlines()]
    assert names == list(described)
    path = dksm("guests", "path", "hello")
    assert path.returncode == 0 and Path(path.stdout.strip()) == guest_path("hello")
    missing = dksm("guests", "path", "nosuch")
    assert missing.returncode == 1 and "no guest named 'nosuch'" in missing.stderr


def test_shipped_guests_share_a_library_at_the_same_addresses() -> None:
    images = {name: load_elf(str(path), 16 << 20) for name, path in catalog().items()}
    pages: dict[str, dict[int, bytes]] = {}
    for name, image in images.items():
        pages[name] = {}
        for seg in image.segments:
            start, end = shareable_span(seg)
            for addr in range(start, end, 4096):
                off = addr - seg.guest_addr
                pages[name][addr] = seg.data[off : off + 4096]
    common = set.intersection(*(set(p.items()) for p in pages.values()))
    assert len(common) * 4096 >= 256 * 1024  # the shared library part, page for page
    assert pages["hello"] != pages["compute"]  # and the apps differ


@requires_kvm
def test_hello_prints_cmdline_and_e820() -> None:
    result = dksm(
        "run", "--kernel", str(guest_path("hello")), "--boot-args", "a=1 b=two", "--mem-mib", "32"
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert 'hello: cmdline="a=1 b=two"' in lines
    assert "hello: e820 2 entries" in lines
    assert "e820: 0x0000000000000000-0x000000000009fbff type 1" in lines
    assert "e820: 0x0000000000100000-0x0000000001ffffff type 1" in lines  # 32 MiB
    assert lines[-1] == "hello: bye"


@requires_kvm
def test_firecracker_config_boots_hello(tmp_path: Path) -> None:
    config = tmp_path / "vm.json"
    config.write_text(
        json.dumps(
            {
                "boot-source": {
                    "kernel_image_path": str(guest_path("hello")),
                    "boot_args": "console=ttyS0 from=config",
                },
                "drives": [],
                "machine-config": {"vcpu_count": 1, "mem_size_mib": 64, "smt": False},
                "network-interfaces": [],
            }
        )
    )
    result = dksm("run", "--config-file", str(config))
    assert result.returncode == 0, result.stderr
    assert 'hello: cmdline="console=ttyS0 from=config"' in result.stdout
    assert "e820: 0x0000000000100000-0x0000000003ffffff type 1" in result.stdout


@requires_kvm
def test_compute_checksum_matches_the_host() -> None:
    result = dksm("run", "--kernel", str(guest_path("compute")), "--mem-mib", "16")
    assert result.returncode == 0, result.stderr
    assert f"compute: checksum=0x{compute_checksum(10):016x}" in result.stdout.splitlines()
    quick = dksm("run", "--kernel", str(guest_path("compute")), "--boot-args", "rounds=1")
    assert f"compute: checksum=0x{compute_checksum(1):016x}" in quick.stdout.splitlines()


@requires_kvm
def test_idle_stays_up_until_timeout() -> None:
    result = dksm("run", "--kernel", str(guest_path("idle")), "--timeout", "1")
    assert result.returncode == 5
    assert result.stdout.splitlines()[-1] == "idle: ready"


@requires_kvm
def test_cowprobe_sees_its_own_write() -> None:
    result = dksm("run", "--kernel", str(guest_path("cowprobe")), "--timeout", "1")
    assert result.returncode == 5
    lines = result.stdout.splitlines()
    assert "cowprobe: before=423b342d261f1811" in lines
    assert "cowprobe: after=4b4f574f434b5344" in lines
    assert "cowprobe: ready" in lines


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc to rebuild the guests")
def test_rebuilding_reproduces_the_shipped_images(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            str(REPO / "guests" / "build.py"),
            "--out",
            str(tmp_path),
            "--build-dir",
            str(tmp_path / "work"),
        ],
        check=True,
        capture_output=True,
    )
    for name, shipped in catalog().items():
        rebuilt = tmp_path / f"{name}.elf"
        assert rebuilt.read_bytes() == shipped.read_bytes(), name


@requires_kvm
def test_touch_fills_guest_memory_with_pages_all_different(tmp_path: Path) -> None:
    info_file = tmp_path / "vm.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "dksm", "run", "--kernel", str(guest_path("idle")),
         "--mem-mib", "16", "--dedup", "none", "--boot-args", "touch=1024",
         "--info-file", str(info_file)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"dksm: touched 1024 KiB\n"
        info = json.loads(info_file.read_text())
        with open(f"/proc/{info['pid']}/mem", "rb") as mem:
            words = []
            for page in range(256):
                mem.seek(info["ram_host_address"] + 0x400000 + page * 4096)
                words.append(mem.read(8))
        assert len(set(words)) == 256 and b"\0" * 8 not in words
    finally:
        proc.kill()
        proc.wait()


@requires_kvm
def test_initrd_is_loaded_and_announced_in_the_zero_page(tmp_path: Path) -> None:
    initrd = tmp_path / "initrd.img"
    initrd.write_bytes(bytes(range(256)) * 64 + b"end of initrd")
    config = tmp_path / "vm.json"
    config.write_text(json.dumps({
        "boot-source": {"kernel_image_path": str(guest_path("idle")),
                        "initrd_path": str(initrd)},
        "machine-config": {"vcpu_count": 1, "mem_size_mib": 32},
    }))  # fmt: skip
    info_file = tmp_path / "vm.info.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "dksm", "run", "--config-file", str(config),
         "--dedup", "none", "--info-file", str(info_file)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"idle: dksm guest kit\n"
        info = json.loads(info_file.read_text())
        with open(f"/proc/{info['pid']}/mem", "rb") as mem:
            mem.seek(info["ram_host_address"] + 0x7000 + 0x218)  # ramdisk_image, ramdisk_size
            address, size = struct.unpack("<II", mem.read(8))
            mem.seek(info["ram_host_address"] + address)
            loaded = mem.read(size)
        assert loaded == initrd.read_bytes()
        assert address % 4096 == 0 and address + size <= 32 << 20
    finally:
        proc.kill()
        proc.wait()
