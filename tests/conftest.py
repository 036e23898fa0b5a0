"""Shared fixtures: the ``dksm`` command as a real subprocess, tiny assembly test
guests built with the system gcc, and skips for hosts without /dev/kvm or root."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

TESTS_DIR = Path(__file__).parent
SHM = "/dev/shm"
ASM_GUESTS_DIR = TESTS_DIR / "guests"

HAVE_KVM = os.access("/dev/kvm", os.R_OK | os.W_OK)
IS_ROOT = os.geteuid() == 0

requires_kvm = pytest.mark.skipif(not HAVE_KVM, reason="needs read-write /dev/kvm")

# Real Unikraft 0.17 images, built from the public tree (their README says how and what
# each prints).  They are not part of dksm: CI keeps them beside the clone.
UNIKRAFT_IMAGES = Path(
    os.environ.get("DKSM_UNIKRAFT_IMAGES") or TESTS_DIR.parent.parent / "shared/unikraft/images"
)
requires_unikraft = pytest.mark.skipif(
    not UNIKRAFT_IMAGES.is_dir(),
    reason=f"needs the real Unikraft images in {UNIKRAFT_IMAGES} (set DKSM_UNIKRAFT_IMAGES)",
)
requires_root = pytest.mark.skipif(not IS_ROOT, reason="needs root")

# Property-based tests run briefly by default (CI); DKSM_HYPOTHESIS_PROFILE=long runs
# them for minutes.  No deadline (the machine is shared) and no example database
# (nothing is written into the checkout).  Stateful tests scale their own counts down.
settings.register_profile(
    "ci",
    max_examples=200,
    stateful_step_count=10,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "long",
    max_examples=20_000,
    stateful_step_count=50,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("DKSM_HYPOTHESIS_PROFILE", "ci"))


def dksm(
    *args: str, timeout: float = 60, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the real ``dksm`` command line in a fresh interpreter."""
    return subprocess.run(
        [sys.executable, "-m", "dksm", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env=env,
    )


@pytest.fixture(scope="session", autouse=True)
def private_runtime_dirs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Every pool and fleet a test makes lives in its own directories, never the
    host's defaults; the real command lines the tests start inherit these.  Pools
    go on tmpfs, as in production (page-cache frames, punched holes, st_blocks)."""
    pool_root = Path(tempfile.mkdtemp(prefix="dksm-test-pools-", dir=SHM))
    os.environ["DKSM_POOL_ROOT"] = str(pool_root)
    os.environ["DKSM_RUN_DIR"] = str(tmp_path_factory.mktemp("fleets"))
    yield
    # A test that failed half-way may have left a fleet running: stop it, so no VM
    # outlives the session (and none keeps KSM busy for the tests that follow).
    from dksm.fleet.control import FleetHandle

    for directory in Path(os.environ["DKSM_RUN_DIR"]).glob("*"):
        if (directory / "spec.json").exists():
            FleetHandle(directory).down(timeout=30)
    shutil.rmtree(pool_root, ignore_errors=True)


@pytest.fixture
def shm_root() -> Iterator[Path]:
    """A pool root of the test's own on tmpfs, as every pool root must be, removed
    with everything in it afterwards."""
    made = Path(tempfile.mkdtemp(prefix="dksm-test-", dir=SHM))
    yield made
    shutil.rmtree(made, ignore_errors=True)


@pytest.fixture(scope="session")
def asm_guest(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """Build ``tests/guests/NAME.S`` into a bootable ELF linked at 1 MiB."""
    if shutil.which("gcc") is None:
        pytest.skip("needs gcc to build the assembly test guests")
    out = tmp_path_factory.mktemp("asm-guests")
    built: dict[str, Path] = {}

    def build(name: str) -> Path:
        if name not in built:
            elf = out / f"{name}.elf"
            subprocess.run(
                [
                    "gcc",
                    "-nostdlib",
                    "-static",
                    "-Wl,-z,noseparate-code",
                    "-Wl,-Ttext-segment=0x100000",
                    "-Wl,--build-id=none",
                    "-o",
                    str(elf),
                    str(ASM_GUESTS_DIR / f"{name}.S"),
                ],
                check=True,
            )
            built[name] = elf
        return built[name]

    return build


@pytest.fixture(scope="session")
def linux_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The Linux guest (``dksm guests fetch linux``), fetched once per session into a
    private cache (or the one ``DKSM_GUEST_CACHE`` names); skips where the Debian
    packages cannot be had."""
    from dksm.guests import linux

    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        pytest.skip("fetching the Linux guest needs apt-get and dpkg-deb (a Debian host)")
    root = Path(os.environ.get(linux.CACHE_ENV) or tmp_path_factory.mktemp("guest-cache"))
    try:
        linux.fetch_linux(root)
    except linux.GuestFetchError as exc:
        pytest.skip(f"the Debian packages cannot be had here: {exc}")
    return root
