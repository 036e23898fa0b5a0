"""Linux guests from Debian's packages: fetched, unpacked and cached, never installed.

``dksm guests fetch linux`` downloads Debian's cloud kernel (the versioned package
``linux-image-cloud-amd64`` depends on) and ``busybox-static`` with
``apt-get download``, unpacks them with ``dpkg-deb -x`` into a scratch directory of
the cache (nothing is installed as the host's kernel or anywhere else), takes the
uncompressed ``vmlinux`` out of the package's bzImage (:mod:`dksm.loader.bzimage`)
and builds a tiny initramfs whose ``/init`` (a busybox shell script) prints the
kernel command line, shows a shell prompt and reboots, which ends a microVM
booted with ``reboot=k`` (Firecracker's convention; see docs/BOOT.md).  After that
``dksm guests path linux`` and ``dksm guests path linux-initrd`` name the files,
and ``dksm run --kernel linux --initrd linux-initrd`` boots them by name.

The cache is per user: ``$DKSM_GUEST_CACHE`` if set, else
``$XDG_CACHE_HOME/dksm/guests`` (``~/.cache/dksm/guests``).  It is created 0700 and
must belong to the user and be writable by nobody else, since dksm boots what it
finds there.  Files are written under temporary names and renamed into place, the
manifest last, so an interrupted fetch leaves either the old guest or none.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from dksm.error import DksmError
from dksm.guests import initramfs

KERNEL_META_PACKAGE = "linux-image-cloud-amd64"
BUSYBOX_PACKAGE = "busybox-static"
CACHE_ENV = "DKSM_GUEST_CACHE"
LINUX_DIR = "linux"
MANIFEST = "manifest.json"
VMLINUX = "vmlinux"
BZIMAGE = "vmlinuz"
INITRD = "initrd.cpio"
KERNEL_CONFIG = "config"
# Names ``dksm guests path`` and ``dksm run`` accept for the fetched files.
FETCHED_NAMES = {"linux": VMLINUX, "linux-initrd": INITRD, "linux-bzimage": BZIMAGE}
# The kernel's decompressed ELF is about 50 MiB; anything far larger is not it.
VMLINUX_LIMIT = 512 << 20
COMMAND_TIMEOUT_S = 600

# The command line tests and benchmarks boot it with: Firecracker's, plus what a
# kernel whose code is emulated needs on PVM hosts (docs/BOOT.md, "Linux guests"):
# no soft-lockup detector (its 20 s threshold means nothing at this speed), no AVX
# or SSSE3 in the kernel (the guest sees the host's AVX-512, which nothing here can
# execute), none of the tracing start-up work (ftrace's check of its records,
# tracefs's thousands of event files: minutes of emulation that matter only to
# tracing) and no crypto self-tests.
BOOT_ARGS = (
    "console=ttyS0 reboot=k panic=1 pci=off nosoftlockup clearcpuid=avx,ssse3 "
    "initcall_blacklist=ftrace_check_for_weak_functions,ftrace_check_sync,"
    "trace_eval_init,tracer_init_tracefs cryptomgr.notests"
)
# The kernel's last line before it runs /init: its own boot (and its patching) is
# done.  Benchmarks time the boot to it and merge after it.
KERNEL_BOOTED = "Run /init as init process"
# What /init prints first: tests and benchmarks wait for this line.
INIT_BANNER = "dksm-init: /proc/cmdline:"
SHELL_CHECK = "dksm-init: shell ok"
INIT_SCRIPT = f"""#!/bin/busybox sh
# dksm's Linux guest: say what the kernel was told, show a shell, end the VM.
/bin/busybox mount -t proc proc /proc
echo "{INIT_BANNER} $(/bin/busybox cat /proc/cmdline)"
# An interactive shell reading one command: its prompt is the shell prompt line.
echo 'echo {SHELL_CHECK}' | /bin/busybox sh -i 2>&1
echo
# reboot=k on the command line makes this an i8042 reset, which ends the VM.
/bin/busybox reboot -f
"""


class GuestFetchError(DksmError):
    """The Linux guest cannot be fetched or is not in the cache; the message says why."""


@dataclass(frozen=True)
class FetchedLinux:
    """The cached Linux guest: its files and where they came from."""

    directory: Path
    kernel_package: str
    kernel_version: str
    busybox_version: str

    @property
    def vmlinux(self) -> Path:
        return self.directory / VMLINUX

    @property
    def initrd(self) -> Path:
        return self.directory / INITRD

    @property
    def bzimage(self) -> Path:
        return self.directory / BZIMAGE


def cache_root() -> Path:
    """The per-user guest cache (not checked or created here)."""
    override = os.environ.get(CACHE_ENV)
    if override:
        return Path(override)
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "dksm" / "guests"


def _check_private(path: Path) -> None:
    """``path`` is a real directory of ours that nobody else may write."""
    try:
        info = os.lstat(path)
    except OSError as exc:
        raise GuestFetchError(f"guest cache {path}: {exc.strerror}") from exc
    if not stat.S_ISDIR(info.st_mode):
        raise GuestFetchError(f"guest cache {path} is not a directory (a symlink or a file)")
    if info.st_uid != os.geteuid():
        raise GuestFetchError(
            f"guest cache {path} belongs to uid {info.st_uid}, not to you: dksm boots "
            f"what it holds, so it must be yours (set {CACHE_ENV} to another directory)"
        )
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise GuestFetchError(
            f"guest cache {path} is writable by other users; run chmod go-w on it"
        )


def _private_directory(path: Path) -> Path:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    _check_private(path)
    return path


def cached_linux(root: Path | None = None) -> FetchedLinux | None:
    """The fetched Linux guest, or None when it has not been fetched."""
    directory = (root or cache_root()) / LINUX_DIR
    manifest = directory / MANIFEST
    if not manifest.is_file():
        return None
    _check_private(directory.parent)
    _check_private(directory)
    try:
        doc = json.loads(manifest.read_text())
        fetched = FetchedLinux(
            directory,
            str(doc["kernel_package"]),
            str(doc["kernel_version"]),
            str(doc["busybox_version"]),
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise GuestFetchError(
            f"the guest cache's {manifest} is damaged ({exc}); run 'dksm guests fetch linux "
            "--refresh'"
        ) from exc
    return fetched


def fetched_path(name: str, root: Path | None = None) -> Path | None:
    """The cached file a fetched guest's name stands for, if it was fetched."""
    if name not in FETCHED_NAMES:
        return None
    fetched = cached_linux(root)
    if fetched is None:
        return None
    path = fetched.directory / FETCHED_NAMES[name]
    return path if path.is_file() else None


def _run(command: list[str], cwd: Path, what: str) -> str:
    if shutil.which(command[0]) is None:
        raise GuestFetchError(
            f"{what} needs {command[0]}, which is not installed (a Debian or Ubuntu host has it)"
        )
    try:
        result = subprocess.run(
            command,
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise GuestFetchError(f"{what}: {command[0]} took longer than {exc.timeout:g} s") from exc
    if result.returncode != 0:
        lines = [line for line in result.stderr.splitlines() if line.startswith(("E:", "dpkg"))]
        detail = lines[-1] if lines else (result.stderr.strip().splitlines() or ["no message"])[-1]
        raise GuestFetchError(f"{what} failed ({' '.join(command[:2])}): {detail}")
    return result.stdout


def kernel_package(scratch: Path) -> str:
    """The versioned kernel package the cloud meta-package depends on."""
    out = _run(["apt-cache", "depends", KERNEL_META_PACKAGE], scratch, "finding the cloud kernel")
    found: list[str] = re.findall(r"Depends:\s*(linux-image-[0-9][\w.+-]*-cloud-amd64)\b", out)
    if not found:
        raise GuestFetchError(
            f"apt-cache knows no kernel that {KERNEL_META_PACKAGE} depends on (is this a "
            "Debian host with its package lists? 'apt-get update' fetches them)"
        )
    return found[0]


def _download(packages: list[str], scratch: Path) -> dict[str, Path]:
    command = ["apt-get", "download", "-q"]
    if os.geteuid() == 0:
        # As root apt drops to its _apt user, which cannot write our 0700 scratch.
        command += ["-o", "APT::Sandbox::User=root"]
    _run([*command, *packages], scratch, "downloading " + " and ".join(packages))
    debs: dict[str, Path] = {}
    for package in packages:
        matches = sorted(scratch.glob(f"{package}_*.deb"))
        if not matches:
            raise GuestFetchError(f"apt-get download left no .deb for {package}")
        debs[package] = matches[-1]
    return debs


def _version(deb: Path, scratch: Path) -> str:
    return _run(["dpkg-deb", "-f", str(deb), "Version"], scratch, "reading a package").strip()


def _unpack(deb: Path, into: Path, scratch: Path) -> Path:
    into.mkdir(mode=0o700)
    _run(["dpkg-deb", "-x", str(deb), str(into)], scratch, f"unpacking {deb.name}")
    return into


def _only(directory: Path, pattern: str, what: str) -> Path:
    found = sorted(p for p in directory.glob(pattern) if p.is_file() and not p.is_symlink())
    if len(found) != 1:
        raise GuestFetchError(f"the package holds {len(found)} {what} files, expected one")
    return found[0]


def build_initramfs(busybox: bytes) -> bytes:
    """The guest's initramfs: busybox and the /init script, with /dev/console."""
    return initramfs.newc_archive(
        [
            initramfs.directory("bin"),
            initramfs.directory("dev"),
            initramfs.directory("proc"),
            initramfs.char_device("dev/console", initramfs.CONSOLE_MAJOR, initramfs.CONSOLE_MINOR),
            initramfs.regular("bin/busybox", busybox, executable=True),
            initramfs.regular("init", INIT_SCRIPT.encode(), executable=True),
        ]
    )


def _write(directory: Path, name: str, data: bytes) -> None:
    fd, temporary = tempfile.mkstemp(dir=directory, prefix=f".{name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(temporary, 0o644)
        os.replace(temporary, directory / name)
    except BaseException:
        os.unlink(temporary)
        raise


def fetch_linux(root: Path | None = None, refresh: bool = False) -> tuple[FetchedLinux, bool]:
    """Fetch and cache the Linux guest; (the guest, whether it was fetched now)."""
    from dksm.loader.bzimage import extract_vmlinux

    root = root or cache_root()
    existing = None if refresh else cached_linux(root)
    if existing is not None:
        return existing, False
    _private_directory(root)
    directory = _private_directory(root / LINUX_DIR)
    with tempfile.TemporaryDirectory(dir=root, prefix=".fetch-") as temporary:
        scratch = Path(temporary)
        package = kernel_package(scratch)
        debs = _download([package, BUSYBOX_PACKAGE], scratch)
        kernel_tree = _unpack(debs[package], scratch / "kernel", scratch)
        busybox_tree = _unpack(debs[BUSYBOX_PACKAGE], scratch / "busybox", scratch)
        bzimage_path = _only(kernel_tree / "boot", "vmlinuz-*", "kernel image (boot/vmlinuz-*)")
        bzimage = bzimage_path.read_bytes()
        vmlinux = extract_vmlinux(bzimage, VMLINUX_LIMIT, str(bzimage_path.name))
        busybox = _only(busybox_tree / "bin", "busybox", "busybox").read_bytes()
        config = _only(kernel_tree / "boot", "config-*", "kernel config (boot/config-*)")
        manifest = {
            "kernel_package": package,
            "kernel_version": _version(debs[package], scratch),
            "busybox_version": _version(debs[BUSYBOX_PACKAGE], scratch),
        }
        (directory / MANIFEST).unlink(missing_ok=True)  # incomplete until written again
        _write(directory, VMLINUX, vmlinux)
        _write(directory, BZIMAGE, bzimage)
        _write(directory, INITRD, build_initramfs(busybox))
        _write(directory, KERNEL_CONFIG, config.read_bytes())
        _write(directory, MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())
    fetched = cached_linux(root)
    assert fetched is not None
    return fetched, True
