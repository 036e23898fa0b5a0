"""KSM settings are put back exactly, on every path: normal exit, exception, SIGTERM,
and SIGKILL (through the state file).  Real KSM through /sys/kernel/mm/ksm."""

from __future__ import annotations

import errno
import json
import os
import signal
import tempfile
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest

from dksm.dedup.ksm import (
    KSM_SYSFS,
    KsmError,
    KsmSession,
    advise_mergeable,
    ksm_available,
    ksm_controllable,
    ksmd_cpu_seconds,
    ksmd_pid,
    ksmd_runtime_seconds,
    read_counters,
    read_settings,
    restore_if_crashed,
    wait_for_sharing,
    write_settings,
)
from dksm.memory.host_mapping import MADV_NOHUGEPAGE, PAGE_SIZE, advise, map_anonymous, unmap, view
from forked_child import fork_when_ready

pytestmark = pytest.mark.skipif(
    not (ksm_available() and ksm_controllable()),
    reason="needs a kernel with KSM and root to change /sys/kernel/mm/ksm",
)

# Settings a test changes: away from the defaults, and harmless for the host.
CHANGED = {"pages_to_scan": 1234, "sleep_millisecs": 7, "use_zero_pages": 1}


@pytest.fixture
def state_file() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="dksm-ksm-test-") as directory:
        yield Path(directory) / "ksm-settings.json"


@pytest.fixture
def settings_before() -> Iterator[dict[str, str]]:
    before = read_settings()
    yield before
    assert read_settings() == before


def changed_now() -> bool:
    now = read_settings()
    return all(now[name] == str(value) for name, value in CHANGED.items())


def test_settings_after_a_session_equal_settings_before(
    state_file: Path, settings_before: dict[str, str]
) -> None:
    with KsmSession(state_file=state_file) as ksm:
        ksm.apply(**CHANGED)
        assert changed_now()
        assert json.loads(state_file.read_text())["settings"] == settings_before
    assert read_settings() == settings_before
    assert not state_file.exists()


def test_settings_are_restored_when_the_session_raises(
    state_file: Path, settings_before: dict[str, str]
) -> None:
    with pytest.raises(RuntimeError, match="boom"), KsmSession(state_file=state_file) as ksm:
        ksm.apply(**CHANGED)
        raise RuntimeError("boom")
    assert read_settings() == settings_before
    assert not state_file.exists()


def test_a_refused_setting_is_reported_and_nothing_stays_changed(
    state_file: Path, settings_before: dict[str, str]
) -> None:
    with (
        pytest.raises(KsmError, match="max_page_sharing"),
        KsmSession(state_file=state_file) as ksm,
    ):
        ksm.apply(max_page_sharing=1)  # the kernel wants at least 2
    with pytest.raises(KsmError, match="no setting"), KsmSession(state_file=state_file) as ksm:
        ksm.apply(no_such_knob=1)
    assert read_settings() == settings_before


@pytest.mark.skipif(
    not (KSM_SYSFS / "advisor_mode").exists(), reason="this kernel's KSM has no advisor"
)
def test_the_advisor_is_restored_before_the_pages_it_owns(
    state_file: Path, settings_before: dict[str, str]
) -> None:
    with KsmSession(state_file=state_file) as ksm:
        ksm.apply(pages_to_scan=1234)
        ksm.apply(advisor_mode="scan-time")  # now the advisor sets pages_to_scan
        assert read_settings()["advisor_mode"] == "scan-time"
    assert read_settings() == settings_before


def _session_until_signalled(state_file: Path, ready_fd: int) -> None:
    with KsmSession(state_file=state_file) as ksm:
        ksm.apply(**CHANGED)
        os.write(ready_fd, b"x")
        while True:
            signal.pause()


def _run_session_in_child(state_file: Path) -> int:
    return fork_when_ready(partial(_session_until_signalled, state_file))


def test_sigterm_inside_a_session_restores_settings(
    state_file: Path, settings_before: dict[str, str]
) -> None:
    pid = _run_session_in_child(state_file)
    assert changed_now()
    os.kill(pid, signal.SIGTERM)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 128 + signal.SIGTERM
    assert read_settings() == settings_before
    assert not state_file.exists()


def test_a_killed_session_is_repaired_from_its_state_file(
    state_file: Path, settings_before: dict[str, str]
) -> None:
    pid = _run_session_in_child(state_file)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    assert changed_now()  # nothing could restore them
    assert state_file.exists()
    assert restore_if_crashed(state_file) is True
    assert read_settings() == settings_before
    assert not state_file.exists()
    assert restore_if_crashed(state_file) is False  # nothing left to do


def test_a_new_session_first_repairs_a_crashed_one(
    state_file: Path, settings_before: dict[str, str]
) -> None:
    pid = _run_session_in_child(state_file)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    with KsmSession(state_file=state_file) as ksm:
        assert ksm.saved == settings_before  # saved after the repair, not the crash's values
    assert read_settings() == settings_before


def _write_record(state_file: Path, *, pid: int, start_time: int, boot_id: str) -> None:
    settings = read_settings()
    settings.update({name: str(value) for name, value in CHANGED.items()})
    # What a session writes before changing anything: here the "saved" values are
    # CHANGED, so restoring them is visible.
    state_file.write_text(
        json.dumps(
            {
                "format": 1,
                "boot_id": boot_id,
                "pid": pid,
                "start_time": start_time,
                "sysfs": str(KSM_SYSFS),
                "settings": settings,
            }
        )
    )


def test_a_record_left_by_a_dead_process_is_restored(
    state_file: Path, settings_before: dict[str, str]
) -> None:
    boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    _write_record(state_file, pid=2**31 - 1, start_time=1, boot_id=boot_id)
    try:
        assert restore_if_crashed(state_file) is True
        assert changed_now()
        assert not state_file.exists()
    finally:
        write_settings(settings_before)


def test_a_record_of_a_live_session_or_another_boot_is_not_applied(
    state_file: Path, settings_before: dict[str, str]
) -> None:
    stat = Path("/proc/self/stat").read_bytes()
    start_time = int(stat[stat.rindex(b")") + 2 :].split()[19])
    boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    _write_record(state_file, pid=os.getpid(), start_time=start_time, boot_id=boot_id)
    assert restore_if_crashed(state_file) is False  # its owner (us) is alive
    assert state_file.exists()
    with pytest.raises(KsmError, match="another dksm process"), KsmSession(state_file=state_file):
        pass
    _write_record(state_file, pid=2**31 - 1, start_time=1, boot_id="an-earlier-boot")
    assert restore_if_crashed(state_file) is False
    assert not state_file.exists()  # stale: discarded


def test_settings_that_need_no_shared_pages_are_changed_and_restored_by_unmerging(
    state_file: Path, settings_before: dict[str, str]
) -> None:
    count = 64
    address = map_anonymous(count * PAGE_SIZE)
    advise(address, count * PAGE_SIZE, MADV_NOHUGEPAGE)
    view(address, count * PAGE_SIZE)[:] = b"\x5a" * (count * PAGE_SIZE)
    advise_mergeable(address, count * PAGE_SIZE)
    try:
        with KsmSession(state_file=state_file) as ksm:
            baseline = read_counters()["pages_sharing"]
            ksm.apply(run=1, pages_to_scan=5000, sleep_millisecs=0)
            assert wait_for_sharing(baseline + count - 1, timeout=30) is not None
            assert read_counters()["pages_shared"] > 0
            with pytest.raises(OSError) as refused:  # the kernel's rule, seen directly
                (KSM_SYSFS / "max_page_sharing").write_text("16")
            assert refused.value.errno == errno.EBUSY
            ksm.apply(max_page_sharing=16)  # so the session unmerges first
            now = read_settings()
            assert (now["max_page_sharing"], now["run"]) == ("16", "1")
            assert wait_for_sharing(baseline + count - count // 16, timeout=30) is not None
    finally:
        unmap(address, count * PAGE_SIZE)
    assert read_settings() == settings_before


def test_counters_and_ksmd_cpu_time_can_be_read() -> None:
    counters = read_counters()
    assert {"pages_shared", "pages_sharing", "full_scans"} <= counters.keys()
    assert all(isinstance(value, int) for value in counters.values())
    assert ksmd_pid() is not None
    assert ksmd_cpu_seconds() >= 0
    assert ksmd_runtime_seconds() >= 0
