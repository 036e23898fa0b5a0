"""The VMM confined: once its VM is built, a VMM process gives up every privilege
before the guest runs, so that a guest escaping into the VMM lands in a process
that can do almost nothing (after Firecracker's jailer and seccomp filters).

What a confined process keeps: the descriptors it opened while building (KVM, guest
RAM, the pool's files, its console sink and logs) and the system calls of
:mod:`dksm.vmm.seccomp_filter`.  What it gives up, in this order, each step while
it still holds what the step needs:

1. the capability bounding set, as far as the process may lower it (needs
   ``CAP_SETPCAP``, so before the user changes);
2. its supplementary groups, then its group and its user (real, effective and
   saved ids): a switch away from root clears the permitted, effective and
   ambient capabilities;
3. whatever capabilities are left (the inheritable set survives a user switch),
   the ambient set, and the dumpable flag (so that other processes of the same
   user can neither ptrace it nor read its memory);
4. ``no_new_privs``, then the result is checked, and only then the seccomp filter
   is loaded: it forbids every call the steps above make.

The default user and group, when dksm runs as root, are 65534: the kernel's
overflow ids, ``nobody``/``nogroup`` on Debian.  They exist on every machine
without creating an account (a host-wide change), own no files, and a confined
VMM cannot open files anyway.  Other processes running as ``nobody`` could still
send it signals (not ptrace it: it is not dumpable); hosts that run services as
``nobody`` should give each VMM a dedicated id (``--uid``/``--gid``), as
Firecracker's jailer is given one.  A non-root dksm keeps its own ids and still
gives up the rest.

A confined process can open no file after :meth:`Confinement.apply`, so code it
imports lazily must be read before: :meth:`Confinement.prepare` does it for the
emulation fallback, on hosts whose KVM needs it.  It reads the fallback's code
into memory (:mod:`dksm.vmm.held_modules`), to be run only if a guest needs it: a
few hundred microseconds instead of the ~12 ms of importing it, which most guests
never do.  A fleet supervisor imports it instead (``load_now``), once, so that
all its forked workers share it rather than each running it for itself.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from collections.abc import Iterable

from dksm.error import DksmError
from dksm.value import Value
from dksm.vmm import seccomp_filter

UNPRIVILEGED_ID = 65534  # the kernel's overflowuid/overflowgid: nobody and nogroup

# prctl(2) options, linux/prctl.h.
PR_SET_DUMPABLE = 4
PR_CAPBSET_READ = 23
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_GET_NO_NEW_PRIVS = 39
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
# capget(2)/capset(2), linux/capability.h: version 3 takes two 32-bit words per set.
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
# seccomp(2): linux/seccomp.h, and its number in arch/x86/entry/syscalls/syscall_64.tbl.
_NR_SECCOMP_X86_64 = 317
SECCOMP_SET_MODE_FILTER = 1
SECCOMP_FILTER_FLAG_TSYNC = 1  # every thread of the process, not only the caller
SOCK_FILTER_SIZE = 8  # struct sock_filter: u16 code, u8 jt, u8 jf, u32 k
# A host whose KVM runs guest kernel code through its instruction emulator (PVM,
# docs/BOOT.md) needs the VMM's emulation fallback for SSE instructions.
_PVM_MODULE = "/sys/module/kvm_pvm"


class ConfinementError(DksmError):
    """The VMM process could not give up its privileges; its guest is not run."""


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_char_p)]


class _CapData(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


# The low and high words of each set.  Made here, as every libc function below is
# looked up here: ctypes makes both on first use, in Python, and a fleet worker
# (forked after this import, then confined) would pay for the pages that touches.
_CapSets = _CapData * 2

_libc = ctypes.CDLL("libc.so.6", use_errno=True)  # find_library would spawn ldconfig
_libc.capget.restype = ctypes.c_int
_libc.capset.restype = ctypes.c_int
_libc.prctl.restype = ctypes.c_int
_libc.prctl.argtypes = [
    ctypes.c_int,
    ctypes.c_ulong,
    ctypes.c_ulong,
    ctypes.c_ulong,
    ctypes.c_ulong,
]
_libc.syscall.restype = ctypes.c_long
_libc.syscall.argtypes = [ctypes.c_long, ctypes.c_ulong, ctypes.c_ulong, ctypes.POINTER(_SockFprog)]


def _prctl(option: int, arg: int = 0, arg3: int = 0) -> int:
    result: int = _libc.prctl(option, arg, arg3, 0, 0)
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return result


def _capabilities() -> tuple[int, int, int]:
    """This process's (effective, permitted, inheritable) capability sets."""
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = _CapSets()
    if _libc.capget(ctypes.byref(header), data) != 0:
        err = ctypes.get_errno()
        raise ConfinementError(f"cannot read this process's capabilities: {os.strerror(err)}")

    def joined(name: str) -> int:
        return int(getattr(data[0], name)) | int(getattr(data[1], name)) << 32

    return joined("effective"), joined("permitted"), joined("inheritable")


class Credentials(Value):
    """The user and group a confined VMM runs as."""

    __slots__ = ("gid", "uid")

    def __init__(
        self,
        uid: int,
        gid: int,
    ) -> None:
        self.uid = uid
        self.gid = gid


def _parse_id(text: str, kind: str) -> int:
    """A numeric id, or a user or group name looked up on this host."""
    if text.isdecimal():
        number = int(text)
        if number >= 0xFFFF_FFFF:  # (uid_t)-1 means "unchanged" to the kernel
            raise ConfinementError(f"--{kind} {text} is not a valid {kind}")
        return number
    try:
        if kind == "uid":
            import pwd

            return pwd.getpwnam(text).pw_uid
        import grp

        return grp.getgrnam(text).gr_gid
    except (KeyError, ValueError):
        what = "user" if kind == "uid" else "group"
        raise ConfinementError(f"--{kind} {text!r}: no such {what} on this host") from None


def credentials(uid: str | None = None, gid: str | None = None) -> Credentials:
    """The ids to confine to: those given, else 65534 when running as root, else the
    process's own (a non-root process cannot switch to anyone else)."""
    privileged = os.geteuid() == 0
    target_uid = _parse_id(uid, "uid") if uid is not None else None
    target_gid = _parse_id(gid, "gid") if gid is not None else None
    if target_uid is None:
        target_uid = UNPRIVILEGED_ID if privileged else os.geteuid()
    if target_gid is None:
        target_gid = UNPRIVILEGED_ID if privileged else os.getegid()
    if target_uid == 0 or target_gid == 0:
        raise ConfinementError(
            "a confined VMM must not run as root (uid or gid 0): choose another --uid/--gid,"
            " or --no-confine to run unconfined"
        )
    if not privileged and (target_uid, target_gid) != (os.geteuid(), os.getegid()):
        raise ConfinementError(
            f"switching to uid {target_uid} and gid {target_gid} needs root; without"
            " --uid/--gid the VMM keeps this user's ids"
        )
    return Credentials(target_uid, target_gid)


class Confinement:
    """What one VMM process will give up once its VM is built.

    :meth:`prepare` may run long before (a fleet supervisor prepares once before
    forking its workers, which then share what it loaded), and so may
    :meth:`filter_program` (the supervisor compiles each worker's once it knows its
    pid); :meth:`apply` runs in the VMM process itself, after building and before
    any vCPU enters the guest.
    """

    def __init__(
        self,
        target: Credentials,
        *,
        extra_rules: Iterable[seccomp_filter.Rule] = (),
        seccomp: bool = True,
    ) -> None:
        """``extra_rules``: system calls this process's own threads need beyond a VMM's
        (the front door's API server); ``seccomp`` False gives up privileges only
        (Firecracker's ``--no-seccomp``)."""
        self.target = target
        self.extra_rules = tuple(extra_rules)
        self.seccomp = seccomp
        self._dropped_groups = False
        # What prepare() loaded: None, "held" or "imported".  Carried into forked
        # children with the object, so a fleet worker does not search again for the
        # modules its supervisor looked for (a failed import is not remembered, and
        # each search touches, and so copies, hundreds of the supervisor's pages).
        self._prepared: str | None = None

    def prepare(self, *, load_now: bool = False) -> None:
        """Load now what the confined process may need later and could no longer read:
        libseccomp's binding, and on hosts that use it the emulation fallback, its
        code held in memory (``load_now``: imported, for processes that fork).
        Done once per object (again only to import what was merely held)."""
        if self._prepared == "imported" or (self._prepared == "held" and not load_now):
            return
        try:
            seccomp_filter.binding()
        except (ImportError, RuntimeError, OSError) as exc:  # RuntimeError: no libseccomp
            raise ConfinementError(
                f"cannot load libseccomp ({exc}): install it (Debian: libseccomp2),"
                " or run with --no-confine"
            ) from exc

        if os.path.exists(_PVM_MODULE):
            _load_emulation_fallback(load_now)
        self._prepared = "imported" if load_now else "held"

    def filter_program(self, pid: int, devices: Iterable[str] = ()) -> bytes:
        """The seccomp program of VMM process ``pid``, compiled in this process;
        ``devices``: the kinds of virtio device its VMs have (their threads' calls)."""
        self.prepare()
        extra = (*self.extra_rules, *seccomp_filter.device_rules(devices))
        return seccomp_filter.compile_program(seccomp_filter.rules_for(pid, extra))

    def apply(self, program: bytes | None = None, devices: Iterable[str] = ()) -> None:
        """Confine this process (irreversibly) with ``program``, by default compiled
        here for a VM with ``devices`` (kinds of virtio device); raise
        :class:`ConfinementError` if any step fails, in which case the caller must not
        run the guest."""
        if not self.seccomp:
            program = b""
        elif program is None:
            program = self.filter_program(os.getpid(), devices)
        else:
            self.prepare()
        _drop_bounding_set()
        self._switch_ids()
        _drop_capabilities()
        try:
            _prctl(PR_SET_DUMPABLE, 0)
            _prctl(PR_SET_NO_NEW_PRIVS, 1)
        except OSError as exc:
            raise ConfinementError(f"cannot restrict this process: {exc.strerror}") from exc
        self._check()
        if self.seccomp:
            _load_filter(program)

    def _switch_ids(self) -> None:
        uid, gid = self.target.uid, self.target.gid
        try:
            if os.geteuid() == 0:
                os.setgroups([])
                self._dropped_groups = True
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
        except OSError as exc:
            raise ConfinementError(
                f"cannot switch to uid {uid} and gid {gid}: {exc.strerror}"
            ) from exc

    def _check(self) -> None:
        """Trust nothing above: read back what the kernel now says."""
        uid, gid = self.target.uid, self.target.gid
        problems = []
        if os.getresuid() != (uid, uid, uid) or os.getresgid() != (gid, gid, gid):
            problems.append(f"ids are {os.getresuid()}/{os.getresgid()}")
        if self._dropped_groups and os.getgroups():
            problems.append(f"supplementary groups {os.getgroups()} remain")
        if any(_capabilities()):
            problems.append("capabilities remain")
        if _prctl(PR_GET_NO_NEW_PRIVS) != 1:
            problems.append("no_new_privs is not set")
        if problems:
            raise ConfinementError(f"confinement incomplete: {'; '.join(problems)}")


def _load_filter(program: bytes) -> None:
    """Install a compiled seccomp program on every thread of this process (the kernel
    takes it from an unprivileged process only with no_new_privs set)."""
    if not program or len(program) % SOCK_FILTER_SIZE:
        raise ConfinementError(f"a seccomp program of {len(program)} bytes is not one")
    fprog = _SockFprog(len(program) // SOCK_FILTER_SIZE, program)
    result = _libc.syscall(
        _NR_SECCOMP_X86_64,
        SECCOMP_SET_MODE_FILTER,
        SECCOMP_FILTER_FLAG_TSYNC,
        ctypes.byref(fprog),
    )
    if result != 0:
        err = ctypes.get_errno()
        reason = os.strerror(err) if result < 0 else f"thread {result} could not take it"
        raise ConfinementError(f"cannot load the seccomp filter: {reason}")


# The emulation fallback, in the order it imports itself; and what it needs of the
# standard library (imported by every VMM anyway, so importing them costs nothing).
_EMULATION_FALLBACK = (
    "dksm.kvm.exits",
    "dksm.x86emu.opcodes",
    "dksm.x86emu.decode",
    "dksm.x86emu.cpu",
    "dksm.x86emu.registers",
    "dksm.x86emu.operands",
    "dksm.x86emu.sse",
    "dksm.x86emu.system",
    "dksm.x86emu.xsave",
    "dksm.x86emu.execute",
    "dksm.x86emu.paging",
    "dksm.x86emu.disassemble",
    "dksm.vmm.emulation",
    "dksm.vmm.emulation_unicorn",
)
_EMULATION_NEEDS = ("ctypes", "importlib", "struct", "time")


def _load_emulation_fallback(load_now: bool) -> None:
    """The VMM's emulation fallback and what its messages use (the disassembler, and
    capstone if installed), which the VMM otherwise imports at the first instruction
    the host's KVM cannot emulate.  The Unicorn long tail stays out of reach: it loads
    a library and makes executable memory when first used, which a confined process
    may not; its instructions then end the VM with a message naming them."""
    import importlib

    for name in _EMULATION_NEEDS:
        importlib.import_module(name)
    # Held modules need their package imported; the emulator's is empty but for its
    # docstring, and a package cannot be held.
    importlib.import_module("dksm.x86emu")
    if load_now:
        for name in _EMULATION_FALLBACK:
            importlib.import_module(name)
    else:
        from dksm.vmm import held_modules

        held_modules.hold(_EMULATION_FALLBACK)
    with contextlib.suppress(ImportError):  # an extension module: it cannot be held
        importlib.import_module("capstone")


def _drop_bounding_set() -> None:
    """Remove every capability from the bounding set, while the process may (it needs
    CAP_SETPCAP: a non-root process keeps its bounding set, which no_new_privs makes
    useless, as it forbids gaining capabilities through execve)."""
    cap = 0
    while True:
        try:
            present = _prctl(PR_CAPBSET_READ, cap)
        except OSError:
            return  # past the last capability this kernel knows
        if present:
            try:
                _prctl(PR_CAPBSET_DROP, cap)
            except OSError:
                return
        cap += 1


def _drop_capabilities() -> None:
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    empty = _CapSets()
    if _libc.capset(ctypes.byref(header), empty) != 0:
        err = ctypes.get_errno()
        raise ConfinementError(f"cannot drop capabilities: {os.strerror(err)}")
    try:
        _prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
    except OSError as exc:
        raise ConfinementError(f"cannot clear ambient capabilities: {exc.strerror}") from exc
