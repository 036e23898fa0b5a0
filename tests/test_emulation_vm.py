"""The emulation fallback inside real VMs: vecprobe's results equal the same
computation done here in Python, and an instruction dksm does not emulate ends the
VM with RIP, bytes, disassembly and mode."""

from __future__ import annotations

import io
import re
from collections.abc import Callable
from pathlib import Path

import pytest

from dksm.guests import guest_path
from dksm.vmm.builder import build
from dksm.vmm.config import VmConfig
from dksm.vmm.machine import ExitCause, MicroVm

from conftest import dksm, requires_kvm

pytestmark = requires_kvm

AsmGuest = Callable[[str], Path]
M64 = (1 << 64) - 1


def _splitmix64(state: int) -> tuple[int, int]:
    state = (state + 0x9E3779B97F4A7C15) & M64
    z = state
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return state, z ^ (z >> 31)


def _fnv1a64(data: bytes) -> int:
    h = 0xCBF29CE484222325
    for byte in data:
        h = ((h ^ byte) * 0x100000001B3) & M64
    return h


def vecprobe_expected() -> dict[str, str]:
    """What vecprobe prints, computed as its header comment specifies."""
    state = 0x76656370726F6265

    def draws(count: int) -> list[int]:
        nonlocal state
        out = []
        for _ in range(count):
            state, value = _splitmix64(state)
            out.append(value)
        return out

    src = b"".join(v.to_bytes(8, "little") for v in draws(1024 // 8))
    words_a = [v & 0xFFFF for v in draws(256)]
    words_b = [v & 0xFFFF for v in draws(256)]
    dwords = [v & 0xFFFFFFFF for v in draws(256)]
    qwords = draws(128)
    shorts = [(v & 0xFFFF) - 0x10000 if v & 0x8000 else v & 0xFFFF for v in draws(256)]

    acc = 0
    for v in dwords:
        v ^= v >> 15
        v = (v * 0x2C1B3C6D) & 0xFFFFFFFF
        v ^= v >> 12
        acc = (acc + v) & 0xFFFFFFFF
    products = b"".join(
        ((a * b + 7) & 0xFFFF).to_bytes(2, "little") for a, b in zip(words_a, words_b, strict=True)
    )
    sums = b"".join(((qwords[i] + qwords[i + 64]) & M64).to_bytes(8, "little") for i in range(64))
    clamped = bytes(min(255, max(0, v)) for v in shorts)
    return {
        "mxcsr": "0x00007f80",
        "fxsave": "mxcsr=0x00007f80 xmm5=8899aabbccddeeff0011223344556677",
        "memset": f"0x{_fnv1a64(bytes([0xA5]) * 1024):016x}",
        "memcpy": f"0x{_fnv1a64(src):016x}",
        "hash32": f"0x{acc:08x}",
        "mul16": f"0x{_fnv1a64(products):016x}",
        "add64": f"0x{_fnv1a64(sums):016x}",
        "count": str(src.count(0x5A)),
        "clamp": f"0x{_fnv1a64(clamped):016x}",
    }


def _report(stdout: str) -> dict[str, str]:
    out = {}
    for line in stdout.splitlines():
        match = re.match(r"vecprobe: (\w+)[= ](.*)$", line)
        if match:
            out[match.group(1)] = match.group(2)
    return out


def test_vecprobe_prints_what_python_computes() -> None:
    result = dksm("run", "--kernel", "vecprobe", "--mem-mib", "16", timeout=60)
    assert result.returncode == 0, result.stderr
    report = _report(result.stdout)
    for key, value in vecprobe_expected().items():
        assert report.get(key) == value, f"{key}: {report.get(key)} != {value}\n{result.stdout}"
    assert report["xcr0"] == "0x0000000000000003"
    xrstor = "xmm6=8899aabbccddeeff0011223344556677 xmm7=fedcba98765432100123456789abcdef"
    assert report["xrstor"].startswith(xrstor)
    xstate_bv = int(report["xrstor"].split("xstate_bv=")[1], 16)
    assert xstate_bv & 0x2 and not xstate_bv & ~0x3  # SSE in use; only x87|SSE asked for
    assert "vecprobe: done" in result.stdout


def _boot(image: Path) -> MicroVm:
    config = VmConfig(
        kernel_path=str(image), boot_args="", mem_mib=16, vcpu_count=1, initrd_path=None
    )
    return build(config, serial_sink=io.BytesIO())


def test_vecprobe_counts_the_instructions_it_needed() -> None:
    with _boot(guest_path("vecprobe")) as vm:
        outcome = vm.run(timeout=60)
        fallback = vm.threads[0].emulation
    assert outcome.cause == ExitCause.GUEST_SHUTDOWN, outcome.describe()
    if fallback is None:
        pytest.skip("this host's KVM runs SSE itself (hardware virtualization)")
    stats = fallback.stats()
    counts = stats.by_mnemonic
    # What the PVM emulator refuses (it does run fxsave and some SSE moves itself).
    for name in ("ldmxcsr", "stmxcsr", "xgetbv", "xsaveopt", "xrstor", "pmullw", "pmuludq"):
        assert counts.get(name), f"{name} not emulated: {counts}"
    for name in ("pshufd", "paddq", "packuswb", "pcmpeqb", "punpcklbw", "psrldq"):
        assert counts.get(name), f"{name} not emulated: {counts}"
    assert stats.instructions == sum(counts.values())
    assert stats.exits == outcome.exits["INTERNAL_ERROR"]
    assert stats.exits < stats.instructions  # runs of SSE instructions share an exit
    assert stats.instructions < 20_000  # the probe stays cheap to emulate


def test_unemulated_instruction_ends_the_vm_with_a_clear_reason(asm_guest: AsmGuest) -> None:
    with _boot(asm_guest("sse_insn")) as vm:
        outcome = vm.run(timeout=30)
    if outcome.cause == ExitCause.GUEST_SHUTDOWN:
        pytest.skip("this host's KVM runs SSE itself (hardware virtualization)")
    assert outcome.cause == ExitCause.EMULATION_FAILURE
    detail = outcome.detail
    assert re.search(r"at rip 0x1000[0-9a-f]{2} \(64-bit mode, CPL 0\)", detail), detail
    assert "instruction bytes: 0f 58 c1 (" in detail
    assert "addps" in detail or "no disassembler available" in detail
    assert "floating-point SSE arithmetic is not emulated" in detail
    assert "rip=" in outcome.registers


def _xmm(vm: MicroVm, index: int) -> bytes:
    area = bytearray(4096)
    vm.vcpu.get_xsave(area)
    return bytes(area[160 + 16 * index : 176 + 16 * index])


def test_long_tail_runs_on_unicorn_when_installed(asm_guest: AsmGuest) -> None:
    from dksm.vmm.emulation_unicorn import available

    data = bytes.fromhex("00112233445566778899aabbccddeeff")
    control = bytes([15, 14, 13, 12, 0x80, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0x81])
    third = bytes(range(0xA0, 0xB0))
    with _boot(asm_guest("ssse3_insn")) as vm:
        outcome = vm.run(timeout=30)
        if outcome.cause == ExitCause.GUEST_SHUTDOWN and not outcome.exits.get("INTERNAL_ERROR"):
            pytest.skip("this host's KVM runs SSSE3 itself (hardware virtualization)")
        if not available():
            assert outcome.cause == ExitCause.EMULATION_FAILURE
            assert "pip install 'dksm[emulation]'" in outcome.detail
            return
        assert outcome.cause == ExitCause.GUEST_SHUTDOWN, outcome.describe()
        shuffled = bytes(0 if c & 0x80 else data[c & 15] for c in control)
        assert _xmm(vm, 0) == shuffled
        assert _xmm(vm, 2) == (control + third)[5:21]  # palignr: (xmm2:xmm1) >> 5 bytes
        assert vm.threads[0].emulation is not None
        assert vm.threads[0].emulation.counts.get("pshufb") == 1
        assert vm.threads[0].emulation.counts.get("palignr") == 1


def test_long_tail_without_unicorn_says_what_would_run_it(
    asm_guest: AsmGuest, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dksm.vmm import emulation_unicorn

    monkeypatch.setattr(emulation_unicorn, "available", lambda: False)
    with _boot(asm_guest("ssse3_insn")) as vm:
        outcome = vm.run(timeout=30)
    if outcome.cause == ExitCause.GUEST_SHUTDOWN:
        pytest.skip("this host's KVM runs SSSE3 itself (hardware virtualization)")
    assert outcome.cause == ExitCause.EMULATION_FAILURE
    assert "instruction bytes: 66 0f 38 00 c1" in outcome.detail
    assert "SSSE3/SSE4 instructions are not emulated" in outcome.detail
    assert "pip install 'dksm[emulation]'" in outcome.detail


def test_bench_emulation_measures_a_round_trip() -> None:
    from dksm.bench.emulation import measure_emulation

    result = measure_emulation(iterations=300, runs=1)
    cases_json = result.to_json()["cases"]
    assert isinstance(cases_json, dict)
    assert set(cases_json) == {"plain1", "plain2", "sse", "sse-read", "batch8"}
    assert "per emulated insn" in result.table()
    if not result.fallback_used:
        pytest.skip("this host's KVM runs SSE itself (hardware virtualization)")
    cases = result.cases
    assert cases["sse"].emulated_instructions == 300
    assert cases["sse"].emulation_exits == 300
    assert cases["batch8"].emulated_instructions == 8 * 300
    assert cases["batch8"].emulation_exits == 300  # one exit per run of eight
    assert 0 < result.per_instruction_us("sse") < 1000


def test_int3_in_kernel_mode_reaches_the_guest_breakpoint_handler(asm_guest: AsmGuest) -> None:
    """Linux tests its #BP handler at boot with an int3, which the PVM host's
    emulator refuses in kernel mode: dksm delivers #BP through the guest's IDT,
    with the return address after the int3, as the CPU would."""
    sink = io.BytesIO()
    config = VmConfig(kernel_path=str(asm_guest("breakpoint")), boot_args="", mem_mib=16)
    with build(config, serial_sink=sink) as vm:
        outcome = vm.run(timeout=30)
    assert outcome.cause == ExitCause.GUEST_SHUTDOWN, outcome.describe()
    assert sink.getvalue() == b"bp1ok"  # handler ran, return address int3 + 1, resumed


def test_int3_is_delivered_in_a_confined_vmm(asm_guest: AsmGuest) -> None:
    """Delivering #BP takes KVM_GET/SET_VCPU_EVENTS, which the seccomp filter of a
    confined VMM must allow (Linux runs its int3 long after confinement)."""
    result = dksm("run", "--kernel", str(asm_guest("breakpoint")), "--mem-mib", "16")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "bp1ok"
