"""Who may touch a pool: each attack of a second, unprivileged user on root's page
pool, run as that real user, is refused -- root's VMs never map the intruder's pages,
and no file of root's (or anyone's) outside the pool is written or removed.

Before the pool checked who owns its files, each of these let the intruder choose
the pages root's guests execute (a pool root or domain made by the intruder before
root's first run, a domain swapped for the intruder's, a pool left writable), or
made root write through a symlink (``ready.tmp``, ``index``, the domain's name).
"""

from __future__ import annotations

import contextlib
import grp
import hashlib
import os
import pwd
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from dksm.dedup.pool import PagePool
from dksm.guests import guest_path

from conftest import IS_ROOT, SHM, dksm, requires_kvm, requires_root

pytestmark = [requires_kvm, requires_root]

INTRUDER = "dksm-pool-intruder"  # made for these tests alone, removed after them
HELLO = str(guest_path("hello"))


@pytest.fixture(scope="session")
def intruder() -> Iterator[pwd.struct_passwd]:
    """A real unprivileged user, created for the session if missing (and then
    deleted, with its group, afterwards)."""
    if not IS_ROOT:
        pytest.skip("needs root to create a second user")
    if shutil.which("useradd") is None or shutil.which("userdel") is None:
        pytest.skip("needs useradd and userdel")
    created = False
    try:
        entry = pwd.getpwnam(INTRUDER)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--user-group", "--no-create-home",
             "--shell", "/usr/sbin/nologin", INTRUDER],
            check=True, capture_output=True,
        )  # fmt: skip
        created = True
        entry = pwd.getpwnam(INTRUDER)
    try:
        yield entry
    finally:
        if created:
            subprocess.run(["userdel", INTRUDER], check=True, capture_output=True)
            with contextlib.suppress(KeyError):
                grp.getgrnam(INTRUDER)
                subprocess.run(["groupdel", INTRUDER], check=False, capture_output=True)


def as_intruder(user: pwd.struct_passwd, script: str) -> None:
    """Run shell commands as the intruder: their uid, their group, no other group."""
    subprocess.run(
        ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups",
         "sh", "-euc", script],
        check=True, cwd="/", capture_output=True, timeout=30,
    )  # fmt: skip


@pytest.fixture
def shm_names() -> Iterator[Callable[[], Path]]:
    """Free names in /dev/shm (mode 1777, like the default pool root's parent), for
    whoever takes them first; all removed afterwards, whoever made them."""
    taken: list[Path] = []

    def free_name() -> Path:
        holder = Path(tempfile.mkdtemp(prefix="dksm-test-trust-", dir=SHM))
        holder.rmdir()
        taken.append(holder)
        return holder

    yield free_name
    for holder in taken:
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(holder)


@pytest.fixture
def shm_place(shm_names: Callable[[], Path]) -> Path:
    return shm_names()


@pytest.fixture
def shm_holder() -> Iterator[Path]:
    """A directory of root's own on tmpfs (pool roots must be on tmpfs), removed after."""
    holder = Path(tempfile.mkdtemp(prefix="dksm-test-trust-", dir=SHM))
    yield holder
    shutil.rmtree(holder, ignore_errors=True)


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    """Files of root's outside any pool, named like a pool's files, that a pool
    operation following a symlink would overwrite or delete."""
    place = tmp_path / "victim"
    (place / "index").mkdir(parents=True)
    for name in ("pages", "lock", "ready", "ready.tmp", "index/data.mdb", "keep"):
        (place / name).write_bytes(f"root's own {name}\n".encode() * 64)
    return place


def snapshot(top: Path) -> dict[str, tuple[int, int, bytes]]:
    """Every name under ``top`` (not following symlinks): owner, mode, content hash."""
    found = {}
    for path in sorted([top, *top.rglob("*")]):
        st = path.lstat()
        if stat.S_ISREG(st.st_mode):
            content = hashlib.sha256(path.read_bytes()).digest()
        elif stat.S_ISLNK(st.st_mode):
            content = os.readlink(path).encode()
        else:
            content = b""
        found[str(path.relative_to(top))] = (st.st_uid, st.st_mode, content)
    return found


def assert_refused(result: subprocess.CompletedProcess[str], *words: str) -> None:
    """Exit status 1, one line on stderr holding ``words``, and no guest output."""
    assert result.returncode == 1, (result.returncode, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("dksm: error: "), result.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert "hello" not in result.stdout  # the guest never ran


def a_genuine_pool(where: Path, domain: str = "default") -> Path:
    """A real, ready pool made by dksm (as root) under ``where``; its directory."""
    with PagePool.open(domain, where) as pool:
        assert pool.verify() == []
    return where / domain


def plant_pool_with_injected_code(user: pwd.struct_passwd, source: Path, target: Path) -> None:
    """The intruder copies a pool made elsewhere to ``target`` (so every file is
    theirs, readable and writable by everyone) and writes into its pages file the
    code they want root's guests to run."""
    staging = Path(tempfile.mkdtemp(prefix="dksm-test-staging-", dir=SHM))
    try:
        shutil.copytree(source, staging / "pool")
        for path in [staging, *staging.rglob("*")]:
            os.chown(path, user.pw_uid, user.pw_gid, follow_symlinks=False)
        as_intruder(user, f"""
            cp -r {staging}/pool {target}
            chmod -R a+rwX {target}
            printf 'hello: PWNED by the intruder\\n' > {target}/pages
        """)  # fmt: skip
    finally:
        shutil.rmtree(staging)


def test_a_pool_root_an_intruder_made_first_is_refused(
    intruder: pwd.struct_passwd, shm_place: Path, shm_holder: Path
) -> None:
    # Before root's first run, the intruder takes the pool root's name and fills a
    # domain with a pool whose pages hold their code.
    as_intruder(intruder, f"mkdir -m 0777 {shm_place}")
    plant_pool_with_injected_code(intruder, a_genuine_pool(shm_holder / "genuine"),
                                  shm_place / "default")  # fmt: skip
    before = snapshot(shm_place)
    for command in (
        ("run", "--kernel", HELLO, "--mem-mib", "16"),
        ("pool", "stats"),
        ("pool", "purge", "--force"),
    ):
        result = dksm(*command, "--pool-root", str(shm_place))
        assert_refused(result, f"pool root {shm_place} is owned by uid {intruder.pw_uid}",
                       "not by you (uid 0)", "remove it or choose --pool-root")  # fmt: skip
    assert snapshot(shm_place) == before  # root neither used nor changed their files


def test_a_domain_an_intruder_made_in_a_shared_pool_root_is_refused(
    intruder: pwd.struct_passwd, shm_place: Path, shm_holder: Path
) -> None:
    # A pool root everyone may write (as if /dev/shm itself were given as the pool
    # root): the intruder makes the domain before root does.
    shm_place.mkdir()
    shm_place.chmod(0o1777)
    plant_pool_with_injected_code(intruder, a_genuine_pool(shm_holder / "genuine"),
                                  shm_place / "default")  # fmt: skip
    before = snapshot(shm_place)
    result = dksm("run", "--kernel", HELLO, "--mem-mib", "16", "--pool-root", str(shm_place))
    assert_refused(result, f"pool root {shm_place} is writable by its group and others",
                   "(mode 1777)")  # fmt: skip
    assert snapshot(shm_place) == before


def test_a_domain_directory_that_is_not_roots_is_refused_in_roots_pool_root(
    intruder: pwd.struct_passwd, shm_names: Callable[[], Path], shm_holder: Path
) -> None:
    # The pool root is root's own, but a domain directory in it belongs to the
    # intruder (moved there from their files by root, say): not root's to trust.
    root = shm_names()
    root.mkdir(mode=0o700)
    planted = root / "tenant"
    staged = shm_names()
    plant_pool_with_injected_code(intruder, a_genuine_pool(shm_holder / "genuine", "tenant"),
                                  staged)  # fmt: skip
    staged.rename(planted)
    before = snapshot(planted)
    result = dksm("run", "--kernel", HELLO, "--mem-mib", "16", "--pool-root", str(root),
                  "--domain", "tenant")  # fmt: skip
    assert_refused(result, f"pool directory {planted} is owned by uid {intruder.pw_uid}",
                   "remove it or choose another --domain")  # fmt: skip
    assert snapshot(planted) == before


def test_a_domain_an_intruder_swapped_for_roots_is_refused(
    intruder: pwd.struct_passwd, shm_place: Path, shm_holder: Path
) -> None:
    # Root's pool is in use; then its pool root is left writable to everyone by
    # mistake, and the intruder renames root's domain away and puts theirs there.
    shm_place.mkdir(mode=0o700)
    ran = dksm("run", "--kernel", HELLO, "--mem-mib", "16", "--pool-root", str(shm_place))
    assert ran.returncode == 0 and ran.stdout.splitlines()[-1] == "hello: bye", ran.stderr
    genuine = snapshot(shm_place / "default")
    shm_place.chmod(0o777)
    as_intruder(intruder, f"mv {shm_place}/default {shm_place}/roots-old-domain")
    plant_pool_with_injected_code(intruder, a_genuine_pool(shm_holder / "genuine"),
                                  shm_place / "default")  # fmt: skip
    before = snapshot(shm_place)
    result = dksm("run", "--kernel", HELLO, "--mem-mib", "16", "--pool-root", str(shm_place))
    assert_refused(result, f"pool root {shm_place} is writable by its group and others")
    assert snapshot(shm_place) == before
    assert snapshot(shm_place / "roots-old-domain") == genuine


@pytest.mark.parametrize(
    ("made_writable", "mode", "complaint"),
    [
        ("", 0o777, "pool root {path} is writable by its group and others (mode 0777)"),
        ("", 0o770, "pool root {path} is writable by its group (mode 0770)"),
        ("default", 0o707, "pool directory {path} is writable by others (mode 0707)"),
        ("default/index", 0o777, "pool index directory {path} is writable by its group"),
        ("default/pages", 0o666, "pool file {path} is writable by its group and others"),
        ("default/index/data.mdb", 0o646, "pool file {path} is writable by others"),
    ],
)
def test_a_pool_of_roots_made_group_or_world_writable_is_refused(
    intruder: pwd.struct_passwd, shm_place: Path, made_writable: str, mode: int, complaint: str
) -> None:
    root = shm_place
    root.mkdir(mode=0o700)
    a_genuine_pool(root)
    for reachable in (root, root / "default"):  # searchable, still writable by root alone
        reachable.chmod(0o711)
    path = root / made_writable if made_writable else root
    os.chown(path, 0, intruder.pw_gid)  # the intruder is in the group, and is "others"
    path.chmod(mode)
    if made_writable == "default/pages":  # and writes their code into it
        as_intruder(intruder, f"printf 'hello: PWNED\\n' > {path}")
    before = snapshot(root)
    result = dksm("run", "--kernel", HELLO, "--mem-mib", "16", "--pool-root", str(root))
    assert_refused(result, complaint.format(path=path))
    assert snapshot(root) == before


def test_a_way_to_the_pool_root_through_an_intruders_directory_is_refused(
    intruder: pwd.struct_passwd, shm_place: Path
) -> None:
    as_intruder(intruder, f"mkdir -m 0755 {shm_place}")
    result = dksm("run", "--kernel", HELLO, "--pool-root", str(shm_place / "pools"))
    assert_refused(result, f"directory {shm_place} above the pool root {shm_place / 'pools'}",
                   f"owned by uid {intruder.pw_uid}")  # fmt: skip
    assert list(shm_place.iterdir()) == []  # root created nothing in it


@pytest.mark.parametrize("planted", ["domain", "ready.tmp", "index"])
def test_an_intruders_symlinks_make_root_write_or_delete_nothing_elsewhere(
    intruder: pwd.struct_passwd, shm_place: Path, victim: Path, planted: str
) -> None:
    # The intruder made the pool root and points a name in it at root's files: the
    # domain itself, the temporary that creation writes, or the index directory.
    domain = shm_place / "default"
    links = {
        "domain": f"ln -s {victim} {domain}",
        "ready.tmp": f"mkdir -m 0777 {domain}; ln -s {victim}/ready.tmp {domain}/ready.tmp",
        "index": f"mkdir -m 0777 {domain}; ln -s {victim}/index {domain}/index",
    }
    as_intruder(intruder, f"mkdir -m 0777 {shm_place}; {links[planted]}")
    before, planted_before = snapshot(victim), snapshot(shm_place)
    for command in (
        ("run", "--kernel", HELLO, "--mem-mib", "16"),
        ("pool", "purge"),
        ("pool", "purge", "--force"),
    ):
        result = dksm(*command, "--pool-root", str(shm_place))
        assert_refused(result, f"pool root {shm_place} is owned by uid {intruder.pw_uid}")
    assert snapshot(victim) == before
    assert snapshot(shm_place) == planted_before


@pytest.mark.parametrize(
    ("planted", "complaint"),
    [
        ("domain", "pool directory {domain} is a symlink"),
        ("ready.tmp", "pool file {domain}/ready.tmp is a symlink"),
        ("index", "pool index directory {domain}/index is a symlink"),
    ],
)
def test_symlinks_inside_roots_own_pool_are_never_followed(
    shm_holder: Path, victim: Path, planted: str, complaint: str
) -> None:
    # The same names planted inside root's own pool root (by a mistake, or by
    # anything that once ran as root): refused by name, not followed, not removed.
    root = shm_holder / "pools"
    root.mkdir(mode=0o700)
    domain = root / "default"
    if planted == "domain":
        domain.symlink_to(victim)
    else:  # a creation that died half-way, with a link where its file would be
        domain.mkdir(mode=0o700)
        (domain / planted).symlink_to(victim / planted)
    before = snapshot(victim)
    run = dksm("run", "--kernel", HELLO, "--mem-mib", "16", "--pool-root", str(root))
    assert_refused(run, complaint.format(domain=domain))
    for command in (("pool", "stats"), ("pool", "purge")):  # no ready pool there
        assert_refused(dksm(*command, "--pool-root", str(root)))
    assert snapshot(victim) == before
    purged = dksm("pool", "purge", "--force", "--pool-root", str(root))
    if planted == "domain":
        assert_refused(purged, complaint.format(domain=domain))
        assert domain.is_symlink()
    else:  # the link is root's own: purge --force removes it, never its target
        assert purged.returncode == 0, purged.stderr
        assert not domain.exists()
    assert snapshot(victim) == before
