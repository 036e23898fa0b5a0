"""Disassembly of one x86-64 instruction, for error messages only.

When the VMM stops a guest on an instruction it cannot execute, the message names
the instruction in assembly.  Capstone (BSD licensed, the optional ``emulation``
extra) is used when installed; otherwise binutils' ``objdump`` when on PATH;
otherwise nothing, and the message shows bytes alone.  Neither is imported or run
unless a message needs it.
"""

from __future__ import annotations

import importlib
import os

from dksm.value import Value

TYPE_CHECKING = False  # typing's, without importing typing (see the dksm package)
if TYPE_CHECKING:
    from typing import Any

_OBJDUMP_LINE = r"^\s*0:\s+((?:[0-9a-f]{2} )+)\s*(.*)$"


class Disassembly(Value):
    __slots__ = ("length", "text", "tool")

    def __init__(
        self,
        # "pshufb %xmm1, %xmm0"
        text: str,
        length: int,
        tool: str,
    ) -> None:
        self.text = text
        self.length = length
        self.tool = tool


def disassemble(code: bytes, address: int = 0) -> Disassembly | None:
    """The first instruction in ``code`` (AT&T syntax), or None if no tool knows it."""
    return _with_capstone(code, address) or _with_objdump(code)


def _with_capstone(code: bytes, address: int) -> Disassembly | None:
    try:
        capstone: Any = importlib.import_module("capstone")  # optional, untyped
    except ImportError:
        return None
    engine = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    engine.syntax = capstone.CS_OPT_SYNTAX_ATT
    for insn in engine.disasm(code, address, 1):
        text = f"{insn.mnemonic} {insn.op_str}".strip()
        return Disassembly(text, int(insn.size), "capstone")
    return None


def _with_objdump(code: bytes) -> Disassembly | None:
    try:
        # Only here: they cost milliseconds, and a confined VMM can import them no
        # more (nor run objdump).
        import re
        import shutil
        import subprocess
        import tempfile
    except ImportError:
        return None
    objdump = shutil.which("objdump")
    if objdump is None:
        return None
    fd, path = tempfile.mkstemp(prefix="dksm-insn-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(code)
        result = subprocess.run(
            [objdump, "-D", "-b", "binary", "-m", "i386:x86-64", path],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    finally:
        os.unlink(path)
    for line in result.stdout.splitlines():
        match = re.match(_OBJDUMP_LINE, line)
        if match:
            text = " ".join(match.group(2).split())
            if not text or text.startswith("(bad)"):
                return None
            return Disassembly(text, len(match.group(1).split()), "objdump")
    return None
