"""What ``dksm run`` loads to start a VM: only the run path, and the emulation
fallback's code read but not run until a guest needs it."""

from __future__ import annotations

import compileall
import gc
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import requires_kvm

# Modules a VM without virtio devices, whose guest needs no emulated instruction,
# must not import (each costs milliseconds of every start).
NOT_ON_THE_RUN_PATH = (
    "dksm.vmm.emulation",
    "dksm.x86emu.decode",
    "dksm.x86emu.execute",
    "dksm.x86emu.disassemble",
    "dksm.devices.virtio.device",
    "dksm.devices.tap",
    "socket",
    "logging",
    "pydantic",
)


# Modules of milliseconds each (or that pull such in) that a VM of the shipped hello
# guest with the page pool does not import, confined or not: argparse with gettext
# and locale (plain flags are read without it), typing and dataclasses (with
# inspect, ast, dis, tokenize), json, datetime, the device config with its patterns,
# the config-file schema, the post-boot merge, the initrd loader, KSM control;
# pathlib with what it pulls in (re, fnmatch, urllib.parse, ipaddress): the pool's
# path checks are written over strings and descriptors; signal (its C half serves).
HEAVY = (
    "signal",
    "pathlib",
    "re",
    "fnmatch",
    "urllib.parse",
    "ipaddress",
    "argparse",
    "gettext",
    "locale",
    "typing",
    "dataclasses",
    "inspect",
    "ast",
    "dis",
    "tokenize",
    "json",
    "datetime",
    "calendar",
    "subprocess",
    "shutil",
    "tempfile",
    "dksm.vmm.device_config",
    "dksm.vmm.schema",
    "dksm.fleet.boot_merge",
    "dksm.fleet.directory",
    "dksm.loader.initrd",
    "dksm.dedup.ksm",
)


def _imported(*args: str, env: dict[str, str] | None = None) -> set[str]:
    """The modules a ``dksm`` command imported, from ``python -X importtime``."""
    ran = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "dksm", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert ran.returncode == 0, ran.stderr
    lines = [line for line in ran.stderr.splitlines() if line.startswith("import time:")]
    names = {line.rsplit("|", 1)[1].strip() for line in lines[1:]}
    # A module imported by importlib.import_module gets no line of its own, only its
    # submodules do; a submodule's package was imported all the same.
    return {name.rsplit(".", level)[0] for name in names for level in range(name.count(".") + 1)}


@requires_kvm
def test_run_imports_neither_devices_nor_emulation_it_does_not_use() -> None:
    imported = _imported("run", "--kernel", "hello", "--mem-mib", "16")
    assert "dksm.vmm.builder" in imported  # the probe sees the run path itself
    assert sorted(imported.intersection(NOT_ON_THE_RUN_PATH)) == []


@requires_kvm
@pytest.mark.parametrize("confine", [True, False], ids=["confined", "unconfined"])
def test_run_with_the_pool_imports_no_heavy_module(confine: bool, tmp_path: Path) -> None:
    # A record of KSM settings left by a crashed dksm elsewhere on the host would
    # make any command import KSM control to restore them: point it at none.
    env = {**os.environ, "DKSM_KSM_STATE": str(tmp_path / "no-ksm-record.json")}
    flags = () if confine else ("--no-confine",)
    imported = _imported("run", "--kernel", "hello", "--mem-mib", "16", "--dedup", "dksm",
                         *flags, env=env)  # fmt: skip
    assert {"dksm.vmm.builder", "dksm.dedup.pool"} <= imported  # the run path, with the pool
    assert ("dksm.vmm.confinement" in imported) == confine
    assert sorted(imported.intersection(HEAVY)) == []


@requires_kvm
@pytest.mark.skipif(not os.path.exists("/sys/module/kvm_pvm"), reason="needs a PVM host")
def test_confined_vm_runs_the_held_emulation_fallback_when_its_guest_needs_it() -> None:
    # sseprobe's SSE instructions exit to the VMM only after confinement, when no
    # module file can be opened any more: the held code is what runs them.
    ran = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "dksm", "run", "--kernel", "sseprobe",
         "--mem-mib", "16", "--verbose"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert ran.returncode == 0, ran.stderr
    assert "sseprobe: done" in ran.stdout
    assert "instructions emulated in user space: 0 " not in ran.stderr
    assert "dksm.vmm.emulation" in ran.stderr


def test_held_module_runs_from_memory_after_its_file_is_gone(tmp_path: Path) -> None:
    package = tmp_path / "heldpkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "late.py").write_text("import os\nANSWER = 6 * 7\nWHERE = __file__\n")
    probe = (
        "import os, sys\n"
        f"sys.path.insert(0, {str(tmp_path)!r})\n"
        "import heldpkg\n"
        "from dksm.vmm import held_modules\n"
        "held_modules.hold(['heldpkg.late'])\n"
        "assert 'heldpkg.late' not in sys.modules\n"
        "print(held_modules.held())\n"
        f"os.remove({str(package / 'late.py')!r})\n"
        "sys.dont_write_bytecode = True\n"
        "import importlib; importlib.invalidate_caches()\n"
        "from heldpkg import late\n"
        "print(late.ANSWER, os.path.basename(late.WHERE), held_modules.held())\n"
    )
    ran = subprocess.run(
        [sys.executable, "-B", "-c", probe], capture_output=True, text=True, timeout=30
    )
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.split("\n")[:2] == ["['heldpkg.late']", "42 late.py []"]


def test_held_module_runs_its_cached_bytecode_only_while_it_matches_the_source(
    tmp_path: Path,
) -> None:
    package = tmp_path / "cachedpkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "fresh.py").write_text("ANSWER = 42\n")
    (package / "stale.py").write_text("ANSWER = 1\n")
    assert compileall.compile_dir(package, quiet=1)
    # Changed after its bytecode was cached (and longer, whatever the clock says).
    (package / "stale.py").write_text("ANSWER = 2  # edited\n")
    probe = (
        "import shutil, sys\n"
        f"sys.path.insert(0, {str(tmp_path)!r})\n"
        "import cachedpkg\n"
        "from dksm.vmm import held_modules\n"
        "held_modules.hold(['cachedpkg.fresh', 'cachedpkg.stale'])\n"
        f"shutil.rmtree({str(package)!r})\n"
        "import importlib; importlib.invalidate_caches()\n"
        "from cachedpkg import fresh, stale\n"
        "print(fresh.ANSWER, stale.ANSWER)\n"
    )
    ran = subprocess.run(
        [sys.executable, "-B", "-c", probe], capture_output=True, text=True, timeout=30
    )
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout == "42 2\n"


def test_only_source_modules_can_be_held() -> None:
    from dksm.vmm import held_modules

    with pytest.raises(ImportError, match="not a Python source module"):
        held_modules.hold(["dksm.no_such_module_here"])


def test_start_up_holds_the_collector_off_until_it_is_over() -> None:
    from dksm.cli.run import StartUp

    assert gc.isenabled()
    frozen = gc.get_freeze_count()
    try:
        start_up = StartUp()
        assert not gc.isenabled()
        start_up.over()
        assert gc.isenabled()
        assert gc.get_freeze_count() > frozen  # what start-up made is out of its sight
        start_up.over()  # again (a failed start ends here too): nothing changes
        assert gc.isenabled()
    finally:
        gc.enable()
        gc.unfreeze()


def test_start_up_leaves_a_collector_its_caller_turned_off_off() -> None:
    from dksm.cli.run import StartUp

    gc.disable()
    try:
        start_up = StartUp()
        start_up.over()
        assert not gc.isenabled()
    finally:
        gc.enable()
