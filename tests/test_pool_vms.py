"""The page pool with real VMs: what issue "the page pool" promises, shown on real
guests booted on /dev/kvm, with sharing checked in /proc/PID/smaps and guest memory
read back through /proc/PID/mem."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

from dksm.dedup.pool import PagePool, pool_directory
from dksm.fleet import control
from dksm.fleet.instance import DedupMode, InstanceSpec
from dksm.guests import guest_path
from dksm.vmm.config import VmConfig
from vm_inspect import PAGE, mappings_of, read_guest, readonly_pages

from conftest import requires_kvm, requires_root

pytestmark = [requires_kvm, requires_root]


def specs(
    name: str, count: int, domain: str, boot_args: str | None = None
) -> list[tuple[str, InstanceSpec]]:
    config = VmConfig(
        kernel_path=str(guest_path(name)),
        mem_mib=16,
        boot_args=boot_args or "console=ttyS0 then=idle",
    )
    return [(name, InstanceSpec(config, DedupMode.DKSM, domain))] * count


@contextlib.contextmanager
def fleet(
    members: list[tuple[str, InstanceSpec]], per_process: int = 1
) -> Iterator[control.FleetHandle]:
    handle = control.up(members, vms_per_worker=per_process)
    try:
        yield handle
    finally:
        handle.down()


def log_when(handle: control.FleetHandle, index: int, line: str, timeout: float = 10) -> str:
    """The VM's console log once it holds ``line`` ("booted" is only its first line)."""
    deadline = time.monotonic() + timeout
    while True:
        text = handle.log_path(index).read_text()
        if line in text.splitlines():
            return text
        assert time.monotonic() < deadline, f"vm {index} never printed {line!r}: {text!r}"
        time.sleep(0.02)


def stats(domain: str) -> dict[str, int | bool]:
    with contextlib.closing(PagePool.open(domain)) as pool:
        return pool.stats().to_json()


def assert_pool_empty(domain: str) -> None:
    s = stats(domain)
    assert (s["leases"], s["references"], s["hashtable_entries"], s["file_blocks_bytes"]) == (
        0,
        0,
        0,
        0,
    ), s


def test_eight_idle_vms_share_each_readonly_page_once() -> None:
    domain = "eight-idle"
    expected = readonly_pages(guest_path("idle"))
    with fleet(specs("idle", 8, domain)) as handle:
        s = stats(domain)
        assert s["hashtable_entries"] == len(set(expected.values()))
        assert s["references"] == 8 * len(expected)
        assert s["leases"] == 8
        assert s["file_blocks_bytes"] == s["hashtable_entries"] * PAGE
        pool_file = str(pool_directory(domain) / "pages")
        for member in handle.members():
            info = handle.info(member.index)
            maps = mappings_of(info.pid, pool_file)
            assert maps, "the VMM maps no pool pages"
            rss = sum(m.rss_kb for m in maps)
            pss = sum(m.pss_kb for m in maps)
            assert rss > 0
            # every touched pool page is mapped by all 8 VMMs: Pss is an eighth of Rss
            assert abs(pss - rss / 8) <= max(4, 0.05 * rss), (rss, pss)
            for addr, content in expected.items():
                assert read_guest(info, addr, PAGE) == content, hex(addr)
    assert_pool_empty(domain)


def test_two_apps_share_the_library_not_their_own_pages() -> None:
    domain = "two-apps"
    hello, idle = readonly_pages(guest_path("hello")), readonly_pages(guest_path("idle"))
    common = {a for a in hello.keys() & idle.keys() if hello[a] == idle[a]}
    distinct = set(hello.values()) | set(idle.values())
    assert len(common) * PAGE >= 256 * 1024
    with fleet(specs("hello", 1, domain) + specs("idle", 1, domain)) as handle:
        s = stats(domain)
        assert s["hashtable_entries"] == len(distinct)
        assert s["references"] == len(hello) + len(idle)
        assert s["pages_saved"] == len(hello) + len(idle) - len(distinct)
        pool_file = str(pool_directory(domain) / "pages")
        offsets: dict[int, dict[int, int]] = {}
        for member in handle.members():
            info = handle.info(member.index)
            base = info.ram_host_address
            with open(f"/proc/{info.pid}/maps") as f:
                table = {}
                for line in f:
                    fields = line.split()
                    if len(fields) > 5 and fields[5] == pool_file:
                        lo, hi = (int(x, 16) for x in fields[0].split("-"))
                        for addr in range(lo, hi, PAGE):
                            table[addr - base] = int(fields[2], 16) + addr - lo
            offsets[member.index] = table
        first, second = offsets[0], offsets[1]
        for addr in common:  # same pool slot in both VMs
            assert first[addr] == second[addr], hex(addr)
        for addr in hello.keys() - common:
            if addr in idle and hello[addr] != idle[addr]:
                assert first[addr] != second[addr], hex(addr)
    assert_pool_empty(domain)


def test_cowprobe_write_stays_private() -> None:
    domain = "cow"
    original = readonly_pages(guest_path("cowprobe"))
    with fleet(specs("cowprobe", 3, domain)) as handle:
        logs = [log_when(handle, m.index, "cowprobe: ready") for m in handle.members()]
        page = int(logs[0].split("cowprobe: page=")[1].split()[0], 16)
        assert page in original  # the written page is a pool-shared read-only page
        for log in logs:
            assert "cowprobe: after=4b4f574f434b5344" in log  # each guest sees its write
        pages_file = (pool_directory(domain) / "pages").read_bytes()
        assert original[page] in {pages_file[i : i + PAGE] for i in range(0, len(pages_file), PAGE)}
        for member in handle.members():
            info = handle.info(member.index)
            seen = read_guest(info, page, PAGE)
            assert seen[:8] == (0x4B4F574F434B5344).to_bytes(8, "little")
            assert seen[8:] == original[page][8:]
        # the pool's copy still holds the original bytes, for the next VM too
        with fleet(specs("cowprobe", 1, domain, "console=ttyS0")) as late:
            log = log_when(late, 0, "cowprobe: ready")
            assert "cowprobe: before=423b342d261f1811" in log
    assert_pool_empty(domain)


def test_two_domains_never_share_a_page() -> None:
    with fleet(specs("idle", 2, "tenant-a") + specs("idle", 2, "tenant-b")) as handle:
        files = {d: str(pool_directory(d) / "pages") for d in ("tenant-a", "tenant-b")}
        for member in handle.members():
            info = handle.info(member.index)
            own, other = (
                files[info.domain],
                files["tenant-b" if info.domain == "tenant-a" else "tenant-a"],
            )
            assert mappings_of(info.pid, own)
            assert not mappings_of(info.pid, other)
        inode = {d: os.stat(f).st_ino for d, f in files.items()}
        assert inode["tenant-a"] != inode["tenant-b"]
        assert stats("tenant-a")["references"] == stats("tenant-b")["references"]
    assert_pool_empty("tenant-a")
    assert_pool_empty("tenant-b")


def test_thirty_two_vms_at_once_have_exact_counts() -> None:
    domain = "thirty-two"
    expected = readonly_pages(guest_path("idle"))
    with fleet(specs("idle", 32, domain)) as handle:
        assert all(m.state == "running" for m in handle.members())
        s = stats(domain)
        assert s["hashtable_entries"] == len(set(expected.values()))
        assert s["references"] == 32 * len(expected)
        assert s["leases"] == 32
    assert_pool_empty(domain)


def test_kill_nine_while_loading_loses_nothing() -> None:
    domain = "kill-nine"
    expected = readonly_pages(guest_path("idle"))
    rng = random.Random(20231)
    env = {**os.environ}
    cmd = [
        sys.executable,
        "-m",
        "dksm",
        "run",
        "--kernel",
        str(guest_path("idle")),
        "--mem-mib",
        "16",
        "--domain",
        domain,
    ]
    with fleet(specs("idle", 2, domain)) as survivors:
        killed = 0
        for _ in range(50):
            proc = subprocess.Popen(
                cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env
            )
            time.sleep(rng.uniform(0.0, 0.12))  # start-up, pool open, merge, boot
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            killed += proc.returncode == -signal.SIGKILL
        assert killed >= 45
        s = stats(domain)  # opening the pool swept the dead leases
        assert s["leases"] == 2
        assert s["references"] == 2 * len(expected)
        assert s["hashtable_entries"] == len(set(expected.values()))
        for member in survivors.members():
            info = survivors.info(member.index)
            for addr, content in expected.items():
                assert read_guest(info, addr, PAGE) == content
        assert all(m.state == "running" for m in survivors.members())
    assert_pool_empty(domain)
