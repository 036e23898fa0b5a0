"""Process identity: who owns a lease, and whether that owner is still alive.

A pid alone names a process only while it lives: once it exits the kernel may hand
the same number to an unrelated process, which must not inherit the dead one's
references to pool pages.  So an owner is a pid together with the process start
time (``/proc/PID/stat`` field 22, clock ticks since boot), which never repeats for
one pid within a boot.  A zombie counts as dead: its memory, and with it every
mapping of pool pages, is gone before it becomes a zombie.
"""

from __future__ import annotations

import os

from dksm.value import Value

# /proc/PID/stat: "pid (comm) state ppid ...".  comm may hold spaces and parentheses,
# so fields are counted after the last ')'; field 3 (state) is then at index 0.
_STATE_INDEX = 0
_START_TIME_INDEX = 22 - 3
_DEAD_STATES = frozenset({"Z", "X", "x"})


class ProcessIdentity(Value):
    """A process as it is told apart from every other one since boot."""

    __slots__ = ("pid", "start_time")

    def __init__(
        self,
        pid: int,
        # clock ticks since boot, /proc/PID/stat field 22
        start_time: int,
    ) -> None:
        self.pid = pid
        self.start_time = start_time

    @classmethod
    def of(cls, pid: int) -> ProcessIdentity | None:
        """The live process with this pid, or None when there is none (or a zombie)."""
        fields = _stat_fields(pid)
        if fields is None or fields[_STATE_INDEX] in _DEAD_STATES:
            return None
        return cls(pid, int(fields[_START_TIME_INDEX]))

    @classmethod
    def current(cls) -> ProcessIdentity:
        """This process (looked up afresh, so a forked child gets its own identity)."""
        me = cls.of(os.getpid())
        if me is None:  # /proc always shows the reading process; without it nothing works
            raise RuntimeError("/proc/self/stat is unreadable: is /proc mounted?")
        return me

    def is_alive(self) -> bool:
        """Whether this very process still runs (not merely some process with its pid)."""
        return ProcessIdentity.of(self.pid) == self


def _stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            text = stat.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return text[text.rindex(b")") + 2 :].decode("ascii").split()
