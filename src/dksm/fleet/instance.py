"""One microVM instance together with its deduplication mode.

The order of acquisition and release is the crash-safety contract with the pool:
the lease exists (and holds its references) before the VM's RAM maps pool pages,
and it is released only after that RAM is unmapped.  A process killed in between
leaves a lease whose owner is dead, which the next process to open the pool sweeps.
"""

from __future__ import annotations

import contextlib
import enum
import os

from dksm.devices.serial import GuardedSink
from dksm.error import DksmError
from dksm.loader.host_file import check_path
from dksm.value import Value
from dksm.vmm.builder import build
from dksm.vmm.config import VmConfig
from dksm.vmm.machine import ExitCause, MicroVm, Outcome

TYPE_CHECKING = False  # typing's, without importing typing (see the dksm package)
if TYPE_CHECKING:
    from pathlib import Path

    from dksm.dedup.pool import Lease, PagePool
    from dksm.devices.serial import ByteSink
    from dksm.fleet.boot_merge import BootMerge
    from dksm.fleet.directory import VmInfo
    from dksm.memory.guest_memory import PageSharer
    from dksm.vmm.builder import BuildPlan

DEFAULT_DOMAIN = "default"


class InfoFileError(DksmError):
    """The VM's info file cannot be written; the message says why."""


class DedupMode(enum.Enum):
    """How an instance's memory is deduplicated."""

    NONE = "none"  # private copies of everything
    KSM = "ksm"  # all RAM advised MADV_MERGEABLE; ksmd merges in the background
    DKSM = "dksm"  # read-only image pages mapped from the page pool at load time
    DKSM_KSM = "dksm+ksm"  # both: the pool at load time, KSM for what becomes equal later

    @property
    def uses_pool(self) -> bool:
        return self in (DedupMode.DKSM, DedupMode.DKSM_KSM)

    @property
    def uses_ksm(self) -> bool:
        return self in (DedupMode.KSM, DedupMode.DKSM_KSM)

    @classmethod
    def parse(cls, text: str) -> DedupMode:
        try:
            return cls(text)
        except ValueError:
            choices = ", ".join(m.value for m in cls)
            raise DksmError(f"unknown dedup mode '{text}'; choose one of {choices}") from None

    @classmethod
    def parse_list(cls, text: str) -> list[DedupMode]:
        """Comma-separated modes, in order (``none,ksm,dksm``)."""
        return [cls.parse(m.strip()) for m in text.split(",") if m.strip()]


class KsmScope(enum.Enum):
    """What of a VM's RAM the KSM modes offer to ksmd (``MADV_MERGEABLE``)."""

    RAM = "ram"  # all guest RAM, as QEMU and Cloud Hypervisor do
    TEXT = "text"  # only the image's code pages, as the DKSM thesis's Firecracker did

    @classmethod
    def parse(cls, text: str) -> KsmScope:
        try:
            return cls(text)
        except ValueError:
            choices = ", ".join(s.value for s in cls)
            raise DksmError(f"unknown KSM scope '{text}'; choose one of {choices}") from None


class InstanceSpec(Value):
    __slots__ = ("config", "dedup", "domain", "ksm_scope", "pool_root")

    def __init__(
        self,
        config: VmConfig,
        dedup: DedupMode = DedupMode.DKSM,
        domain: str = DEFAULT_DOMAIN,
        pool_root: Path | None = None,
        ksm_scope: KsmScope = KsmScope.RAM,
    ) -> None:
        self.config = config
        self.dedup = dedup
        self.domain = domain
        self.pool_root = pool_root
        self.ksm_scope = ksm_scope


class Instance:
    """A built VM, its pool lease (if any), and how to tear both down in order."""

    def __init__(
        self,
        spec: InstanceSpec,
        serial_sink: ByteSink,
        sharer: PageSharer | None = None,
        merge_after: bytes | None = None,
        plan: BuildPlan | None = None,
    ) -> None:
        """``sharer``: pages already referenced for this process by a launcher (see
        :meth:`dksm.dedup.pool.PagePool.hand_over`), or a lease; else the pool is
        opened here.  ``merge_after``: console text after which the kernel pages the
        guest rewrote are merged back into the pool once (:mod:`dksm.fleet.boot_merge`).
        ``plan``: the build's config-only part, made beforehand for ``spec.config``
        (:func:`dksm.vmm.builder.plan_build`)."""
        self.spec = spec
        self.pool: PagePool | None = None
        self.lease: Lease | None = None
        self.boot_merge: BootMerge | None = None
        try:
            if merge_after is not None:  # its module only where it is asked for
                from dksm.fleet.boot_merge import BootMerge, BootMergeError

                if not spec.dedup.uses_pool:
                    raise BootMergeError(
                        "the post-boot merge hands pages to the page pool: it needs --dedup "
                        f"dksm or dksm+ksm, not {spec.dedup.value}"
                    )
            if sharer is None and spec.dedup.uses_pool:
                from dksm.dedup.pool import PagePool

                self.pool = PagePool.open(spec.domain, spec.pool_root)
                self.lease = self.pool.lease()
            merge_lease = None
            if merge_after is not None:
                merge_lease = self._merge_lease(sharer)
                self.boot_merge = BootMerge(serial_sink, merge_after, spec.config.vcpu_count)
                serial_sink = self.boot_merge

            console = GuardedSink(serial_sink)
            self.vm: MicroVm = build(
                spec.config, serial_sink=console, sharer=sharer or self.lease, plan=plan
            )
            console.on_error = self._console_failed
            if spec.dedup.uses_ksm:
                self.vm.memory.advise_mergeable(code_only=spec.ksm_scope is KsmScope.TEXT)
            if self.boot_merge is not None and merge_lease is not None:
                self.boot_merge.attach(self.vm.memory, merge_lease, os.getpid())
        except BaseException:
            # Keep the error that stopped the build; a lease that cannot be released
            # now (a full tmpfs, say) is swept once this process has exited.
            if hasattr(self, "vm"):
                self.vm.close()
            if self.boot_merge is not None:
                self.boot_merge.close()
            with contextlib.suppress(DksmError):
                self._release_pool()
            raise

    def _merge_lease(self, sharer: PageSharer | None) -> Lease:
        from dksm.dedup.pool import Lease
        from dksm.fleet.boot_merge import BootMergeError

        lease = self.lease or (sharer if isinstance(sharer, Lease) else None)
        if lease is None:
            raise BootMergeError("the post-boot merge needs this VM's own pool lease")
        return lease

    def _console_failed(self, exc: OSError) -> None:
        self.vm.finish(
            ExitCause.HOST_IO_ERROR, f"cannot write the console output: {exc.strerror or exc}"
        )

    def run(self, timeout: float | None = None) -> Outcome:
        return self.vm.run(timeout)

    def describe(self) -> VmInfo:
        """What another process needs to inspect this VM (e.g. via /proc/PID/mem)."""
        from dksm.fleet.directory import VmInfo  # json and pathlib: not for every start

        return VmInfo(
            pid=os.getpid(),
            kernel=self.spec.config.kernel_path,
            mem_size=self.spec.config.mem_size,
            ram_host_address=self.vm.memory.host_address,
            dedup=self.spec.dedup.value,
            ksm_scope=self.spec.ksm_scope.value,
            domain=self.spec.domain,
            pages_shared=self.vm.memory.pages_shared,
        )

    @staticmethod
    def info_template(spec: InstanceSpec) -> bytes:
        """:meth:`describe`'s JSON for a VM of ``spec``, with what only its process
        knows left to fill (:meth:`dksm.fleet.directory.VmInfo.template`): made by a
        fleet supervisor once per VM, for :meth:`write_info` in the worker."""
        from dksm.fleet.directory import VmInfo

        return VmInfo.template(
            kernel=spec.config.kernel_path,
            mem_size=spec.config.mem_size,
            dedup=spec.dedup.value,
            ksm_scope=spec.ksm_scope.value,
            domain=spec.domain,
        )

    def write_info(self, path: str, template: bytes | None = None) -> None:
        """Write :meth:`describe` to ``path`` atomically: readers see the whole file
        or none.  The temporary file is created exclusively beside it (never an
        existing file or a planted symlink) and removed if anything fails.
        ``template``: :meth:`info_template` of this instance's spec, which saves a
        fleet worker the JSON encoder."""
        check_path(path, "info file")
        if template is not None:
            memory = self.vm.memory
            text = template % (os.getpid(), memory.host_address, memory.pages_shared)
        else:
            import json

            text = json.dumps(self.describe().to_json()).encode()
        directory, slash, _ = path.rpartition("/")  # os.path's functions: more code to run
        tmp = f"{directory}{slash}.dksm-info-{os.urandom(8).hex()}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            try:
                try:  # os.write, not a file object: less code run in a fleet worker
                    written = 0
                    while written < len(text):
                        written += os.write(fd, text[written:])
                finally:
                    os.close(fd)
                os.replace(tmp, path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
        except OSError as exc:
            raise InfoFileError(f"cannot write info file {path}: {exc.strerror}") from exc

    def _release_pool(self) -> None:
        if self.lease is not None:
            self.lease.release()
            self.lease = None
        if self.pool is not None:
            self.pool.close()
            self.pool = None

    def close(self) -> None:
        self.vm.close()  # unmaps guest RAM, and with it every pool mapping
        if self.boot_merge is not None:
            self.boot_merge.close()
        self._release_pool()

    def __enter__(self) -> Instance:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
