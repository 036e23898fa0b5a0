"""The Linux guest: fetched from Debian's packages by dksm's own set-up, cached,
named by ``dksm guests path``, and its initramfs and bzImage as the kernel reads
them.  Fetching skips with the reason where apt-get or the packages cannot be had.
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

from dksm.guests import linux
from dksm.guests.initramfs import newc_archive, regular
from dksm.loader.elf import load_elf

from conftest import dksm


def read_newc(data: bytes) -> dict[str, tuple[int, bytes, tuple[int, int]]]:
    """name -> (mode, data, rdev) of every member, read as the kernel reads newc."""
    members: dict[str, tuple[int, bytes, tuple[int, int]]] = {}
    at = 0
    while True:
        assert data[at : at + 6] == b"070701", f"bad magic at {at}"
        fields = [int(data[at + 6 + 8 * i : at + 14 + 8 * i], 16) for i in range(13)]
        mode, size, namesize = fields[1], fields[6], fields[11]
        name_at = at + 110
        name = data[name_at : name_at + namesize - 1].decode()
        assert data[name_at + namesize - 1] == 0
        body = (name_at + namesize + 3) & ~3
        if name == "TRAILER!!!":
            return members
        members[name] = (mode, data[body : body + size], (fields[9], fields[10]))
        at = (body + size + 3) & ~3


def _env(cache: Path) -> dict[str, str]:
    return {**os.environ, linux.CACHE_ENV: str(cache)}


def test_fetch_caches_the_kernel_and_initrd_and_path_names_them(linux_cache: Path) -> None:
    again = dksm("guests", "fetch", "linux", env=_env(linux_cache))
    assert again.returncode == 0, again.stderr
    assert again.stdout.startswith("already cached: linux-image-6.")
    kernel = dksm("guests", "path", "linux", env=_env(linux_cache))
    initrd = dksm("guests", "path", "linux-initrd", env=_env(linux_cache))
    assert kernel.returncode == 0 and initrd.returncode == 0
    vmlinux = Path(kernel.stdout.strip())
    assert vmlinux == linux_cache / "linux" / "vmlinux"
    assert vmlinux.read_bytes()[:4] == b"\x7fELF"
    image = load_elf(str(vmlinux), 256 << 20)
    assert image.entry == 0x1000000  # startup_64 at the link address: no KASLR to undo
    assert not image.segments[0].writable  # .text and .rodata: what the pool shares
    assert Path(initrd.stdout.strip()).read_bytes()[:6] == b"070701"
    assert f"linux\t{vmlinux}\n" in dksm("guests", "list", "--paths", env=_env(linux_cache)).stdout
    listed = dksm("guests", "list", env=_env(linux_cache)).stdout
    assert f"{vmlinux.stat().st_size // 1024} KiB  Debian's cloud kernel" in listed
    # The cache is the user's alone.
    mode = (linux_cache / "linux").stat().st_mode
    assert not mode & (stat.S_IRWXG | stat.S_IRWXO)


def test_the_bzimage_boots_as_the_vmlinux_inside_it(linux_cache: Path) -> None:
    directory = linux_cache / "linux"
    from_bzimage = load_elf(str(directory / linux.BZIMAGE), 256 << 20)
    from_vmlinux = load_elf(str(directory / linux.VMLINUX), 256 << 20)
    assert from_bzimage.entry == from_vmlinux.entry
    assert from_bzimage.segments == from_vmlinux.segments


def test_the_initrd_holds_busybox_init_and_a_console(linux_cache: Path) -> None:
    members = read_newc((linux_cache / "linux" / linux.INITRD).read_bytes())
    mode, init, _ = members["init"]
    assert stat.S_ISREG(mode) and mode & 0o111
    assert init.decode() == linux.INIT_SCRIPT
    mode, busybox, _ = members["bin/busybox"]
    assert busybox[:4] == b"\x7fELF" and mode & 0o111
    mode, _, rdev = members["dev/console"]
    assert stat.S_ISCHR(mode) and rdev == (5, 1)
    assert stat.S_ISDIR(members["proc"][0])


def test_path_of_an_unfetched_guest_says_how_to_fetch_it(tmp_path: Path) -> None:
    result = dksm("guests", "path", "linux", env=_env(tmp_path / "empty"))
    assert result.returncode == 1
    assert "has not been fetched: run 'dksm guests fetch linux'" in result.stderr


def test_a_cache_another_user_could_write_is_refused(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    cache.chmod(0o777)
    result = dksm("guests", "fetch", "linux", env=_env(cache))
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1
    assert f"guest cache {cache} is writable by other users" in result.stderr


def test_newc_archives_pad_names_and_data_to_four_bytes() -> None:
    data = newc_archive([regular("a", b"xyz"), regular("dir-name/b", b"")])
    assert len(data) % 4 == 0
    members = read_newc(data)
    assert members["a"][1] == b"xyz" and members["dir-name/b"][1] == b""


def test_the_bzimage_kernel_starts_and_reads_its_command_line(linux_cache: Path) -> None:
    """The packaged bzImage, given to ``dksm run`` as it is, runs the kernel inside it
    to its first log lines (a whole boot takes minutes here: test_linux_boot.py).
    Stopped by SIGTERM once the command line shows, as a user would stop it."""
    args = f"{linux.BOOT_ARGS} earlyprintk=ttyS0 dksm.test=bzimage"
    command = [
        sys.executable, "-m", "dksm", "run", "--kernel", "linux-bzimage",
        "--boot-args", args, "--dedup", "none", "--timeout", "300",
    ]  # fmt: skip
    seen = b""
    with subprocess.Popen(
        command, env=_env(linux_cache), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    ) as vm:
        assert vm.stdout is not None
        deadline = time.monotonic() + 300
        while b"Command line: " + args.encode() not in seen and time.monotonic() < deadline:
            chunk = os.read(vm.stdout.fileno(), 4096)
            if not chunk:
                break
            seen += chunk
        vm.send_signal(signal.SIGTERM)
        _, stderr = vm.communicate(timeout=60)
    assert b"Linux version 6." in seen, stderr.decode(errors="replace")
    assert b"Command line: " + args.encode() in seen
    assert vm.returncode != 0 and b"Traceback" not in stderr  # stopped, in one line
