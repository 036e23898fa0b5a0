"""A damaged pool is an error, never a crash; and the pool's bad inputs (an empty
pool root, a tmpfs too small, a closed stdout) each end in one line.  Real commands,
real files, real tmpfs mounts."""

from __future__ import annotations

import os
import random
import shutil
import struct
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import lmdb
import pytest

from dksm.dedup.index import pack_slots
from dksm.dedup.owner import ProcessIdentity
from dksm.guests import guest_path

from conftest import dksm, requires_kvm, requires_root

pytestmark = [requires_kvm, requires_root]

HELLO = str(guest_path("hello"))
PAGE = 4096


def run_hello(root: Path, domain: str = "default") -> subprocess.CompletedProcess[str]:
    return dksm("run", "--kernel", HELLO, "--mem-mib", "16", "--pool-root", str(root),
                "--domain", domain)  # fmt: skip


def assert_one_line_error(result: subprocess.CompletedProcess[str], *words: str) -> None:
    assert result.returncode == 1, (result.returncode, result.stderr)  # not -SIGBUS
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("dksm: error: "), result.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])


@pytest.fixture
def pool_root() -> Iterator[Path]:
    """A pool root of the test's own, on tmpfs as every pool root must be."""
    holder = Path(tempfile.mkdtemp(prefix="dksm-test-damage-", dir="/dev/shm"))
    root = holder / "pools"
    root.mkdir(mode=0o700)
    yield root
    shutil.rmtree(holder, ignore_errors=True)


def truncate_index(directory: Path) -> None:
    data = directory / "index" / "data.mdb"
    assert data.stat().st_size >= 4 * PAGE  # a used pool's index is more than its metas
    os.truncate(data, 3 * PAGE)


def garble_index(directory: Path) -> None:
    data = directory / "index" / "data.mdb"
    data.write_bytes(random.Random(11).randbytes(data.stat().st_size))


def add_lease_naming_a_missing_slot(directory: Path) -> None:
    """A lease of a dead owner (our pid, not our start time) holding slot 999."""
    me = ProcessIdentity.current()
    namespace = os.stat("/proc/self/ns/pid").st_ino
    with lmdb.open(str(directory / "index"), max_dbs=16) as env:
        leases = env.open_db(b"leases", create=False)
        chunks = env.open_db(b"lease_slots", create=False)
        with env.begin(write=True) as txn:
            key = struct.pack(">Q", 77)
            txn.put(key, struct.pack(">QQQQ", me.pid, me.start_time + 1, namespace, 1), db=leases)
            txn.put(key + struct.pack(">Q", 0), pack_slots([999]), db=chunks)


def add_lease_using_a_missing_manifest(directory: Path) -> None:
    """A lease of a dead owner counting a use of a manifest the index lacks."""
    me = ProcessIdentity.current()
    namespace = os.stat("/proc/self/ns/pid").st_ino
    with lmdb.open(str(directory / "index"), max_dbs=16) as env:
        leases = env.open_db(b"leases", create=False)
        uses = env.open_db(b"lease_manifests", create=False)
        with env.begin(write=True) as txn:
            key = struct.pack(">Q", 78)
            txn.put(key, struct.pack(">QQQQ", me.pid, me.start_time + 1, namespace, 1), db=leases)
            manifest = b"\x5a" * 16 + struct.pack(">Q", 1)
            txn.put(key + manifest, struct.pack(">Q", 1), db=uses)


DAMAGE = {
    "truncated index": (truncate_index, "was truncated"),
    "garbage index": (garble_index, "not an LMDB data file"),
    "lease naming a missing slot": (add_lease_naming_a_missing_slot, "slots [999]"),
    "lease using a missing manifest": (
        add_lease_using_a_missing_manifest,
        "lease 78 uses manifest 5a5a",
    ),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_pool_is_an_error_then_verified_and_purged(pool_root: Path, damage: str) -> None:
    assert run_hello(pool_root).returncode == 0
    directory = pool_root / "default"
    damage_pool, problem = DAMAGE[damage]
    damage_pool(directory)
    where = ("--pool-root", str(pool_root))
    for result in (
        run_hello(pool_root),
        dksm("pool", "stats", *where),
        dksm("pool", "purge", *where),
    ):
        assert_one_line_error(result, "damaged", problem, "dksm pool purge --domain default")
        assert "hello" not in result.stdout
    verified = dksm("pool", "verify", *where)
    assert verified.returncode == 1 and verified.stderr == ""
    assert "problem(s):" in verified.stdout
    if damage == "lease naming a missing slot":
        assert "leases hold slot 999, which is not in the pool" in verified.stdout
    elif damage == "lease using a missing manifest":
        assert "lease 78 uses manifest 5a5a" in verified.stdout
        assert "which does not exist" in verified.stdout
    else:
        assert problem in verified.stdout
    purged = dksm("pool", "purge", "--force", *where)
    assert purged.returncode == 0, purged.stderr
    assert not directory.exists()
    again = run_hello(pool_root)
    assert again.returncode == 0 and again.stdout.splitlines()[-1] == "hello: bye"
    assert dksm("pool", "verify", *where).returncode == 0


def test_pool_verify_says_a_sound_pool_is_consistent(pool_root: Path) -> None:
    assert run_hello(pool_root).returncode == 0
    verified = dksm("pool", "verify", "--pool-root", str(pool_root))
    assert verified.returncode == 0, verified.stdout
    assert verified.stdout == "the pool of domain 'default' is consistent\n"


def test_purge_force_refuses_a_pool_in_use(pool_root: Path) -> None:
    idle = subprocess.Popen(
        [sys.executable, "-m", "dksm", "run", "--kernel", str(guest_path("idle")),
         "--mem-mib", "16", "--pool-root", str(pool_root)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        assert idle.stdout is not None and idle.stdout.readline() == b"idle: dksm guest kit\n"
        refused = dksm("pool", "purge", "--force", "--pool-root", str(pool_root))
        assert_one_line_error(refused, "open in another process")
        assert (pool_root / "default" / "ready").exists()
    finally:
        idle.kill()
        idle.wait()


def test_an_empty_pool_root_is_refused_not_the_current_directory(tmp_path: Path) -> None:
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    for command in (
        ("run", "--kernel", HELLO, "--mem-mib", "16", "--pool-root", ""),
        ("pool", "stats", "--pool-root", ""),
        ("pool", "enable", "--pool-root", ""),
        ("fleet", "up", "--image", "hello", "--pool-root", ""),
    ):
        result = subprocess.run(
            [sys.executable, "-m", "dksm", *command],
            capture_output=True, text=True, cwd=cwd, timeout=60, check=False,
        )  # fmt: skip
        assert_one_line_error(result, "the pool root is empty")
    assert list(cwd.iterdir()) == []


@pytest.fixture
def tiny_tmpfs(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Path]:
    """A tmpfs of the size given as the test's parameter, unmounted afterwards."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    options = f"size={request.param},mode=0700"
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mount)],
                             capture_output=True, text=True, check=False)  # fmt: skip
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


@pytest.mark.parametrize("tiny_tmpfs", ["16k", "64k"], indirect=True)
def test_a_tmpfs_too_small_is_one_line_and_its_space_is_given_back(tiny_tmpfs: Path) -> None:
    # 16 KiB: the pool cannot even be created; 64 KiB: it can, and the load fails.
    result = run_hello(tiny_tmpfs)
    assert_one_line_error(result, "full")
    assert "Traceback" not in result.stderr and "hello" not in result.stdout
    # Given back by the process that failed: no other process has opened the pool.
    pages = tiny_tmpfs / "default" / "pages"
    if pages.exists():
        assert pages.stat().st_blocks == 0
    else:  # the failed creation removed everything it made
        assert list(tiny_tmpfs.iterdir()) == []
        usage = os.statvfs(tiny_tmpfs)
        assert usage.f_bfree == usage.f_blocks


def test_a_closed_stdout_ends_a_command_quietly(pool_root: Path) -> None:
    assert run_hello(pool_root).returncode == 0
    stats = subprocess.Popen(
        [sys.executable, "-m", "dksm", "pool", "stats", "--pool-root", str(pool_root)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert stats.stdout is not None and stats.stderr is not None
    stats.stdout.close()  # the reader is gone before dksm writes a byte
    errors = stats.stderr.read()
    assert stats.wait(timeout=60) == 128 + 13  # as a shell reports SIGPIPE
    assert errors == b""
    shell = subprocess.run(
        f"{sys.executable} -m dksm pool stats --pool-root {pool_root} | head -1",
        shell=True, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert shell.stdout == "pool of domain 'default'\n" and shell.stderr == ""


def test_a_pool_after_one_large_commit_opens_again(pool_root: Path) -> None:
    """A Linux kernel's 6,000 read-only pages go into the index in one commit, which
    leaves LMDB's file a few pages shorter than its meta page's last page (pages
    allocated and freed in that commit are never written): not damage."""
    import contextlib

    from dksm.dedup.pool import PagePool
    from dksm.memory import host_mapping

    pages = 6000
    content = b"".join(i.to_bytes(8, "little") * (PAGE // 8) for i in range(pages))
    address = host_mapping.map_anonymous(len(content))
    try:
        with contextlib.closing(PagePool.open("large", pool_root)) as pool:
            lease = pool.lease()
            assert lease.map_pages(address, content).mapped
            host_mapping.unmap(address, len(content))  # before the lease goes
            address = host_mapping.map_anonymous(len(content))
            lease.release()
        with contextlib.closing(PagePool.open("large", pool_root)) as pool:
            assert pool.verify() == []
    finally:
        host_mapping.unmap(address, len(content))
