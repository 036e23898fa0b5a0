"""The exit decoder reads kvm_run by reason: a kvm_run page is laid out here as KVM
lays it out, and decoded; the real KVM_RUN path is covered by the guests' tests."""

from __future__ import annotations

from dksm.kvm import abi, exits

PAGE = 4096


def _run_page() -> tuple[bytearray, abi.Run]:
    page = bytearray(PAGE)
    return page, abi.Run.from_buffer(page)


def test_io_out_data_is_read_at_its_offset_in_the_page() -> None:
    page, run = _run_page()
    run.exit_reason = abi.ExitReason.IO
    run.exit.io.direction = abi.KVM_EXIT_IO_OUT
    run.exit.io.size, run.exit.io.port, run.exit.io.count = 1, 0x3F8, 3
    run.exit.io.data_offset = 0x800
    page[0x800:0x803] = b"abc"
    decoded = exits.decode(run)
    assert isinstance(decoded, exits.IoExit)
    assert (decoded.port, decoded.size, decoded.count, decoded.is_write) == (0x3F8, 1, 3, True)
    assert bytes(decoded.data) == b"abc"


def test_io_in_data_written_lands_where_kvm_reads_it() -> None:
    page, run = _run_page()
    run.exit_reason = abi.ExitReason.IO
    run.exit.io.direction = abi.KVM_EXIT_IO_IN
    run.exit.io.size, run.exit.io.port, run.exit.io.count = 2, 0x71, 1
    run.exit.io.data_offset = 0x900
    decoded = exits.decode(run)
    assert isinstance(decoded, exits.IoExit) and not decoded.is_write
    decoded.data[:] = b"\x34\x12"
    assert page[0x900:0x902] == b"\x34\x12"


def test_io_data_through_the_mapping_is_the_same_bytes_and_writes_through() -> None:
    page, run = _run_page()
    run.exit_reason = abi.ExitReason.IO
    run.exit.io.direction = abi.KVM_EXIT_IO_IN
    run.exit.io.size, run.exit.io.port, run.exit.io.count = 4, 0xCFC, 2
    run.exit.io.data_offset = 0xA00
    decoded = exits.decode(run, memoryview(page))
    assert isinstance(decoded, exits.IoExit) and decoded.count == 2
    decoded.data[:] = bytes(range(8))
    assert page[0xA00:0xA08] == bytes(range(8))


def test_io_data_through_the_mapping_never_reaches_past_it() -> None:
    """A data offset near the end of the page gives only the bytes inside it."""
    page, run = _run_page()
    run.exit_reason = abi.ExitReason.IO
    run.exit.io.direction = abi.KVM_EXIT_IO_OUT
    run.exit.io.size, run.exit.io.port, run.exit.io.count = 4, 0x80, 4
    run.exit.io.data_offset = PAGE - 6
    decoded = exits.decode(run, memoryview(page))
    assert isinstance(decoded, exits.IoExit)
    assert len(decoded.data) == 6


def test_mmio_read_data_is_the_runs_own_bytes_cut_to_the_access() -> None:
    _, run = _run_page()
    run.exit_reason = abi.ExitReason.MMIO
    run.exit.mmio.phys_addr, run.exit.mmio.len, run.exit.mmio.is_write = 0xD000_0000, 4, 0
    decoded = exits.decode(run)
    assert isinstance(decoded, exits.MmioExit)
    assert (decoded.address, decoded.length, decoded.is_write) == (0xD000_0000, 4, False)
    assert len(decoded.data) == 4
    decoded.data[:] = b"\x01\x02\x03\x04"
    assert bytes(run.exit.mmio.data) == b"\x01\x02\x03\x04\x00\x00\x00\x00"


def _emulation_failure(run: abi.Run, flags: int, ndata: int, code: bytes) -> None:
    run.exit_reason = abi.ExitReason.INTERNAL_ERROR
    failure = run.exit.emulation_failure
    failure.suberror = abi.KVM_INTERNAL_ERROR_EMULATION
    failure.ndata, failure.flags, failure.insn_size = ndata, flags, len(code)
    failure.insn_bytes[: len(code)] = list(code)


def test_emulation_failure_gives_the_instruction_when_kvm_flags_it() -> None:
    _, run = _run_page()
    flag = abi.KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES
    _emulation_failure(run, flag, 3, bytes.fromhex("0f58c1"))
    assert exits.decode(run) == exits.EmulationFailure(bytes.fromhex("0f58c1"))


def test_emulation_failure_without_the_flag_has_no_instruction() -> None:
    """Without the flag, the words at insn_size are other diagnostics, not bytes."""
    _, run = _run_page()
    _emulation_failure(run, 0, 3, bytes.fromhex("0f58c1"))
    assert exits.decode(run) == exits.EmulationFailure(b"")
    flag = abi.KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES
    _emulation_failure(run, flag, 1, b"\x90")
    assert exits.decode(run) == exits.EmulationFailure(b"")


def test_emulation_failure_size_is_capped_at_the_longest_instruction() -> None:
    _, run = _run_page()
    _emulation_failure(
        run, abi.KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES, 3, b"\x66" * 15
    )
    run.exit.emulation_failure.insn_size = 200
    assert exits.decode(run) == exits.EmulationFailure(b"\x66" * 15)


def test_other_exits_carry_their_fields() -> None:
    _, run = _run_page()
    run.exit_reason = abi.ExitReason.INTERNAL_ERROR
    run.exit.internal.suberror = 3
    assert exits.decode(run) == exits.InternalError(3)
    run.exit_reason = abi.ExitReason.SYSTEM_EVENT
    run.exit.system_event.type = 2
    assert exits.decode(run) == exits.SystemEvent(2)
    run.exit_reason = abi.ExitReason.FAIL_ENTRY
    run.exit.fail_entry.hardware_entry_failure_reason = 0x80000021
    assert exits.decode(run) == exits.FailEntry(0x80000021)
    run.exit_reason = abi.ExitReason.HLT
    assert exits.decode(run) == exits.Halted()
    run.exit_reason = abi.ExitReason.SHUTDOWN
    assert exits.decode(run) == exits.Shutdown()
    run.exit_reason = abi.ExitReason.INTR
    assert exits.decode(run) == exits.Interrupted()
    run.exit_reason = 99
    assert exits.decode(run) == exits.OtherExit(99)
