"""The flags of ``dksm run``, declared once.

argparse is built from them (help, abbreviations, every error and its message), and
a command line made only of them, written out in full, is read here without it:
importing argparse and building the parser cost every VM start about 5 ms.  Anything
else (``--help``, an abbreviation, a value that does not convert, a flag given a
value, a word that is not a flag) is left to argparse, which reads or refuses it as
it always has; ``tests/test_run_options.py`` checks that both readings agree.
"""

from __future__ import annotations

from dksm.value import Value

TYPE_CHECKING = False  # typing's, without importing typing (see the dksm package)
if TYPE_CHECKING:
    from typing import Any

# How an option's value is read: a string, an int, a float, or no value (a switch).
TEXT = "text"
INT = "int"
FLOAT = "float"
SWITCH = "switch"
_CONVERT = {TEXT: str, INT: int, FLOAT: float}


class Option(Value):
    """One flag: its names (the first is the long one), kind, metavar and help."""

    __slots__ = ("help", "kind", "metavar", "names")

    def __init__(
        self, names: tuple[str, ...], help: str, kind: str = TEXT, metavar: str | None = None
    ) -> None:
        self.names = names
        self.help = help
        self.kind = kind
        self.metavar = metavar

    @property
    def dest(self) -> str:
        return self.names[0].removeprefix("--").replace("-", "_")

    def add_to(self, parser: Any) -> None:
        """Add this option to an argparse parser (or group)."""
        if self.kind == SWITCH:
            parser.add_argument(*self.names, action="store_true", help=self.help)
            return
        convert = _CONVERT[self.kind]
        kind = {} if convert is str else {"type": convert}
        parser.add_argument(*self.names, metavar=self.metavar, help=self.help, **kind)


# Exactly one of these says what to boot.
SOURCES = (
    Option(("--kernel",), "kernel image (ELF) or shipped guest name", metavar="IMAGE"),
    Option(("--config-file",), "a Firecracker config file", metavar="JSON"),
)
MACHINE = (
    Option(("--mem-mib",), "guest RAM in MiB (default 128)", INT),
    Option(("--vcpus",), "number of vCPUs, 1 to 32 (default 1)", INT),
    Option(("--boot-args",), "kernel command line"),
    Option(("--initrd",), "initial ramdisk to load (a file, or linux-initrd)"),
    Option(("--timeout",), "stop the VM after S seconds (exit status 5)", FLOAT, "S"),
    Option(("--serial-out",), "write the serial console to FILE", metavar="FILE"),
    Option(
        ("--no-tsc-leaf",),
        "do not announce the TSC frequency in CPUID 0x40000010 (guests calibrate it)",
        SWITCH,
    ),
    Option(
        ("--dedup",),
        "none, ksm, dksm (default) or dksm+ksm: how guest memory is deduplicated",
        metavar="MODE",
    ),
    Option(("--domain",), "page-pool sharing domain (default 'default')"),
    Option(("--pool-root",), "page-pool directory on tmpfs", metavar="DIR"),
    Option(("--info-file",), "write the VM's pid and RAM address here once built", metavar="FILE"),
    Option(
        ("--merge-after",),
        "once the console shows TEXT (a guest's 'boot complete' line), merge the kernel "
        "pages the guest rewrote while booting back into the page pool, once (one vCPU)",
        metavar="TEXT",
    ),
    Option(("--verbose", "-v"), "print registers on faults and exit statistics", SWITCH),
)
CONFINEMENT = (
    Option(
        ("--uid",),
        "user (id or name) the VMM runs as once its VM is built"
        " (as root: 65534, nobody; else the current user)",
        metavar="ID",
    ),
    Option(
        ("--gid",),
        "group (id or name) the VMM runs as once its VM is built"
        " (as root: 65534, nogroup; else the current group)",
        metavar="ID",
    ),
    Option(
        ("--no-confine",), "keep this process's privileges and install no seccomp filter", SWITCH
    ),
)
OPTIONS = (*SOURCES, *MACHINE, *CONFINEMENT)
_BY_NAME = {name: option for option in OPTIONS for name in option.names}


def read_plainly(words: list[str]) -> dict[str, object] | None:
    """Each option's value (None, or False for a switch, where not given) when
    ``words`` are only these options written out in full, ``--name value`` or
    ``--name=value``, with exactly one source; else None, for argparse to read."""
    values: dict[str, object] = {o.dest: False if o.kind == SWITCH else None for o in OPTIONS}
    given: set[str] = set()
    i = 0
    while i < len(words):
        name, equals, attached = words[i].partition("=")
        option = _BY_NAME.get(name)
        if option is None:
            return None
        if option.kind == SWITCH:
            if equals:
                return None
            values[option.dest] = True
            i += 1
            continue
        if equals:
            text = attached
            i += 1
        elif i + 1 < len(words):
            text = words[i + 1]
            i += 2
        else:
            return None
        if text.startswith("-"):  # argparse's rules for these are its own
            return None
        try:
            values[option.dest] = _CONVERT[option.kind](text)
        except ValueError:
            return None
        given.add(option.dest)
    if sum(source.dest in given for source in SOURCES) != 1:
        return None
    return values
