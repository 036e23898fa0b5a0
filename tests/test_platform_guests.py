"""The machine model seen from inside real guests (the kit's probes) on /dev/kvm: the
CMOS clock, CPUID's hypervisor and random-number leaves, several vCPUs started by
INIT/SIPI through the MP table, and serial input forwarded from dksm's stdin."""

from __future__ import annotations

import calendar
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dksm.guests import guest_path
from dksm.kvm.system import Kvm

from conftest import dksm, requires_kvm

pytestmark = requires_kvm

RTC_LINE = re.compile(
    r"platprobe: rtc b=(\w\w) sec=(\w\w) min=(\w\w) hour=(\w\w) wday=(\w\w) mday=(\w\w) "
    r"mon=(\w\w) year=(\w\w) century=(\w\w)"
)


def _decode_rtc(fields: tuple[str, ...]) -> tuple[int, tuple[int, ...]]:
    """(status B, (year, month, day, hour, minute, second)) as the host decodes it."""
    b = int(fields[0], 16)
    raw = [int(f, 16) for f in fields[1:]]
    pm = False
    if not b & 0x02:  # 12-hour: bit 7 of the hour is PM
        pm = bool(raw[2] & 0x80)
        raw[2] &= 0x7F
    values = raw if b & 0x04 else [(v >> 4) * 10 + (v & 0xF) for v in raw]
    sec, minute, hour, _wday, mday, mon, year, century = values
    if not b & 0x02:
        hour = hour % 12 + (12 if pm else 0)
    return b, (century * 100 + year, mon, mday, hour, minute, sec)


def test_rtc_gives_the_guest_the_host_time_in_every_format() -> None:
    before = time.time()
    result = dksm("run", "--kernel", "platprobe", "--dedup", "none", timeout=60)
    after = time.time()
    assert result.returncode == 0, result.stderr
    readings = [_decode_rtc(m.groups()) for m in RTC_LINE.finditer(result.stdout)]
    assert [b for b, _ in readings] == [0x02, 0x06, 0x00, 0x02]
    for _, when in readings[:3]:
        seconds = calendar.timegm(when)
        assert int(before) - 1 <= seconds <= after + 1, (when, before, after)
    # The guest set the year to 99 (BCD) with the SET bit; the rest kept running.
    year, month, day, *_ = readings[3][1]
    assert year == 2099
    assert (month, day) == readings[2][1][1:3]


def test_cpuid_announces_the_tsc_frequency_unless_told_not_to() -> None:
    with Kvm() as kvm:
        vm = kvm.create_vm()
        vcpu = vm.create_vcpu(0)
        tsc_khz = vcpu.tsc_khz()
        vcpu.close()
        vm.close()
    shown = dksm("run", "--kernel", "platprobe", "--dedup", "none", timeout=60)
    assert shown.returncode == 0, shown.stderr
    assert "platprobe: hypervisor max=0x40000010 signature=KVMKVMKVM..." in shown.stdout
    assert f"platprobe: tsc_khz {tsc_khz} lapic_khz 1000000" in shown.stdout
    hidden = dksm("run", "--kernel", "platprobe", "--dedup", "none", "--no-tsc-leaf", timeout=60)
    assert hidden.returncode == 0, hidden.stderr
    assert "platprobe: tsc leaf absent" in hidden.stdout
    assert "platprobe: hypervisor max=0x40000001" in hidden.stdout


def test_rdrand_and_rdseed_are_offered_and_work_where_the_host_has_them() -> None:
    flags = Path("/proc/cpuinfo").read_text().split("\nflags", 1)[-1].split("\n", 1)[0].split()
    result = dksm("run", "--kernel", "platprobe", "--dedup", "none", timeout=60)
    assert result.returncode == 0, result.stderr
    for instruction, values in (("rdrand", 2), ("rdseed", 1)):
        match = re.search(rf"platprobe: {instruction} cpuid=(\d)(.*)", result.stdout)
        assert match is not None, result.stdout
        assert match.group(1) == ("1" if instruction in flags else "0")
        if instruction in flags:
            words = match.group(2).split()
            assert words[-1] == "cf=1"
            numbers = words[:values]
            assert all(re.fullmatch(r"[0-9a-f]{16}", n) for n in numbers)
            assert len(set(numbers)) == values


def _smp_lines(stdout: str) -> tuple[int, list[tuple[int, ...]], str]:
    listed = re.search(r"smpprobe: mp table lists (\d+) cpus", stdout)
    assert listed is not None, stdout
    online = re.compile(r"smpprobe: cpu (\d+) apic (\d+) cpuid (\d+) x2apic (\d+) online")
    cpus = [tuple(int(x) for x in m.groups()) for m in online.finditer(stdout)]
    final = stdout.strip().splitlines()[-1]
    return int(listed.group(1)), sorted(cpus), final


@pytest.mark.parametrize("vcpus", [1, 2, 4, 32])
def test_every_vcpu_starts_and_they_agree_on_a_shared_counter(vcpus: int) -> None:
    result = dksm(
        "run", "--kernel", "smpprobe", "--vcpus", str(vcpus), "--dedup", "none",
        "--timeout", "100", timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    listed, cpus, final = _smp_lines(result.stdout)
    assert listed == vcpus
    # Each CPU's x2APIC id, CPUID leaf 1 id and leaf 0xB id are its index.
    assert cpus == [(i, i, i, i) for i in range(vcpus)]
    # Even CPUs add 50 to the 128-bit counter with lock cmpxchg16b (executed by the VMM on
    # PVM hosts, with the other vCPUs held), odd ones 20,000 with lock incq.
    wide = (vcpus + 1) // 2 * 50 + vcpus // 2 * 20_000
    assert final == f"smpprobe: {vcpus} cpus online, counter {vcpus * 1000} ok, wide {wide} ok"


def test_a_firecracker_config_with_two_vcpus_boots(tmp_path: Path) -> None:
    config = tmp_path / "vm.json"
    config.write_text(
        json.dumps(
            {
                "boot-source": {"kernel_image_path": str(guest_path("smpprobe")), "boot_args": ""},
                "machine-config": {"vcpu_count": 2, "mem_size_mib": 32, "smt": False},
            }
        )
    )
    result = dksm("run", "--config-file", str(config), "--dedup", "none", timeout=60)
    assert result.returncode == 0, result.stderr
    assert _smp_lines(result.stdout)[2] == "smpprobe: 2 cpus online, counter 2000 ok, wide 20050 ok"


def test_serial_input_reaches_the_guest_through_its_interrupt() -> None:
    """Lines written to dksm's stdin after the guest went to sleep (sti; hlt, only IRQ 4
    unmasked) wake it: the guest echoes them, and counts its wake-ups."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "dksm", "run", "--kernel", "echo", "--dedup", "none",
         "--timeout", "60"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdin is not None and proc.stdout is not None
    lines = [proc.stdout.readline() for _ in range(2)]
    assert lines == [b"echo: dksm guest kit\n", b"echo: ready\n"]
    for text in (b"first line\n", b"second\r", b"quit\n"):
        time.sleep(0.2)  # the guest is asleep again when each line arrives
        proc.stdin.write(text)
        proc.stdin.flush()
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    got = out.decode().splitlines()
    assert got[:3] == ['echo: got "first line"', 'echo: got "second"', 'echo: got "quit"']
    bye = re.fullmatch(r"echo: bye after (\d+) bytes, (\d+) wakeups", got[3])
    assert bye is not None, got
    assert int(bye.group(1)) == len(b"first line\nsecond\rquit\n")
    assert int(bye.group(2)) >= 3  # woken by an interrupt for each line at least
