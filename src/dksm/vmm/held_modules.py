"""Modules read now and run later: code a confined VMM may need once it can no
longer open files, without paying to import it in every VMM that never does.

A confined process opens no file (:mod:`dksm.vmm.confinement`), so the import
system cannot read a module after confinement.  Importing everything such a
process might need beforehand costs every start the modules' execution (the
emulation fallback: about 12 ms on a PVM host, where most guests never need it).
Holding them costs only reading their compiled code: :func:`hold` finds each
module and loads its code object (from the bytecode cache, or compiled from
source) into memory, and a finder at the front of ``sys.meta_path`` hands that
code to the import system when the module is first imported, which then runs it
as it would have run the file's.

Only plain modules are held (not packages, not extension modules, which the
dynamic loader must open); their parent packages must be imported already, and
whatever else they import must be imported or held too.
"""

from __future__ import annotations

import importlib.machinery
import marshal
import struct
import sys
from collections.abc import Iterable
from types import CodeType, ModuleType

TYPE_CHECKING = False  # typing's, without importing typing (see the dksm package)
# A loader by protocol: importing importlib.abc would cost milliseconds of every
# start, so only the type checker sees the base class.
if TYPE_CHECKING:
    from importlib.abc import Loader as _LoaderBase
else:
    _LoaderBase = object


class _HeldLoader(_LoaderBase):
    """Runs a module's code that was read earlier: a code object, or the marshalled
    one from its bytecode cache (unmarshalled only if the module is imported, which
    most VMs never do: that is most of what reading it costs)."""

    def __init__(self, code: CodeType | bytes) -> None:
        self.code = code

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return None  # the import system's default module

    def exec_module(self, module: ModuleType) -> None:
        code = marshal.loads(self.code) if isinstance(self.code, bytes) else self.code
        exec(code, module.__dict__)


# A bytecode cache file (PEP 552): magic number, flags, then for the timestamp form
# (flags 0, what the import system writes) the source's mtime and size, 32 bits each.
_PYC_HEADER = struct.Struct("<4sIII")


def _cached_code(loader: importlib.machinery.SourceFileLoader, cached: str | None) -> bytes | None:
    """The marshalled code in the module's bytecode cache if that cache was made from
    its source as the source is now; None if there is none or it is stale, hash-based
    or unreadable (the loader then compiles, as an import would)."""
    import importlib.util  # for MAGIC_NUMBER: only a process that holds modules pays

    if cached is None:
        return None
    try:
        data = loader.get_data(cached)
        stats = loader.path_stats(loader.path)
    except OSError:
        return None
    if len(data) < _PYC_HEADER.size:
        return None
    magic, flags, mtime, size = _PYC_HEADER.unpack_from(data)
    fresh = (
        magic == importlib.util.MAGIC_NUMBER
        and flags == 0
        and mtime == int(stats["mtime"]) & 0xFFFF_FFFF
        and size == stats["size"] & 0xFFFF_FFFF
    )
    return data[_PYC_HEADER.size :] if fresh else None


class _HeldFinder:
    """Answers the import system for held modules only, before any other finder."""

    def __init__(self) -> None:
        self.specs: dict[str, importlib.machinery.ModuleSpec] = {}

    def find_spec(
        self, name: str, path: object = None, target: object = None
    ) -> importlib.machinery.ModuleSpec | None:
        return self.specs.pop(name, None)  # once imported, sys.modules answers


_FINDER = _HeldFinder()


def hold(names: Iterable[str]) -> None:
    """Read the code of each module in ``names`` that is not imported yet, so that
    importing it later reads no file."""
    for name in names:
        if name in sys.modules or name in _FINDER.specs:
            continue
        parent, _, _ = name.rpartition(".")
        search = sys.modules[parent].__path__ if parent else None
        found = importlib.machinery.PathFinder.find_spec(name, search)
        loader = None if found is None else found.loader
        if found is None or not isinstance(loader, importlib.machinery.SourceFileLoader):
            raise ImportError(f"{name} is not a Python source module that can be held", name=name)
        code = _cached_code(loader, found.cached) or loader.get_code(name)
        if code is None:
            raise ImportError(f"{name} has no code to hold", name=name)
        spec = importlib.machinery.ModuleSpec(name, _HeldLoader(code), origin=found.origin)
        spec.has_location = True  # __file__ as if imported from the file
        spec.cached = found.cached
        _FINDER.specs[name] = spec
    if _FINDER.specs and _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)


def held() -> list[str]:
    """The modules held and not imported yet."""
    return sorted(_FINDER.specs)
