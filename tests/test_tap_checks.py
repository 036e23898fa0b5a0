"""A tap's checks name the real problem: a missing interface, one that is down, or a
host that cannot even open the socket the check needs."""

from __future__ import annotations

import subprocess
import sys

import pytest

from dksm.devices.tap import TapError, check_tap


def test_missing_interface_is_named_missing() -> None:
    with pytest.raises(TapError, match="tap device dksmnotap7 does not exist"):
        check_tap("dksmnotap7")


def test_existing_interface_that_is_up_passes() -> None:
    check_tap("lo")  # the loopback interface is up on any host that runs the tests


def test_out_of_descriptors_is_not_called_missing() -> None:
    # In a child: with no descriptor left, the check cannot open its socket, and
    # says so rather than claiming the (existing) loopback interface is missing.
    code = (
        "import os, resource\n"
        "from dksm.devices.tap import TapError, check_tap\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (32, 32))\n"
        "held = []\n"
        "try:\n"
        "    while True: held.append(os.open('/dev/null', os.O_RDONLY))\n"
        "except OSError: pass\n"
        "try:\n"
        "    check_tap('lo')\n"
        "except TapError as error:\n"
        "    print(error)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.strip() == (
        "cannot read the flags of network interface lo: Too many open files"
    )
