"""The host-wide settings that travel with KSM's in a session: transparent huge pages
and ksmd's CPUs, put back on a normal exit, on SIGINT, and from the state file after
SIGKILL.  Real /sys/kernel/mm and the real ksmd."""

from __future__ import annotations

import os
import signal
import tempfile
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest

from dksm.dedup import huge_pages
from dksm.dedup.ksm import (
    KsmSession,
    ksm_available,
    ksm_controllable,
    ksmd_pid,
    read_settings,
    restore_if_crashed,
)
from forked_child import fork_when_ready

pytestmark = pytest.mark.skipif(
    not (ksm_available() and ksm_controllable() and huge_pages.thp_available()),
    reason="needs root, KSM and transparent huge pages",
)


@pytest.fixture
def state_file() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="dksm-host-test-") as directory:
        yield Path(directory) / "ksm-settings.json"


@pytest.fixture
def host_before() -> Iterator[tuple[str, set[int], dict[str, str]]]:
    pid = ksmd_pid()
    assert pid is not None
    before = (huge_pages.read_thp_enabled(), os.sched_getaffinity(pid), read_settings())
    yield before
    assert (huge_pages.read_thp_enabled(), os.sched_getaffinity(pid), read_settings()) == before


def _other_thp(current: str) -> str:
    return "never" if current != "never" else "madvise"


def _ksmd_cpus() -> set[int]:
    pid = ksmd_pid()
    assert pid is not None
    return os.sched_getaffinity(pid)


def test_huge_pages_and_ksmd_cpus_are_restored_after_a_session(
    state_file: Path, host_before: tuple[str, set[int], dict[str, str]]
) -> None:
    thp, cpus, _ = host_before
    with KsmSession(state_file=state_file) as session:
        session.set_thp_enabled(_other_thp(thp))
        session.pin_ksmd({min(cpus)})
        assert huge_pages.read_thp_enabled() == _other_thp(thp)
        assert _ksmd_cpus() == {min(cpus)}


def test_bad_huge_page_setting_is_one_clear_error(state_file: Path) -> None:
    with (
        pytest.raises(huge_pages.HugePagesError, match="cannot be set to 'sometimes'"),
        KsmSession(state_file=state_file) as session,
    ):
        session.set_thp_enabled("sometimes")


def _hold_session(state_file: Path, ready_fd: int) -> None:
    with KsmSession(state_file=state_file) as session:
        session.set_thp_enabled(_other_thp(huge_pages.read_thp_enabled()))
        session.pin_ksmd({min(_ksmd_cpus())})
        os.write(ready_fd, b"x")
        while True:
            signal.pause()


def _session_in_child(state_file: Path) -> int:
    return fork_when_ready(partial(_hold_session, state_file))


def test_sigint_restores_huge_pages_and_ksmd(
    state_file: Path, host_before: tuple[str, set[int], dict[str, str]]
) -> None:
    thp, _, _ = host_before
    pid = _session_in_child(state_file)
    assert huge_pages.read_thp_enabled() == _other_thp(thp)
    os.kill(pid, signal.SIGINT)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 128 + signal.SIGINT
    assert not state_file.exists()


def test_a_killed_session_leaves_a_record_that_restores_them(
    state_file: Path, host_before: tuple[str, set[int], dict[str, str]]
) -> None:
    thp, cpus, _ = host_before
    pid = _session_in_child(state_file)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    assert huge_pages.read_thp_enabled() == _other_thp(thp)  # nothing could restore it
    assert _ksmd_cpus() == {min(cpus)}
    assert restore_if_crashed(state_file) is True
    assert not state_file.exists()
