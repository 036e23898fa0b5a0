"""Control of Linux KSM through /sys/kernel/mm/ksm: the baseline dksm is measured against.

KSM's settings belong to the whole host, so whoever changes them must put them back,
on every path.  :class:`KsmSession` saves every writable setting on entry, writes the
saved values to a state file before changing anything, and restores them on exit --
normal, exception, or SIGTERM/SIGHUP/SIGINT (turned into an exception while the
session runs).  Only SIGKILL or a power cut escapes it; then the state file remains,
and :func:`restore_if_crashed`, which every session calls on entry, puts the
settings back once the process that wrote it is dead.  The file names the boot it
belongs to: after a reboot the kernel has reset KSM and the file is just discarded.

Two more host-wide settings travel with KSM's, saved in the same state file and put
back the same way, because the experiments that run KSM are the ones that change
them: the transparent huge pages switch (:mod:`dksm.dedup.huge_pages`), which a run
may turn off as the DKSM thesis did, and the CPUs ksmd may run on, which a run may
narrow to put ksmd on the same core as the guest it measures.

The kernel constrains the order of writes (``mm/ksm.c``):

- ``max_page_sharing`` and ``merge_across_nodes`` refuse a change (EBUSY) while any
  page is shared; writing ``run`` = 2 first unmerges everything, synchronously.
- Changing ``advisor_mode`` resets ``pages_to_scan``, and while the advisor is on
  ``pages_to_scan`` refuses writes (EINVAL): the advisor owns it.
- ``run`` goes last, so the scanner never runs with half-restored settings.

:data:`SETTINGS` lists the writable settings in the order they are written.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from types import FrameType, TracebackType
from typing import Final, Self

from dksm.dedup import huge_pages
from dksm.dedup.owner import ProcessIdentity
from dksm.error import DksmError
from dksm.memory.host_mapping import MADV_MERGEABLE, MADV_UNMERGEABLE, advise

KSM_SYSFS: Final = Path("/sys/kernel/mm/ksm")
STATE_FILE_ENV: Final = "DKSM_KSM_STATE"
# /run is where state that must not outlive a boot belongs; the boot id in the file
# guards hosts whose /run is not a tmpfs.
DEFAULT_STATE_FILE: Final = Path("/run/dksm/ksm-settings.json")
# Held (flock) by every session on the host's real KSM: one at a time, whatever state
# file each names, so that no session saves another's changes as "the settings".
HOST_LOCK_FILE: Final = Path("/run/dksm/ksm.lock")

SETTINGS: Final = (
    "max_page_sharing",
    "merge_across_nodes",
    "advisor_mode",
    "advisor_max_cpu",
    "advisor_min_pages_to_scan",
    "advisor_max_pages_to_scan",
    "advisor_target_scan_time",
    "pages_to_scan",
    "sleep_millisecs",
    "use_zero_pages",
    "smart_scan",
    "stable_node_chains_prune_millisecs",
    "run",
)
COUNTERS: Final = (
    "pages_shared",  # KSM pages in use (each stands for several)
    "pages_sharing",  # mappings of them beyond the first: pages saved
    "pages_unshared",  # scanned, unique, watched for a match
    "pages_volatile",  # changing too fast to be considered
    "pages_scanned",
    "pages_skipped",
    "full_scans",
    "general_profit",  # bytes saved minus KSM's own metadata; may be negative
    "ksm_zero_pages",
    "stable_node_chains",
    "stable_node_dups",
)
RUN_STOP: Final = "0"
RUN_MERGE: Final = "1"
RUN_UNMERGE: Final = "2"  # stop and unmerge every shared page
_NEED_NOTHING_SHARED: Final = ("max_page_sharing", "merge_across_nodes")
_STATE_FORMAT: Final = 1
_HANDLED_SIGNALS: Final = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)


class KsmError(DksmError):
    """KSM is missing, not ours to change, or refused a setting."""


def ksm_available(sysfs: Path = KSM_SYSFS) -> bool:
    """Whether this kernel has KSM."""
    return (sysfs / "run").exists()


def ksm_controllable(sysfs: Path = KSM_SYSFS) -> bool:
    """Whether this process may change KSM's settings (root, normally)."""
    return os.access(sysfs / "run", os.W_OK)


def read_setting(name: str, sysfs: Path = KSM_SYSFS) -> str:
    text = (sysfs / name).read_text().strip()
    # Choice files show every choice and bracket the current one: "[none] scan-time".
    if "[" in text:
        return text[text.index("[") + 1 : text.index("]")]
    return text


def read_settings(sysfs: Path = KSM_SYSFS) -> dict[str, str]:
    """Every writable setting this kernel has, as the strings to write back."""
    return {name: read_setting(name, sysfs) for name in SETTINGS if (sysfs / name).exists()}


def read_counters(sysfs: Path = KSM_SYSFS) -> dict[str, int]:
    """KSM's counters that this kernel has (see :data:`COUNTERS`)."""
    return {name: int((sysfs / name).read_text()) for name in COUNTERS if (sysfs / name).exists()}


def _write(name: str, value: str, sysfs: Path) -> None:
    fd = os.open(sysfs / name, os.O_WRONLY)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def write_settings(values: Mapping[str, str | int], sysfs: Path = KSM_SYSFS) -> None:
    """Change KSM settings, in the order the kernel needs (see the module doc).

    Every setting is attempted even if an earlier one is refused, so that a restore
    puts back all it can; the refusals are then raised together.
    """
    current = read_settings(sysfs)
    wanted = {name: str(value) for name, value in values.items()}
    unknown = sorted(set(wanted) - set(current))
    if unknown:
        raise KsmError(f"this kernel's KSM has no setting {', '.join(unknown)}")
    refusals: list[str] = []
    for name in SETTINGS:
        if name not in wanted or name == "run":
            continue
        value = wanted[name]
        if name == "pages_to_scan":
            # The advisor owns pages_to_scan; and switching the advisor reset it, so
            # the comparison with `current` no longer holds.
            advisor = sysfs / "advisor_mode"  # kernels before 6.9 have no advisor
            if advisor.exists() and read_setting("advisor_mode", sysfs) != "none":
                continue
        elif value == current[name]:
            continue
        try:
            _write(name, value, sysfs)
        except OSError as error:
            if name in _NEED_NOTHING_SHARED and error.errno == errno.EBUSY:
                try:
                    _write("run", RUN_UNMERGE, sysfs)  # returns once all is unmerged
                    _write(name, value, sysfs)
                    continue
                except OSError as again:
                    error = again
            refusals.append(f"{name} = {value} ({os.strerror(error.errno or 0)})")
    final_run = wanted.get("run", current["run"])
    if final_run != read_setting("run", sysfs):
        try:
            _write("run", final_run, sysfs)
        except OSError as error:
            refusals.append(f"run = {final_run} ({os.strerror(error.errno or 0)})")
    if refusals:
        raise KsmError(f"KSM refused {'; '.join(refusals)}")


# -- ksmd ------------------------------------------------------------------------------


def ksmd_pid() -> int | None:
    """The pid of the ksmd kernel thread, or None when there is none."""
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            comm = Path(entry.path, "comm").read_text().strip()
            if comm == "ksmd" and not Path(entry.path, "cmdline").read_bytes():
                return int(entry.name)
        except OSError:
            continue  # exited while we looked
    return None


def _require_ksmd() -> int:
    pid = ksmd_pid()
    if pid is None:
        raise KsmError("no ksmd kernel thread is running: does this kernel have KSM?")
    return pid


def ksmd_cpu_seconds() -> float:
    """CPU time ksmd has used since boot: utime + stime of /proc/PID/stat, in seconds.

    Counted in clock ticks (10 ms at the usual 100 Hz): use :func:`ksmd_runtime_seconds`
    for short measurements.
    """
    stat = Path(f"/proc/{_require_ksmd()}/stat").read_bytes()
    fields = stat[stat.rindex(b")") + 2 :].split()
    utime, stime = int(fields[14 - 3]), int(fields[15 - 3])  # fields 14, 15 of stat(5)
    return (utime + stime) / os.sysconf("SC_CLK_TCK")


def ksmd_runtime_seconds() -> float:
    """ksmd's time on a CPU in nanosecond resolution (/proc/PID/schedstat), falling
    back to :func:`ksmd_cpu_seconds` where the kernel keeps no scheduler statistics."""
    try:
        text = Path(f"/proc/{_require_ksmd()}/schedstat").read_text()
    except FileNotFoundError:
        return ksmd_cpu_seconds()
    return int(text.split()[0]) / 1e9


def advise_mergeable(address: int, length: int) -> None:
    """Offer a private anonymous region to KSM (``madvise(MADV_MERGEABLE)``)."""
    advise(address, length, MADV_MERGEABLE)


def advise_unmergeable(address: int, length: int) -> None:
    """Withdraw a region from KSM, unmerging its pages (``madvise(MADV_UNMERGEABLE)``)."""
    advise(address, length, MADV_UNMERGEABLE)


def wait_for_sharing(
    pages_sharing: int, timeout: float, *, poll: float = 0.01, sysfs: Path = KSM_SYSFS
) -> float | None:
    """Wait until KSM's ``pages_sharing`` reaches a count; seconds waited, or None."""
    started = time.monotonic()
    while True:
        if int((sysfs / "pages_sharing").read_text()) >= pages_sharing:
            return time.monotonic() - started
        if time.monotonic() - started >= timeout:
            return None
        time.sleep(poll)


# -- sessions and their state file ---------------------------------------------------


def state_file_path(state_file: Path | None = None) -> Path:
    if state_file is not None:
        return state_file
    return Path(os.environ.get(STATE_FILE_ENV) or DEFAULT_STATE_FILE)


def _boot_id() -> str:
    return Path("/proc/sys/kernel/random/boot_id").read_text().strip()


def restore_if_crashed(state_file: Path | None = None, sysfs: Path | None = None) -> bool:
    """Restore the settings a session saved if the process that ran it is dead.

    Returns whether settings were restored.  A state file from an earlier boot is
    removed without restoring (the kernel reset KSM at boot); one whose session is
    still running is left alone.
    """
    path = state_file_path(state_file)
    try:
        record = json.loads(path.read_text())
        owner = ProcessIdentity(int(record["pid"]), int(record["start_time"]))
        saved = {str(name): str(value) for name, value in record["settings"].items()}
        recorded_sysfs = Path(record["sysfs"])
        same_boot = record["boot_id"] == _boot_id()
    except FileNotFoundError:
        return False
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise KsmError(
            f"the KSM state file {path} is unreadable ({error}); check the settings in "
            f"{KSM_SYSFS} and remove it"
        ) from error
    if not same_boot:
        path.unlink(missing_ok=True)
        return False
    if owner.is_alive():
        return False
    try:
        _restore_companions(record)
    finally:
        write_settings(saved, sysfs or recorded_sysfs)
    path.unlink(missing_ok=True)
    return True


def _restore_companions(record: Mapping[str, object]) -> None:
    """Put back ksmd's CPUs and the huge-pages switch if the record saved them."""
    cpus = record.get("ksmd_cpus")
    if isinstance(cpus, list):
        pid = ksmd_pid()
        if pid is not None:
            try:
                os.sched_setaffinity(pid, [int(cpu) for cpu in cpus])
            except OSError as error:
                raise KsmError(
                    f"cannot give ksmd back CPUs {cpus} ({os.strerror(error.errno or 0)})"
                ) from None
    thp = record.get("thp_enabled")
    if isinstance(thp, str):
        huge_pages.write_thp_enabled(thp, Path(str(record.get("thp_path", huge_pages.THP_ENABLED))))


def _write_state_file(path: Path, record: dict[str, object], *, replace: bool = False) -> None:
    """Create the state file with its whole content at once, or fail if it exists;
    with ``replace``, swap in new content for the session's own file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    draft = path.with_name(f".{path.name}.{os.getpid()}.draft")
    draft.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    if replace:
        os.replace(draft, path)
        return
    try:
        os.link(draft, path)  # atomic and exclusive, unlike rename
    except FileExistsError:
        raise KsmError(
            f"another dksm process is changing KSM settings (see {path}); wait for it to end"
        ) from None
    finally:
        draft.unlink()


class KsmSession:
    """KSM settings saved on entry and restored on exit, whatever the exit.

    >>> with KsmSession() as ksm:                       # doctest: +SKIP
    ...     ksm.apply(run=1, pages_to_scan=5000, sleep_millisecs=0)
    ...     ...                                         # measure

    SIGTERM, SIGHUP and SIGINT raise :class:`SystemExit` inside the session (when it
    is entered from the main thread), so the ``with`` block unwinds and restores.
    """

    def __init__(
        self,
        *,
        state_file: Path | None = None,
        sysfs: Path = KSM_SYSFS,
        handle_signals: bool = True,
        thp_path: Path = huge_pages.THP_ENABLED,
    ) -> None:
        self.state_file = state_file_path(state_file)
        self.sysfs = sysfs
        self.thp_path = thp_path
        self.saved: dict[str, str] = {}
        self._record: dict[str, object] = {}
        self._handle_signals = handle_signals
        self._previous_handlers: dict[int, object] = {}
        self._active = False
        self._host_lock: int | None = None

    def _lock_host(self) -> None:
        """Wait for any other session on the host's KSM to end (tests and benchmarks
        started side by side take turns instead of undoing each other)."""
        if self.sysfs != KSM_SYSFS:
            return
        import fcntl
        import sys

        HOST_LOCK_FILE.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(HOST_LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print("dksm: waiting for another process's KSM session to end", file=sys.stderr)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except BaseException:
                os.close(fd)
                raise
        self._host_lock = fd

    def _unlock_host(self) -> None:
        if self._host_lock is not None:
            os.close(self._host_lock)  # closing the only descriptor releases the flock
            self._host_lock = None

    def __enter__(self) -> Self:
        if not ksm_available(self.sysfs):
            raise KsmError(f"this kernel has no KSM ({self.sysfs} is missing)")
        if not ksm_controllable(self.sysfs):
            raise KsmError(f"changing KSM settings in {self.sysfs} needs root")
        self._lock_host()
        try:
            self._begin()
        except BaseException:
            self._unlock_host()
            raise
        return self

    def _begin(self) -> None:
        restore_if_crashed(self.state_file, self.sysfs)
        self.saved = read_settings(self.sysfs)
        me = ProcessIdentity.current()
        self._record = {
            "format": _STATE_FORMAT,
            "boot_id": _boot_id(),
            "pid": me.pid,
            "start_time": me.start_time,
            "sysfs": str(self.sysfs),
            "settings": self.saved,
        }
        _write_state_file(self.state_file, self._record)
        self._active = True
        if self._handle_signals and threading.current_thread() is threading.main_thread():
            for signum in _HANDLED_SIGNALS:
                self._previous_handlers[signum] = signal.signal(signum, _exit_on_signal)

    def apply(self, **settings: int | str) -> None:
        """Change settings for the rest of the session, e.g. ``apply(run=1)``."""
        if not self._active:
            raise KsmError("KSM settings can only be changed inside a session")
        write_settings(settings, self.sysfs)

    def set_thp_enabled(self, value: str) -> None:
        """Set the transparent huge pages switch for the rest of the session; it is
        saved first (in the state file too) and restored with KSM's settings."""
        if not self._active:
            raise KsmError("huge pages can only be switched inside a session")
        if "thp_enabled" not in self._record:
            self._save_companion(
                thp_enabled=huge_pages.read_thp_enabled(self.thp_path),
                thp_path=str(self.thp_path),
            )
        huge_pages.write_thp_enabled(value, self.thp_path)

    def pin_ksmd(self, cpus: set[int]) -> None:
        """Let ksmd run only on ``cpus`` for the rest of the session (saved first,
        restored with KSM's settings)."""
        if not self._active:
            raise KsmError("ksmd can only be pinned inside a session")
        pid = _require_ksmd()
        if "ksmd_cpus" not in self._record:
            self._save_companion(ksmd_cpus=sorted(os.sched_getaffinity(pid)))
        try:
            os.sched_setaffinity(pid, cpus)
        except OSError as error:
            raise KsmError(
                f"cannot pin ksmd to CPUs {sorted(cpus)} ({os.strerror(error.errno or 0)})"
            ) from None

    def _save_companion(self, **values: object) -> None:
        self._record.update(values)
        _write_state_file(self.state_file, self._record, replace=True)

    def restore(self) -> None:
        """Put the saved settings back and end the session (idempotent)."""
        if not self._active:
            return
        blocked = set(self._previous_handlers)
        # A second signal must not interrupt the restore half-way.
        signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
        try:
            try:
                _restore_companions(self._record)
            finally:  # KSM's own settings are put back even if a companion was refused
                write_settings(self.saved, self.sysfs)  # on failure the state file stays
            self.state_file.unlink(missing_ok=True)
            self._active = False
            self._unlock_host()
            for signum, handler in self._previous_handlers.items():
                signal.signal(signum, handler)  # type: ignore[arg-type]
            self._previous_handlers.clear()
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, blocked)

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.restore()


def _exit_on_signal(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)
