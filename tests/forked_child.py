"""A child process forked to run a body that signals when it is ready, for tests that
then signal or kill it mid-work (a KSM session interrupted, say)."""

from __future__ import annotations

import os
from collections.abc import Callable


def fork_when_ready(body: Callable[[int], None]) -> int:
    """Fork a child running ``body(ready_fd)``; return its pid once it has written a
    byte to ``ready_fd``.  The child's exit status is the ``SystemExit`` code it ended
    with (1 for anything else)."""
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(reader)
        code = 1
        try:
            body(writer)
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
        finally:
            os._exit(code)
    os.close(writer)
    assert os.read(reader, 1) == b"x"
    os.close(reader)
    return pid
