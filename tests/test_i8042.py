"""The i8042 alone: Ctrl+Alt+Del queued for the guest, announced on IRQ 1 byte by
byte, read from the data port while the status port says the buffer is full."""

from __future__ import annotations

from dksm.devices.i8042 import CTRL_ALT_DEL, I8042, STATUS_EMPTY, STATUS_OUTPUT_FULL

STATUS = 4  # the command/status port, as an offset from the data port


def test_ctrl_alt_del_is_read_from_the_data_port_with_an_interrupt_per_byte() -> None:
    interrupts: list[int] = []
    resets: list[int] = []
    keyboard = I8042(lambda: resets.append(1), lambda: interrupts.append(1))
    assert keyboard.read(STATUS, 1) == STATUS_EMPTY
    keyboard.send_ctrl_alt_del()
    assert interrupts == [1]
    read = []
    while keyboard.read(STATUS, 1) & STATUS_OUTPUT_FULL:
        read.append(keyboard.read(0, 1))
    assert tuple(read) == CTRL_ALT_DEL
    assert len(interrupts) == len(CTRL_ALT_DEL)  # one more for each byte left to read
    assert keyboard.read(0, 1) == 0 and resets == []


def test_reset_command_still_ends_the_vm() -> None:
    resets: list[int] = []
    keyboard = I8042(lambda: resets.append(1))
    keyboard.write(STATUS, 1, 0xFE)
    assert resets == [1]
