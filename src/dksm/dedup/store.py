"""A domain's pool on disk: where it lives, and one process's open files of it.

:mod:`dksm.dedup.pool` owns what the pool's records mean; this module owns its files:
finding the pool root and a domain's directory, opening them only when they are the
owner's alone (the rules are :mod:`dksm.dedup.trust`'s), creating a pool, checking
what it opens before anything is mapped, and removing a pool -- also one too damaged
to open.

A domain's directory holds ``pages``, ``index/`` (LMDB's ``data.mdb`` and
``lock.mdb``), ``lock`` and ``ready`` (``ready.tmp`` while it is being written).
Every one of them is reached from a descriptor of the pool root, opened and checked
once per store; no path is ever resolved again after that, so nothing renamed or
replaced later can redirect the pool.

The ``lock`` file is held shared by every process that has the pool open, and
exclusively by whoever creates or removes it.  ``ready`` is written last when a pool
is created and removed first when it is purged: a directory without it is a
creation or purge that died half-way, and the next creator clears it.  A creation
that fails (a full tmpfs, say) removes what it made before it reports the failure,
so the space it took is given back at once.

Why one module over 500 lines: finding, opening, creating, checking and removing a
pool all walk the same chain of descriptors opened from the pool root and apply the
same checks to each; split, a step could reach a file some other way.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import threading
import time

from dksm.dedup import trust
from dksm.dedup.index import (
    DATA_FILE,
    FORMAT_VERSION,
    LAYOUT,
    LOCK_FILE,
    PoolIndex,
    PoolIndexError,
    stored_format,
)
from dksm.dedup.pages_file import PagesFile
from dksm.dedup.pool_errors import PoolDamagedError, PoolError, PoolMissingError
from dksm.error import DksmError
from dksm.memory.host_mapping import PAGE_SIZE
from dksm.value import Value

TYPE_CHECKING = False  # typing's, without importing typing (see the dksm package)
if TYPE_CHECKING:
    from pathlib import Path
    from typing import Final

DEFAULT_POOL_ROOT: Final = "/dev/shm/dksm"
POOL_ROOT_ENV: Final = "DKSM_POOL_ROOT"
DEFAULT_DOMAIN: Final = "default"

PAGES: Final = "pages"
INDEX: Final = "index"
LOCK: Final = "lock"
READY: Final = "ready"
READY_TMP: Final = "ready.tmp"

_DOMAIN_CHARACTERS: Final = frozenset(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-"
)
_MAX_DOMAIN_LENGTH = 64
_READY_TEXT = f"dksm page pool, format {FORMAT_VERSION}\n"
_OPEN_ATTEMPTS = 100


def validate_domain(domain: str) -> str:
    """Return ``domain`` if it can name a directory under the pool root, else raise."""
    if not domain:
        raise PoolError("a sharing domain needs a name, and the one given is empty")
    if "/" in domain or "\0" in domain:
        raise PoolError(f"domain name {domain!r} contains '/' or NUL: a domain is one directory")
    if domain in (".", ".."):
        raise PoolError(f"domain name {domain!r} would name a directory outside the pool root")
    if len(domain) > _MAX_DOMAIN_LENGTH:
        raise PoolError(f"domain name {domain[:16]!r}... is longer than {_MAX_DOMAIN_LENGTH}")
    if domain[0] in ".-" or not _DOMAIN_CHARACTERS.issuperset(domain):
        raise PoolError(
            f"domain name {domain!r} may only hold letters, digits, '_', '.' and '-', "
            "and must not start with '.' or '-'"
        )
    return domain


def default_pool_root() -> str:
    """/dev/shm/dksm for root, /dev/shm/dksm-UID for anyone else: a pool root must be
    its user's own, so users cannot share one name."""
    euid = os.geteuid()
    return DEFAULT_POOL_ROOT if euid == 0 else f"{DEFAULT_POOL_ROOT}-{euid}"


def pool_root(root: str | os.PathLike[str] | None = None) -> Path:
    """The directory holding every domain's pool (see :func:`checked_root`)."""
    from pathlib import Path  # milliseconds of start-up: only for callers that want one

    return Path(checked_root(root))


def checked_root(root: str | os.PathLike[str] | None = None) -> str:
    """The directory holding every domain's pool: ``root``, else $DKSM_POOL_ROOT, else
    :func:`default_pool_root`, made absolute and normal (no "." or ".." parts).  A
    given root must name a directory on tmpfs: the empty string is refused rather
    than taken as the current directory."""
    given = root is not None or bool(os.environ.get(POOL_ROOT_ENV))
    if root is None:
        root = os.environ.get(POOL_ROOT_ENV) or default_pool_root()
    text = os.fspath(root)
    if not text:
        raise PoolError(
            "the pool root is empty: give a directory (on tmpfs), or leave --pool-root out "
            f"for the default {default_pool_root()}"
        )
    if "\0" in text:
        raise PoolError(f"the pool root {text!r} contains a NUL byte")
    try:
        os.fsencode(text)
    except UnicodeEncodeError:
        raise PoolError(f"the pool root {text!r} is not a valid file name here") from None
    path = os.path.abspath(text)
    if given:
        _require_tmpfs(path)
    return path


TMPFS_MAGIC: Final = 0x01021994  # linux/magic.h
STATFS_SIZE: Final = 120  # struct statfs on x86-64; f_type is its first (long) field


def _filesystem_type(path: str) -> int | None:
    """statfs(2)'s f_type of the file system holding ``path`` (or the nearest
    existing directory above it: the pool root may not exist yet)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    buffer = ctypes.create_string_buffer(STATFS_SIZE)
    candidate = path
    while True:
        if libc.statfs(os.fsencode(candidate), buffer) == 0:
            return int.from_bytes(buffer.raw[:8], "little")
        parent = os.path.dirname(candidate)
        if parent == candidate:
            return None
        candidate = parent


def _require_tmpfs(path: str) -> None:
    """Pool pages must be page-cache pages in memory: a pool root elsewhere would put
    guest code on disk and make every load write it there."""
    kind = _filesystem_type(path)
    if kind is not None and kind != TMPFS_MAGIC:
        raise PoolError(
            f"the pool root {path} is not on tmpfs (file system type {kind:#x}): "
            "choose a directory under /dev/shm"
        )


def pool_directory(
    domain: str = DEFAULT_DOMAIN, root: str | os.PathLike[str] | None = None
) -> Path:
    from pathlib import Path  # as in pool_root

    return Path(checked_root(root), validate_domain(domain))


def _repair_hint(domain: str, root: str) -> str:
    where = "" if root == checked_root() else f" --pool-root {root}"
    return (
        f"'dksm pool verify --domain {domain}{where}' lists its problems and "
        f"'dksm pool purge --domain {domain}{where} --force' removes it"
    )


class _Place(Value):
    """Where a domain's pool is: checked descriptors and the paths they had."""

    __slots__ = ("dir_fd", "domain", "root", "root_fd")

    def __init__(
        self,
        domain: str,
        root: str,
        root_fd: int,
        dir_fd: int,
    ) -> None:
        self.domain = domain
        self.root = root
        self.root_fd = root_fd
        self.dir_fd = dir_fd

    @property
    def directory(self) -> str:
        return os.path.join(self.root, self.domain)

    @property
    def fix(self) -> str:
        return f"remove the pool directory {self.directory}"

    def path(self, *names: str) -> str:
        return os.path.join(self.directory, *names)


class Store:
    """One process's open files of one domain's pool, shared by its handles.

    LMDB must not open one environment twice in a process, so handles and leases on
    the same domain share a store; it closes when the last of them lets go.
    """

    def __init__(self, place: _Place, lock_fd: int, index: PoolIndex, pages: PagesFile) -> None:
        self.place = place
        self.directory = place.directory
        self.key = place.directory  # set by acquire_store: see _store_key
        self.lock_fd = lock_fd
        self.index = index
        self.pages = pages
        self.pid = os.getpid()
        self.users = 0
        self.closed = False

    def close(self) -> None:
        self.closed = True
        self.index.close()
        self.pages.close()
        os.close(self.lock_fd)
        os.close(self.place.dir_fd)
        os.close(self.place.root_fd)

    def open_pages_readonly(self) -> int:
        """A new read-only descriptor of the pages file; the caller closes it."""
        place = self.place
        return trust.open_file(place.dir_fd, PAGES, os.O_RDONLY, place.path(PAGES), place.fix)


_stores: dict[str, Store] = {}
_stores_lock = threading.Lock()
_inherited_stores: list[dict[str, Store]] = []


def _forget_inherited_stores() -> None:
    # A forked child must not use its parent's LMDB environment; it opens its own.
    # The inherited handles are set aside untouched rather than closed: closing runs
    # LMDB's and Python's teardown in every child, writing to (and so copying) pages
    # it would otherwise share with its parent, for no gain; their descriptors close
    # when the child exits, or when the child opens the same pool itself (LMDB allows
    # one handle per path and process).  Leases check the owning pid: none is usable.
    global _stores, _stores_lock
    _stores_lock = threading.Lock()  # another thread may have held it at the fork
    if _stores:
        _inherited_stores.append(_stores)
        _stores = {}


os.register_at_fork(after_in_child=_forget_inherited_stores)


def acquire_store(domain: str, root: str | os.PathLike[str] | None, *, create: bool) -> Store:
    """This process's store of the domain's pool, opened (and created, if asked) on
    first use.  PoolMissingError when there is none and ``create`` is False."""
    root_path = checked_root(root)
    key = _store_key(root_path, validate_domain(domain))
    with _stores_lock:
        store = _stores.get(key)
        if store is None:
            for inherited in _inherited_stores:  # LMDB opens a path once per process
                stale = inherited.pop(key, None)
                if stale is not None:
                    stale.close()
            store = _open_store(domain, root_path, create=create)
            store.key = key
            _stores[key] = store
        store.users += 1
        return store


def _store_key(root: str, domain: str) -> str:
    """One key per pool, however its root was spelled: LMDB must never have one
    environment open twice in a process (its fcntl locks are per process), and the
    checks of a second opening would close descriptors of its lock file."""
    parent, name = os.path.split(root)
    return os.path.join(os.path.realpath(parent), name, domain)


def add_user(store: Store) -> None:
    """One more handle or lease uses ``store``."""
    with _stores_lock:
        store.users += 1


def release_store(store: Store) -> None:
    with _stores_lock:
        if store.closed:
            return
        store.users -= 1
        if store.users == 0:
            _stores.pop(store.key, None)
            store.close()


def _missing(domain: str, directory: str) -> PoolMissingError:
    return PoolMissingError(f"no pool for domain '{domain}' (looked in {directory})")


def _open_root(domain: str, root: str, *, create: bool) -> int:
    try:
        return trust.open_pool_root(root, create=create)
    except FileNotFoundError:
        raise _missing(domain, os.path.join(root, domain)) from None
    except OSError as error:
        raise PoolError(f"cannot open the pool root {root}: {error.strerror}") from error


def _open_domain(domain: str, root: str, root_fd: int, *, create: bool) -> int:
    directory = os.path.join(root, domain)
    try:
        return trust.open_directory(
            root_fd, domain, directory, "pool directory",
            "remove it or choose another --domain", create=create,
        )  # fmt: skip
    except FileNotFoundError:
        raise _missing(domain, directory) from None
    except OSError as error:
        raise PoolError(f"cannot open the pool directory {directory}: {error.strerror}") from error


def _open_store(domain: str, root: str, *, create: bool) -> Store:
    """Open (creating if asked) the domain's pool, holding its lock shared."""
    root_fd = _open_root(domain, root, create=create)
    try:
        for _ in range(_OPEN_ATTEMPTS):
            place = _Place(
                domain, root, root_fd, _open_domain(domain, root, root_fd, create=create)
            )
            flags = os.O_RDWR | (os.O_CREAT if create else 0)
            try:
                lock_fd = trust.open_file(place.dir_fd, LOCK, flags, place.path(LOCK), place.fix)
            except FileNotFoundError:
                os.close(place.dir_fd)
                if not create:
                    raise _missing(domain, place.directory) from None
                continue  # purged between opening the directory and the lock: again
            except BaseException:
                os.close(place.dir_fd)
                raise
            try:
                if _lock_ready_pool(place, lock_fd, create=create):
                    index, pages = _open_pool_files(place)
                    return Store(place, lock_fd, index, pages)
            except BaseException:
                os.close(lock_fd)
                os.close(place.dir_fd)
                raise
            os.close(lock_fd)
            os.close(place.dir_fd)
        raise PoolError(
            f"the pool at {os.path.join(root, domain)} kept being purged while opening it"
        )
    except BaseException:
        os.close(root_fd)
        raise


def _is_ready(place: _Place) -> bool:
    return trust.existing_file(place.dir_fd, READY, place.path(READY), place.fix)


def _lock_ready_pool(place: _Place, lock_fd: int, *, create: bool) -> bool:
    """Hold the lock shared on a pool that is ready, creating it if asked.

    False if the lock file was purged meanwhile: the caller must start again.
    """
    while True:
        fcntl.flock(lock_fd, fcntl.LOCK_SH)  # waits while a creator or purger works
        # A purge unlinks the lock file under an exclusive lock: whoever waited on
        # the old file now holds a lock on nothing.
        if not trust.same_file(place.dir_fd, LOCK, lock_fd):
            return False
        if _is_ready(place):
            return True
        if not create:
            raise _missing(place.domain, place.directory)
        # Creating takes the lock exclusively.  Waiting for that could wait forever:
        # a process that saw the pool being created holds the lock shared for as long
        # as it uses the pool (and may be waiting for us, at a barrier say).  So only
        # try; on failure wait shared for whoever is creating, and look again.
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            import random  # only on this contended path: kept out of start-up

            time.sleep(random.uniform(0.0005, 0.002))  # desynchronise rival creators
            continue
        try:
            if not trust.same_file(place.dir_fd, LOCK, lock_fd):
                return False
            if not _is_ready(place):
                _create_pool(place)
        finally:
            fcntl.flock(lock_fd, fcntl.LOCK_SH)


def _format_problem(index: PoolIndex, directory: str) -> str | None:
    with index.read() as txn:
        version = index.meta_text(txn, "format")
        page_size = index.meta_text(txn, "page_size")
        layout = index.meta_text(txn, "layout")
    if version is None:
        return f"the index at {os.path.join(directory, INDEX)} is not a dksm pool index (no format)"
    if version != str(FORMAT_VERSION):
        return (
            f"the pool at {directory} has format {version}, and this dksm reads only "
            f"format {FORMAT_VERSION}"
        )
    if page_size != str(PAGE_SIZE):
        return f"the pool at {directory} holds {page_size}-byte pages, not {PAGE_SIZE}-byte ones"
    if layout != LAYOUT:
        return f"the pool at {directory} has index layout {layout!r}, not {LAYOUT!r}"
    return None


def _refusal(problem: str, directory: str) -> PoolError:
    return PoolError(
        f"{problem}; refusing to use it.  Remove {directory} (no VM may be using it) "
        "or choose another pool root or domain"
    )


def _open_index(place: _Place, *, create: bool) -> PoolIndex:
    hint = _repair_hint(place.domain, place.root)
    try:
        index_fd = trust.open_directory(
            place.dir_fd, INDEX, place.path(INDEX), "pool index directory", place.fix,
            create=False,
        )  # fmt: skip
    except FileNotFoundError:
        raise PoolDamagedError(
            f"the pool at {place.directory} has no index directory: it is damaged; {hint}"
        ) from None
    return PoolIndex(index_fd, place.path(INDEX), create=create, hint=hint)


def _open_pool_files(place: _Place) -> tuple[PoolIndex, PagesFile]:
    """The index and pages file of a ready pool, checked before anything is mapped
    (the pages file first: nothing of the pool is touched if it is not trusted)."""
    try:
        fd = trust.open_file(place.dir_fd, PAGES, os.O_RDWR, place.path(PAGES), place.fix)
    except FileNotFoundError:
        raise PoolDamagedError(
            f"the pool at {place.directory} has no pages file: it is damaged; "
            f"{_repair_hint(place.domain, place.root)}"
        ) from None
    pages = PagesFile(fd)
    try:
        index = _open_index(place, create=False)
    except BaseException:
        pages.close()
        raise
    try:
        problem = _format_problem(index, place.directory)
        if problem is not None:
            raise _refusal(problem, place.directory)
        with index.read() as txn:
            end = index.end(txn)
        if pages.size() < end * PAGE_SIZE:
            # Mapping a slot beyond the end of the file would kill its user (SIGBUS).
            raise index.damaged(
                f"its pages file holds {pages.size()} bytes, less than its {end} slots"
            )
    except BaseException:
        index.close()
        pages.close()
        raise
    return index, pages


def _check_leftovers(place: _Place) -> None:
    """Refuse to clear a half-made pool whose files are not ours, or one whose index
    records another format (never cleared by mistake)."""
    for name in (PAGES, READY_TMP):
        trust.existing_file(place.dir_fd, name, place.path(name), place.fix)
    try:
        os.stat(INDEX, dir_fd=place.dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    index_fd = trust.open_directory(
        place.dir_fd, INDEX, place.path(INDEX), "pool index directory", place.fix, create=False
    )
    try:
        if not trust.existing_file(index_fd, DATA_FILE, place.path(INDEX, DATA_FILE), place.fix):
            return
        try:
            version = stored_format(index_fd, place.path(INDEX), "")
        except (PoolDamagedError, PoolIndexError):
            return  # an index the dead creator had not finished writing
        if version not in (None, str(FORMAT_VERSION)):
            raise _refusal(
                f"the pool at {place.directory} has format {version}, and this dksm reads only "
                f"format {FORMAT_VERSION}",
                place.directory,
            )
    finally:
        os.close(index_fd)


def _create_pool(place: _Place) -> None:
    """Create an empty pool; the caller holds the lock exclusively and ``ready`` is
    absent.  On failure, what was made is removed again (the lock and the directory
    too), so a full tmpfs gets its space back from the process that failed."""
    _check_leftovers(place)
    try:
        left = remove_pool_files(place)
        if left:
            raise PoolError(
                f"the pool directory {place.directory} holds {', '.join(left)}, which dksm "
                "did not make: remove them or choose another --domain"
            )
        os.close(trust.create_file(place.dir_fd, PAGES, place.path(PAGES)))
        os.mkdir(INDEX, trust.DIRECTORY_MODE, dir_fd=place.dir_fd)
        index = _open_index(place, create=True)
        try:
            with index.write() as txn:
                index.initialise(txn, PAGE_SIZE)
        finally:
            index.close()
        ready_fd = trust.create_file(place.dir_fd, READY_TMP, place.path(READY_TMP))
        try:
            os.write(ready_fd, _READY_TEXT.encode())
        finally:
            os.close(ready_fd)
        os.rename(READY_TMP, READY, src_dir_fd=place.dir_fd, dst_dir_fd=place.dir_fd)
    except BaseException as error:
        with contextlib.suppress(DksmError, OSError):
            remove_pool_files(place)
        with contextlib.suppress(DksmError, OSError):
            trust.remove_name(place.dir_fd, LOCK, place.path(LOCK))
            _remove_directory(place)
        if isinstance(error, OSError):
            full = " (the tmpfs holding it is full)" if error.errno == errno.ENOSPC else ""
            raise PoolError(
                f"cannot create the pool in {place.directory}: {error.strerror}{full}"
            ) from error
        raise


def remove_pool_files(place: _Place) -> list[str]:
    """Remove the pool's files except the lock, ``ready`` first; return the names
    (relative to the pool directory) that are not dksm's and were left alone.

    Never follows a symlink and removes only names that are ours
    (:func:`dksm.dedup.trust.remove_name`); the caller holds the lock exclusively.
    """
    trust.remove_name(place.dir_fd, READY, place.path(READY))
    trust.remove_name(place.dir_fd, READY_TMP, place.path(READY_TMP))
    left: list[str] = []
    try:
        st = os.stat(INDEX, dir_fd=place.dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        pass
    else:
        if stat.S_ISDIR(st.st_mode):
            index_fd = trust.open_directory(
                place.dir_fd, INDEX, place.path(INDEX), "pool index directory", place.fix,
                create=False,
            )  # fmt: skip
            try:
                for name in (DATA_FILE, LOCK_FILE):
                    trust.remove_name(index_fd, name, place.path(INDEX, name))
                left = [f"{INDEX}/{name}" for name in trust.names_in(index_fd)]
            finally:
                os.close(index_fd)
            if not left:
                os.rmdir(INDEX, dir_fd=place.dir_fd)
        else:
            trust.remove_name(place.dir_fd, INDEX, place.path(INDEX))
    trust.remove_name(place.dir_fd, PAGES, place.path(PAGES))
    return left


def _remove_directory(place: _Place) -> bool:
    """rmdir the pool directory if it is still the one held, and empty."""
    try:
        st = os.stat(place.domain, dir_fd=place.root_fd, follow_symlinks=False)
        if (st.st_dev, st.st_ino) != trust.identity(place.dir_fd):
            return False
        os.rmdir(place.domain, dir_fd=place.root_fd)
    except OSError:  # gone already, or not empty: someone re-created the pool
        return False
    return True


def remove_store(store: Store, domain: str) -> list[str]:
    """Remove an open pool's files if nobody else has it open; close the store.
    Returns the names left because they are not dksm's."""
    with _stores_lock:
        if store.users > 1:
            raise PoolError(
                f"the pool of domain {domain!r} is open more than once in this process; "
                "close the other handles before purging"
            )
        try:
            fcntl.flock(store.lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fcntl.flock(store.lock_fd, fcntl.LOCK_SH)  # the attempt may have dropped it
            raise PoolError(
                f"the pool of domain {domain!r} is open in another process; close it "
                "there before purging"
            ) from None
        # Exclusive: nobody else has the pool open.
        place = store.place
        trust.remove_name(place.dir_fd, READY, place.path(READY))  # first: see above
        store.index.close()
        store.pages.close()
        store.closed = True
        _stores.pop(store.key, None)
        try:
            left = remove_pool_files(place)
            trust.remove_name(place.dir_fd, LOCK, place.path(LOCK))
            if not left:
                _remove_directory(place)
        finally:
            os.close(store.lock_fd)
            os.close(place.dir_fd)
            os.close(place.root_fd)
        return left


def force_remove(domain: str, root: str | os.PathLike[str] | None) -> list[str]:
    """Remove a domain's pool without opening its index (which may be too damaged to
    open), if no process has it open.  Returns the names left because they are not
    dksm's.  Only the trust rules apply: nothing is followed, only ours is removed."""
    root_path = checked_root(root)
    with _stores_lock:
        if _store_key(root_path, validate_domain(domain)) in _stores:
            raise PoolError(
                f"the pool of domain {domain!r} is open in this process; close it before purging"
            )
        root_fd = _open_root(domain, root_path, create=False)
        try:
            place = _Place(
                domain, root_path, root_fd, _open_domain(domain, root_path, root_fd, create=False)
            )
        except BaseException:
            os.close(root_fd)
            raise
        try:
            try:
                lock_fd: int | None = trust.open_file(
                    place.dir_fd, LOCK, os.O_RDWR, place.path(LOCK), place.fix
                )
            except FileNotFoundError:
                lock_fd = None  # nobody can have opened a pool without its lock file
            try:
                if lock_fd is not None:
                    try:
                        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except BlockingIOError:
                        raise PoolError(
                            f"the pool of domain {domain!r} is open in another process; stop "
                            "it (or its VMs) before purging"
                        ) from None
                left = remove_pool_files(place)
                trust.remove_name(place.dir_fd, LOCK, place.path(LOCK))
                if not left:
                    _remove_directory(place)
                return left
            finally:
                if lock_fd is not None:
                    os.close(lock_fd)
        finally:
            os.close(place.dir_fd)
            os.close(root_fd)
