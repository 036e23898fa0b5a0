"""``dksm pool`` and ``dksm run --dedup`` through the real command line."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dksm.dedup.pool import PagePool
from dksm.guests import guest_path
from vm_inspect import readonly_pages

from conftest import dksm, requires_kvm, requires_root

pytestmark = [requires_kvm, requires_root]


def pool_stats(domain: str) -> dict[str, object]:
    result = dksm("pool", "stats", "--domain", domain, "--json")
    assert result.returncode == 0, result.stderr
    doc: dict[str, object] = json.loads(result.stdout)
    return doc


def test_pool_commands_and_run_switch() -> None:
    domain = "cli-pool"
    missing = dksm("pool", "stats", "--domain", domain)
    assert missing.returncode == 1 and f"no pool for domain '{domain}'" in missing.stderr
    hello = str(guest_path("hello"))
    ran = dksm("run", "--kernel", hello, "--mem-mib", "16", "--domain", domain, "-v")
    assert ran.returncode == 0, ran.stderr
    stats = pool_stats(domain)
    pages = len(readonly_pages(guest_path("hello")))
    assert stats["pages_scanned"] == pages
    assert stats["hashtable_entries"] == 0 and stats["leases"] == 0  # released at exit
    assert stats["file_blocks_bytes"] == 0 and stats["run"] is True

    assert dksm("pool", "disable", "--domain", domain).returncode == 0
    copied = dksm("run", "--kernel", hello, "--mem-mib", "16", "--domain", domain)
    assert copied.returncode == 0 and "hello: bye" in copied.stdout  # loads copy instead
    assert pool_stats(domain)["pages_scanned"] == pages  # nothing offered while off
    assert dksm("pool", "enable", "--domain", domain).returncode == 0
    assert pool_stats(domain)["run"] is True

    idle = subprocess.Popen(
        [sys.executable, "-m", "dksm", "run", "--kernel", str(guest_path("idle")),
         "--mem-mib", "16", "--domain", domain],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        assert idle.stdout is not None and idle.stdout.readline() == b"idle: dksm guest kit\n"
        live = pool_stats(domain)
        assert live["leases"] == 1 and live["hashtable_entries"] == pages
        refused = dksm("pool", "purge", "--domain", domain)
        assert refused.returncode == 1 and "live lease" in refused.stderr
    finally:
        idle.kill()
        idle.wait()
    time.sleep(0.1)
    swept = dksm("pool", "sweep", "--domain", domain)
    assert swept.returncode == 0 and "swept 1 lease" in swept.stdout
    purged = dksm("pool", "purge", "--domain", domain)
    assert purged.returncode == 0, purged.stderr
    assert not os.path.exists(os.path.join(os.environ["DKSM_POOL_ROOT"], domain))


def test_run_dedup_modes() -> None:
    hello = str(guest_path("hello"))
    for mode in ("none", "ksm", "dksm", "dksm+ksm"):
        result = dksm("run", "--kernel", hello, "--mem-mib", "16", "--dedup", mode,
                      "--domain", "cli-modes")  # fmt: skip
        assert result.returncode == 0, (mode, result.stderr)
        assert result.stdout.splitlines()[-1] == "hello: bye"
    bad = dksm("run", "--kernel", hello, "--dedup", "sometimes")
    assert bad.returncode == 1 and "unknown dedup mode 'sometimes'" in bad.stderr
    bad_domain = dksm("run", "--kernel", hello, "--domain", "../escape")
    assert bad_domain.returncode == 1 and "domain name" in bad_domain.stderr


def test_full_tmpfs_is_a_clear_error_and_leaves_the_pool_consistent(tmp_path: Path) -> None:
    tiny = tmp_path / "tiny"
    tiny.mkdir()
    options = "size=64k,mode=0700"  # a pool root others may write is refused
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(tiny)],
                             capture_output=True, check=False)  # fmt: skip
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        result = dksm("run", "--kernel", str(guest_path("hello")), "--mem-mib", "16",
                      "--pool-root", str(tiny))  # fmt: skip
        assert result.returncode == 1
        assert "Traceback" not in result.stderr
        assert result.stderr.startswith("dksm: error: ") and "full" in result.stderr
        with contextlib.closing(PagePool.open("default", tiny)) as pool:
            assert pool.verify() == []
            stats = pool.stats()
            assert (stats.leases, stats.hashtable_entries, stats.file_blocks_bytes) == (0, 0, 0)
    finally:
        subprocess.run(["umount", str(tiny)], check=False)
