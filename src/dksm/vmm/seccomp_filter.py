"""The seccomp filter of a confined VMM process: every system call it may still make
once its VM is built, each with the reason it is needed, after Firecracker's
per-architecture filter files.

What is not listed kills the whole process (``SECCOMP_RET_KILL_PROCESS``, the
process ends by SIGSYS): a VMM that tries anything else is a compromised or broken
VMM.  One group is refused with an error instead (``EACCES``): the calls that find
and open files by path.  None can open anything, but Python itself looks for files
when it prints a traceback (the source lines) or imports a module, and a dksm bug
met after confinement should end with its own message and status 6, not a SIGSYS.
``clone3`` answers ``ENOSYS`` so that glibc falls back to ``clone``, whose flags,
unlike ``clone3``'s, are in a register the filter can read (only threads may be
created, never processes).

Arguments are checked where one system call serves both what the VMM needs and
what an intruder would want: ``ioctl`` only with the KVM requests a running VM
makes, ``clone`` only for threads, ``mmap``/``mprotect`` never executable,
``tgkill`` only to threads of this process, ``fallocate`` only to punch holes,
``fcntl`` only to read or set descriptor flags and record locks.

The virtio devices' worker threads add their own calls (:data:`DEVICE_RULES`), only
for a VM that has that kind of device.  One thing they do not get: ``unlink``.  The
vsock device's listening socket is removed at the end by a process that stayed
privileged (:mod:`dksm.vmm.socket_cleanup`), not by the confined VMM, which is another
user by then anyway.

The table is for x86-64, the only architecture dksm runs on; other system-call
ABIs (i386, x32) kill the process.  Whoever adds a thread or a device that makes
a system call not listed here adds its line (the confinement tests show it at
once: the process dies of SIGSYS).
"""

from __future__ import annotations

import enum
import errno
import fcntl
import mmap
import os
from collections.abc import Iterable

from dksm.kvm import abi
from dksm.value import Value

TYPE_CHECKING = False  # typing's, without importing typing (see the dksm package)
if TYPE_CHECKING:
    from typing import Any

# Flag values the rules compare, from the kernel's uapi headers.
CLONE_THREAD = 0x00010000  # linux/sched.h
AT_EMPTY_PATH = 0x1000  # linux/fcntl.h: "stat the descriptor itself", i.e. fstat
FALLOC_FL_KEEP_SIZE = 0x01  # linux/falloc.h
FALLOC_FL_PUNCH_HOLE = 0x02
TCGETS = 0x5401  # asm-generic/ioctls.h: isatty()
TCSETSW = 0x5403  # tcsetattr(TCSADRAIN): the console's terminal restored at the end
FIONBIO = 0x5421  # asm-generic/ioctls.h: set a descriptor (non-)blocking
AF_UNIX = 1  # linux/socket.h
_LOW_32_BITS = 0xFFFF_FFFF  # ioctl requests and fcntl commands are C ints


class Verdict(enum.Enum):
    ALLOW = "allow"
    REFUSE = "refuse with EACCES"
    UNSUPPORTED = "answer ENOSYS"


class ArgIs(Value):
    """Argument ``index`` (0-based) satisfies ``(value & mask) == expected``."""

    __slots__ = ("expected", "index", "mask")

    def __init__(
        self,
        index: int,
        expected: int,
        mask: int = 0xFFFF_FFFF_FFFF_FFFF,
    ) -> None:
        self.index = index
        self.expected = expected
        self.mask = mask


class Rule(Value):
    """One line of the filter: ``syscall`` gets ``verdict`` when every condition in
    ``when`` holds.  Several rules for one system call are alternatives."""

    __slots__ = ("syscall", "verdict", "when", "who")

    def __init__(
        self,
        syscall: str,
        # who needs it, in a few words
        who: str,
        when: tuple[ArgIs, ...] = (),
        verdict: Verdict = Verdict.ALLOW,
    ) -> None:
        self.syscall = syscall
        self.who = who
        self.when = when
        self.verdict = verdict


def _allow(syscall: str, who: str, *when: ArgIs) -> Rule:
    return Rule(syscall, who, when)


def _refuse(syscall: str, *when: ArgIs) -> Rule:
    return Rule(
        syscall, "Python looking for files (imports, traceback lines)", when, Verdict.REFUSE
    )


def _ioctl(request: int, who: str) -> Rule:
    return Rule("ioctl", who, (ArgIs(1, request, _LOW_32_BITS),))


def _fcntl(command: int, who: str) -> Rule:
    return Rule("fcntl", who, (ArgIs(1, command, _LOW_32_BITS),))


_NOT_EXECUTABLE = ArgIs(2, 0, mmap.PROT_EXEC)
_OF_A_DESCRIPTOR = ArgIs(3, AT_EMPTY_PATH, AT_EMPTY_PATH)
_OF_A_PATH = ArgIs(3, 0, AT_EMPTY_PATH)

RULES: tuple[Rule, ...] = (
    # The vCPU loop and KVM: the requests a running VM makes, nothing that builds one.
    _ioctl(abi.KVM_RUN, "the vCPU loop"),
    _ioctl(abi.KVM_GET_REGS, "exit reports, emulation fallback"),
    _ioctl(abi.KVM_SET_REGS, "emulation fallback"),
    _ioctl(abi.KVM_GET_SREGS, "exit reports, emulation fallback"),
    _ioctl(abi.KVM_SET_SREGS, "emulation fallback"),
    _ioctl(abi.KVM_GET_FPU, "emulation fallback"),
    _ioctl(abi.KVM_SET_FPU, "emulation fallback"),
    _ioctl(abi.KVM_GET_XSAVE, "emulation fallback (vector registers)"),
    _ioctl(abi.KVM_SET_XSAVE, "emulation fallback (vector registers)"),
    _ioctl(abi.KVM_GET_XCRS, "emulation fallback (xgetbv)"),
    _ioctl(abi.KVM_TRANSLATE, "emulation fallback (guest-virtual addresses)"),
    _ioctl(abi.KVM_GET_VCPU_EVENTS, "emulation fallback (int3 delivered as #BP)"),
    _ioctl(abi.KVM_SET_VCPU_EVENTS, "emulation fallback (int3 delivered as #BP)"),
    _ioctl(abi.KVM_CHECK_EXTENSION, "emulation fallback (KVM_CAP_SYNC_REGS)"),
    _ioctl(abi.KVM_GET_SUPPORTED_CPUID, "emulation fallback (XSAVE layout)"),
    _ioctl(abi.KVM_IRQ_LINE, "devices raising interrupts (serial)"),
    _ioctl(TCGETS, "isatty(): Python asks when it wraps a descriptor in a file"),
    _ioctl(TCSETSW, "console input: the terminal's line mode put back at the end"),
    # Devices and output, through descriptors opened before confinement.
    _allow("read", "console input (stdin reader thread)"),
    _allow("poll", "console input (stdin reader thread)"),
    _allow("ppoll", "console input (stdin reader thread)"),
    _allow("select", "console input and output wait for their descriptors in slices"),
    _allow("pselect6", "console input and output (select as some C libraries make it)"),
    _allow("write", "serial console sink, stderr, fleet event pipe and outcome file"),
    _allow("close", "teardown: vCPU, VM, KVM, pool and log descriptors"),
    # Releasing the pool lease at teardown: an LMDB commit through open descriptors.
    _allow("lseek", "pool index commit (LMDB positions its writes)"),
    _allow("writev", "pool index commit (LMDB writes dirty pages)"),
    _allow("pwrite64", "pool index commit (LMDB meta page)"),
    _allow("pread64", "post-boot merge: the pagemap opened before confinement"),
    _allow("pwritev2", "post-boot merge: new pages into the pool's pages file (os.pwritev)"),
    _allow("preadv2", "post-boot merge: a pool page's bytes compared before sharing (os.preadv)"),
    _allow(
        "fallocate",
        "pool lease release: punch freed slots out of the pages file",
        ArgIs(1, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, _LOW_32_BITS),
    ),
    _fcntl(fcntl.F_GETFD, "descriptor flags"),
    _fcntl(fcntl.F_SETFD, "descriptor flags"),
    _fcntl(fcntl.F_GETFL, "file status flags"),
    _fcntl(fcntl.F_SETFL, "file status flags"),
    _fcntl(fcntl.F_GETLK, "pool index: LMDB checks its readers' record locks"),
    _fcntl(fcntl.F_SETLK, "pool index: LMDB record locks"),
    _fcntl(fcntl.F_SETLKW, "pool index: LMDB record locks"),
    _allow("fstat", "os.fstat of an open descriptor"),
    _allow("newfstatat", "os.fstat of an open descriptor (glibc's fstat)", _OF_A_DESCRIPTOR),
    # Threads: the vCPU thread(s) and the stdin reader start after confinement.
    _allow(
        "clone",
        "threading.Thread: threads only, never a process",
        ArgIs(0, CLONE_THREAD, CLONE_THREAD),
    ),
    Rule("clone3", "glibc tries it first; ENOSYS sends it to clone", verdict=Verdict.UNSUPPORTED),
    _allow("set_robust_list", "glibc, for each new thread"),
    _allow("rseq", "glibc, for each new thread"),
    _allow("futex", "locks, the GIL, thread joins"),
    _allow("exit", "a thread ending"),
    _allow("exit_group", "the process ending"),
    _allow("getpid", "pool lease ownership checks"),
    _allow("getppid", "the front door's VMM: is the process that started it alive"),
    _allow("gettid", "glibc, Python's thread ids"),
    _allow(
        "sched_getaffinity",
        "glibc's malloc counting CPUs when many vCPU threads need arenas (its first"
        " choice, a file in /sys, cannot be opened once confined)",
    ),
    # Signals: the vCPU kick (SIGUSR1 to the vCPU thread, see tgkill_rule), SIGTERM, SIGINT.
    _allow("rt_sigaction", "the kick handler; handlers restored at exit"),
    _allow("rt_sigprocmask", "glibc blocks signals around thread start and exit"),
    _allow("rt_sigreturn", "return from a signal handler"),
    _allow("restart_syscall", "a wait interrupted by a signal resumes"),
    # Memory: Python's allocator, thread stacks, guest RAM unmapped at teardown.
    _allow("mmap", "allocator and thread stacks (never executable)", _NOT_EXECUTABLE),
    _allow("mprotect", "thread stack guard pages (never executable)", _NOT_EXECUTABLE),
    _allow("munmap", "allocator, thread stacks, guest RAM and pool mappings at teardown"),
    _allow("mremap", "allocator (growing large blocks)"),
    _allow("madvise", "allocator and thread exit give memory back"),
    _allow("brk", "allocator"),
    # Time: the vDSO answers most clock reads without a system call; per-thread CPU
    # clocks, and hosts without a stable TSC, make the real one.
    _allow("clock_gettime", "time.monotonic, time.thread_time (pool counters)"),
    _allow("gettimeofday", "time.time"),
    _allow("clock_nanosleep", "time.sleep"),
    _allow("nanosleep", "time.sleep in C libraries"),
    # Finding files by path: refused, not fatal (see the module's documentation).
    _refuse("open"),
    _refuse("openat"),
    _refuse("openat2"),
    _refuse("creat"),
    _refuse("stat"),
    _refuse("lstat"),
    _refuse("newfstatat", _OF_A_PATH),
    _refuse("statx"),
    _refuse("access"),
    _refuse("faccessat"),
    _refuse("faccessat2"),
    _refuse("readlink"),
    _refuse("readlinkat"),
    _refuse("unlink"),
    _refuse("unlinkat"),
)


def tgkill_rule(pid: int) -> Rule:
    """tgkill to threads of process ``pid`` only: how the VMM kicks its vCPU thread
    out of ``KVM_RUN`` (``signal.pthread_kill``)."""
    return Rule("tgkill", "the vCPU kick (pthread_kill) within this process", (ArgIs(0, pid),))


# What the Firecracker front door's API thread adds, serving its socket after
# InstanceStart: connections on the listening socket it opened before, over epoll.
API_SERVER_RULES: tuple[Rule, ...] = (
    _allow("epoll_wait", "API server: waiting for connections and requests"),
    _allow("epoll_pwait", "API server: epoll_wait as some C libraries make it"),
    _allow("epoll_ctl", "API server: watching connections"),
    _allow("accept4", "API server: new client connections"),
    _allow("getsockname", "API server: the socket's own address"),
    _allow("recvfrom", "API server: requests"),
    _allow("sendto", "API server: answers"),
    _allow("shutdown", "API server: closing a connection"),
    _ioctl(FIONBIO, "API server: new connections made non-blocking"),
)


# What the virtio devices' worker threads add: they start with the vCPUs, after
# confinement, and serve the descriptors opened at build (queue eventfds, drive
# files, taps, the vsock listener).  Each kind of device adds only its own calls, and
# only a VM that has such a device gets them.  Eventfds and taps are read and written
# with read/write, allowed above.
_DEVICE_WORKER_RULES: tuple[Rule, ...] = (
    _allow("epoll_wait", "virtio device threads: waiting for queue notifications"),
    _allow("epoll_pwait", "virtio device threads: epoll_wait as some C libraries make it"),
    _allow("epoll_ctl", "virtio-net (tap back-pressure), vsock (connections come and go)"),
)
DEVICE_RULES: dict[str, tuple[Rule, ...]] = {
    "block": (
        _allow("preadv", "virtio-block: guest reads, straight into guest RAM"),
        _allow("pwritev", "virtio-block: guest writes, straight from guest RAM"),
        # glibc makes os.preadv/os.pwritev as preadv2/pwritev2; never with RWF_ flags.
        _allow("preadv2", "virtio-block: guest reads (glibc's preadv)", ArgIs(5, 0)),
        _allow("pwritev2", "virtio-block: guest writes (glibc's pwritev)", ArgIs(5, 0)),
        _allow("fsync", "virtio-block: the guest's flush (cache_type Writeback)"),
    ),
    "net": (),
    "entropy": (_allow("getrandom", "virtio-rng: the host's random bytes"),),
    "vsock": (
        _allow("accept4", "vsock: the host connects to the listening socket"),
        _allow("getsockname", "vsock: Python's socket object of an accepted connection"),
        _allow(
            "socket",
            "vsock: the guest connects to a host port (Unix sockets only)",
            ArgIs(0, AF_UNIX),
        ),
        # The address is a path the filter cannot read: <uds_path>_<port>, which the
        # confined user must be allowed to connect to (as with Firecracker's jailer).
        _allow("connect", "vsock: the guest connects to <uds_path>_<port>"),
        _allow("recvfrom", "vsock: host to guest bytes"),
        _allow("sendto", "vsock: guest to host bytes"),
        _allow("shutdown", "vsock: a side of a stream closed"),
        _ioctl(FIONBIO, "vsock: accepted connections made non-blocking"),
    ),
}


def device_rules(kinds: Iterable[str]) -> tuple[Rule, ...]:
    """What the worker threads of devices of ``kinds`` ("block", "net", "entropy",
    "vsock") need; nothing for a VM without devices."""
    wanted = set(kinds)
    if not wanted:
        return ()
    rules = list(_DEVICE_WORKER_RULES)
    for kind in sorted(wanted):
        rules += DEVICE_RULES[kind]
    return tuple(rules)


def rules_for(pid: int, extra: Iterable[Rule] = ()) -> tuple[Rule, ...]:
    """The whole filter of process ``pid``; ``extra``: what its own threads add."""
    return (*RULES, *extra, tgkill_rule(pid))


def binding() -> Any:
    """libseccomp's Python API, imported only to confine: libseccomp's own binding
    (Debian's python3-seccomp, a C extension, about 1 ms to load) when this
    interpreter sees it, else pyseccomp (ctypes, the same API, the pip dependency:
    about 15 ms, as it imports ctypes.util and runs ldconfig twice)."""
    try:
        import seccomp
    except ImportError:
        import pyseccomp as seccomp
    return seccomp


def compile_filter(rules: Iterable[Rule], seccomp: Any = None) -> Any:
    """A libseccomp filter (not yet loaded) of ``rules``: anything else kills the
    process, as does any system-call ABI other than the native one.  ``seccomp``:
    the binding to compile with (by default :func:`binding`)."""
    seccomp = seccomp or binding()

    verdicts = {
        Verdict.ALLOW: seccomp.ALLOW,
        Verdict.REFUSE: seccomp.ERRNO(errno.EACCES),
        Verdict.UNSUPPORTED: seccomp.ERRNO(errno.ENOSYS),
    }
    syscall_filter = seccomp.SyscallFilter(seccomp.KILL_PROCESS)
    syscall_filter.set_attr(seccomp.Attr.ACT_BADARCH, seccomp.KILL_PROCESS)
    # Every thread gets the filter, not only the one that loads it.
    syscall_filter.set_attr(seccomp.Attr.CTL_TSYNC, 1)
    for rule in rules:
        number = seccomp.resolve_syscall(seccomp.Arch.NATIVE, rule.syscall)
        if number < 0:
            raise ValueError(f"no system call named {rule.syscall!r} on this architecture")
        conditions = [
            seccomp.Arg(c.index, seccomp.MASKED_EQ, c.mask, c.expected) for c in rule.when
        ]
        syscall_filter.add_rule(verdicts[rule.verdict], number, *conditions)
    return syscall_filter


def compile_program(rules: Iterable[Rule], seccomp: Any = None) -> bytes:
    """The BPF program of ``rules`` as the kernel takes it (an array of struct
    sock_filter), compiled by libseccomp.  A fleet supervisor compiles each worker's
    and hands it over, so that no worker pays for libseccomp's compiling (measured:
    about 0.9 MiB of private memory per process, kept after it is freed)."""
    syscall_filter = compile_filter(rules, seccomp)
    fd = os.memfd_create("dksm-seccomp-filter", os.MFD_CLOEXEC)
    try:
        with open(fd, "wb", closefd=False) as sink:
            syscall_filter.export_bpf(sink)
        return os.pread(fd, os.fstat(fd).st_size, 0)
    finally:
        os.close(fd)
