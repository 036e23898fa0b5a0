"""Build a microVM from a :class:`VmConfig`, step by step in docs/BOOT.md's ioctl order.

Everything that can be wrong with the input (config, image, initrd, command line,
the devices' drive files and taps) is checked before ``/dev/kvm`` is opened, so bad
input costs nothing and leaves nothing behind.  What the build acquires is entered
on one exit stack as soon as it is held, in this order: the device backends
(drive files, taps, the vsock socket), the ``/dev/kvm`` handle, the VM, guest RAM,
each vCPU with its ``kvm_run`` mapping, each virtio device with its eventfds (and
their ioeventfd/irqfd registrations) and its worker's epoll set.  A failure at any
step, up to and including putting the machine together, releases all of it in
reverse order; the descriptor and mapping counts of the process are what they
were (``tests/test_build_cleanup.py`` makes a build fail at each step and counts).
Every file, tap and socket the VM will use is open when :func:`build` returns, and
no thread is started before :meth:`MicroVm.start`.

What depends on the config alone (the checked input, the image, the boot
structures and each vCPU's CPUID, MSRs and registers) is the build's plan
(:class:`BuildPlan`): :func:`build` makes it first, or takes one made earlier by
:func:`plan_build`, as a fleet supervisor does once per config for the workers it
forks, which then only copy and issue ioctls.  A fleet's plan also holds each
vCPU's FPU, special registers and LAPIC as the boot state makes them of a new
vCPU's, read once from a throwaway VM, so that a worker sets them without reading
and configuring its own.
"""

from __future__ import annotations

import contextlib
import ctypes

from dksm.arch import boot_state, cpuid, layout, mptable
from dksm.devices import i8042, rtc, serial
from dksm.devices.bus import MmioBus, PortBus
from dksm.kvm import abi
from dksm.kvm.system import Kvm, KvmError, Vcpu, Vm
from dksm.loader.boot_params import BootParams, encode_cmdline
from dksm.loader.elf import load_elf
from dksm.memory.guest_memory import GuestMemory
from dksm.value import Value
from dksm.vmm import device_manager
from dksm.vmm.config import VmConfig
from dksm.vmm.machine import ExitCause, MicroVm

TYPE_CHECKING = False  # typing's, without importing typing (see the dksm package)
if TYPE_CHECKING:
    from dksm.loader.segment import KernelImage, Segment
    from dksm.memory.guest_memory import PageSharer
    from dksm.vmm.machine import DeviceThreads

ACPI_SHUTDOWN_PORT = 0x604


class _PortSink:
    """A write-only port whose write ends the VM (the ACPI PM1a port QEMU-ish guests
    use after the i8042 reset; harmless when the reset already did it)."""

    def __init__(self, vm: MicroVm) -> None:
        self.vm = vm

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        self.vm.finish(ExitCause.GUEST_SHUTDOWN, "ACPI power off")


class VcpuSetup(Value):
    """One vCPU's CPUID table, MSRs and registers, as the structs their ioctls take;
    and, in a fleet's plan, its FPU, special registers and LAPIC as the boot state
    makes them of a new vCPU's (None: read from the vCPU and configured at build)."""

    __slots__ = ("cpuid", "fpu", "lapic", "msrs", "regs", "sregs")

    def __init__(
        self,
        cpuid: ctypes.Structure,
        msrs: ctypes.Structure,
        regs: abi.Regs,
        fpu: abi.Fpu | None = None,
        sregs: abi.Sregs | None = None,
        lapic: abi.LapicState | None = None,
    ) -> None:
        self.cpuid = cpuid
        self.msrs = msrs
        self.regs = regs
        self.fpu = fpu
        self.sregs = sregs
        self.lapic = lapic


class BuildPlan(Value):
    """All of a VM's build that depends on its config alone: the checked input, the
    image, and the boot state as bytes and structs, ready for guest RAM and ioctls.

    A fleet supervisor makes one per config before forking (:func:`plan_build`), so
    that each worker only copies and issues; for ``dksm run`` :func:`build` makes it.
    """

    __slots__ = ("boot_memory", "config", "image", "initrd", "vcpus")

    def __init__(
        self,
        config: VmConfig,
        image: KernelImage,
        initrd: Segment | None,
        # (guest address, bytes), written in this order once the image is in place:
        # page tables, GDT and IDT, MP table, command line, zero page.
        boot_memory: tuple[tuple[int, bytes], ...],
        # Per vCPU; None when the CPUID needs the TSC frequency of the VM's own vCPU.
        vcpus: tuple[VcpuSetup, ...] | None,
    ) -> None:
        self.config = config
        self.image = image
        self.initrd = initrd
        self.boot_memory = boot_memory
        self.vcpus = vcpus


def plan_build(config: VmConfig, *, vcpu_state: bool = False) -> BuildPlan:
    """Check ``config`` and compute everything a build of it needs before KVM.

    ``vcpu_state``: also the vCPUs' CPUID, MSRs, registers, FPU, special registers
    and LAPIC, asking KVM (a throwaway VM) for the new vCPUs' state and the TSC
    frequency (used where the CPUID reports it)."""
    config.validate()
    cmdline = encode_cmdline(config.boot_args + device_manager.cmdline_additions(config))
    image = load_elf(config.kernel_path, config.mem_size)
    initrd: Segment | None = None
    initrd_size = 0
    if config.initrd_path:
        from dksm.loader.initrd import place_initrd, read_initrd  # only VMs with one

        ramdisk = read_initrd(config.initrd_path, config.mem_size)
        initrd = place_initrd(ramdisk, config.mem_size, image)
        initrd_size = ramdisk.size
    params = BootParams(
        mem_size=config.mem_size,
        cmdline=cmdline,
        initrd_addr=initrd.guest_addr if initrd else 0,
        initrd_size=initrd_size,
    )
    boot_memory = (
        *boot_state.page_tables(),
        *boot_state.gdt_and_idt(),
        (layout.MP_TABLE_ADDR, mptable.mp_table(config.vcpu_count)),
        (layout.CMDLINE_ADDR, cmdline + b"\0"),
        (layout.ZERO_PAGE_ADDR, params.encode()),
    )
    vcpus = None
    if vcpu_state:
        tsc_khz, special = _new_vcpus_state(config.vcpu_count)
        if not config.tsc_frequency_leaf:
            tsc_khz = None
        vcpus = _vcpu_setups(config, image.entry, _policy(config, tsc_khz), special)
    return BuildPlan(config, image, initrd, boot_memory, vcpus)


def build(
    config: VmConfig,
    *,
    serial_sink: serial.ByteSink,
    sharer: PageSharer | None = None,
    plan: BuildPlan | None = None,
) -> MicroVm:
    """Build a VM of ``config``; ``plan``: made by :func:`plan_build` for this config
    (else it is made here)."""
    # 1. Validate all input before touching KVM.
    if plan is None:
        plan = plan_build(config)
    elif plan.config != config:
        raise ValueError("the build plan was made for another config")
    image = plan.image

    with contextlib.ExitStack() as acquired:
        # The devices' host side (drive files, taps, the vsock socket) is input too:
        # opened first.  open_backends releases its own part on failure.
        backends = device_manager.open_backends(config)
        acquired.callback(backends.close)
        kvm = acquired.enter_context(Kvm())
        # 2. The VM, its RAM as one slot, TSS, in-kernel irqchip and PIT.
        vm = kvm.create_vm()
        acquired.callback(vm.close)
        memory = GuestMemory(config.mem_size)
        acquired.callback(memory.close)
        vm.set_user_memory_region(0, 0, config.mem_size, memory.host_address)
        vm.set_tss_addr(layout.TSS_ADDR)
        vm.create_irqchip()
        vm.create_pit2()
        # 3. vCPUs after the irqchip, each with its kvm_run mapping.
        vcpus: list[Vcpu] = []
        for index in range(config.vcpu_count):
            vcpu = vm.create_vcpu(index)
            acquired.callback(vcpu.close)
            vcpus.append(vcpu)
        # 4. The kernel and the initrd, read-only pages through the sharer (whose
        # lease its caller holds and releases after this RAM is unmapped).
        memory.load_image(image, sharer)
        if plan.initrd is not None:
            memory.load_segment(plan.initrd, sharer)
        # 5. Per-vCPU state.
        setups = plan.vcpus
        if setups is None:
            setups = _vcpu_setups(config, image.entry, _policy(config, _tsc_khz(vcpus[0], config)))
        for vcpu, setup in zip(vcpus, setups, strict=True):
            _configure_vcpu(vcpu, setup)
        # 6. Boot structures: page tables, GDT, MP table, command line, zero page.
        for address, data in plan.boot_memory:
            memory.write(address, data)
        # 7. virtio devices in the MMIO gap: eventfds registered with KVM (ioeventfd,
        # irqfd), a worker (epoll set, thread started with the vCPUs) each, backends
        # handed over to them.  attach releases its own part on failure; closing
        # the VM's descriptor drops its registrations.
        mmio_bus = MmioBus()
        devices = device_manager.attach(config, vm, memory.view(), mmio_bus, backends)
        for device in devices:
            acquired.callback(device.close)
        # 8. Legacy devices on the port bus, and the machine that owns all of it.
        machine = _assemble(kvm, vm, memory, vcpus, mmio_bus, devices, serial_sink)
        acquired.pop_all()  # the machine releases it all from here (MicroVm.close)
    return machine


def _assemble(
    kvm: Kvm,
    vm: Vm,
    memory: GuestMemory,
    vcpus: list[Vcpu],
    mmio_bus: MmioBus,
    devices: list[device_manager.AttachedDevice],
    serial_sink: serial.ByteSink,
) -> MicroVm:
    bus = PortBus()

    def raise_serial_irq() -> None:
        vm.irq_line(serial.COM1_IRQ, 1)
        vm.irq_line(serial.COM1_IRQ, 0)

    console = serial.Serial(serial_sink, raise_serial_irq)
    threads: list[DeviceThreads] = list(devices)
    machine = MicroVm(kvm, vm, memory, vcpus, bus, console, mmio_bus, threads)
    bus.register(serial.COM1_PORT, serial.PORT_COUNT, console)

    def raise_keyboard_irq() -> None:
        vm.irq_line(i8042.KEYBOARD_IRQ, 1)
        vm.irq_line(i8042.KEYBOARD_IRQ, 0)

    machine.keyboard = i8042.I8042(
        lambda: machine.finish(ExitCause.GUEST_SHUTDOWN, "i8042 reset"), raise_keyboard_irq
    )
    bus.register(i8042.DATA_PORT, i8042.PORT_COUNT, machine.keyboard)
    bus.register(rtc.INDEX_PORT, rtc.PORT_COUNT, rtc.CmosRtc())
    bus.register(ACPI_SHUTDOWN_PORT, 2, _PortSink(machine))
    return machine


_host_cpuid: list[abi.CpuidEntry2] | None = None
_host_flags: frozenset[str] | None = None


def preload_host_cpuid() -> None:
    """Ask KVM for the supported CPUID (and the kernel for the host CPU's flags) once,
    for every VM this process (and the processes it forks) will build."""
    global _host_cpuid, _host_flags
    if _host_cpuid is None:
        with Kvm() as kvm:
            _host_cpuid = kvm.supported_cpuid()
    if _host_flags is None:
        _host_flags = cpuid.host_cpu_flags()


def _tsc_khz(bsp: Vcpu, config: VmConfig) -> int | None:
    """The guest TSC's frequency when the CPUID is to report it and KVM can say."""
    if not config.tsc_frequency_leaf:
        return None
    try:
        return bsp.tsc_khz() or None
    except KvmError:
        return None  # KVM cannot say: the guest calibrates its TSC itself


def _new_vcpus_state(
    count: int,
) -> tuple[int | None, list[tuple[abi.Fpu, abi.Sregs, abi.LapicState]]]:
    """What ``count`` new vCPUs of a throwaway VM say: the TSC frequency (as
    :func:`_tsc_khz` gets it; every VM on this host has the host's), and each one's
    FPU, special registers and LAPIC with the boot state applied, exactly what a
    build would set on a new vCPU of the same index."""
    with Kvm() as kvm:
        vm = kvm.create_vm()
        vcpus: list[Vcpu] = []
        try:
            vm.create_irqchip()  # the LAPIC is the in-kernel irqchip's
            for index in range(count):
                vcpus.append(vm.create_vcpu(index))
            try:
                tsc_khz = vcpus[0].tsc_khz() or None
            except KvmError:
                tsc_khz = None
            special = []
            for vcpu in vcpus:
                fpu = vcpu.get_fpu()
                boot_state.configure_fpu(fpu)
                sregs = vcpu.get_sregs()
                boot_state.configure_sregs(sregs)
                lapic = vcpu.get_lapic()
                boot_state.configure_lapic(lapic)
                special.append((fpu, sregs, lapic))
            return tsc_khz, special
        finally:
            for vcpu in vcpus:
                vcpu.close()
            vm.close()


def _policy(config: VmConfig, tsc_khz: int | None) -> cpuid.CpuidPolicy:
    flags = _host_flags if _host_flags is not None else cpuid.host_cpu_flags()
    return cpuid.CpuidPolicy(
        vcpu_count=config.vcpu_count,
        rdrand="rdrand" in flags,
        rdseed="rdseed" in flags,
        tsc_khz=tsc_khz,
    )


def _vcpu_setups(
    config: VmConfig,
    entry: int,
    policy: cpuid.CpuidPolicy,
    special: list[tuple[abi.Fpu, abi.Sregs, abi.LapicState]] | None = None,
) -> tuple[VcpuSetup, ...]:
    if _host_cpuid is not None:
        supported = _host_cpuid
    else:
        with Kvm() as kvm:
            supported = kvm.supported_cpuid()
    msrs = abi.msrs_table(boot_state.boot_msrs())
    return tuple(
        VcpuSetup(
            abi.cpuid2_table(cpuid.vcpu_cpuid(supported, index, policy)),
            msrs,
            boot_state.boot_regs(entry),
            *(special[index] if special is not None else ()),
        )
        for index in range(config.vcpu_count)
    )


def _configure_vcpu(vcpu: Vcpu, setup: VcpuSetup) -> None:
    vcpu.set_cpuid_table(setup.cpuid)
    vcpu.set_msrs_table(setup.msrs)
    vcpu.set_regs(setup.regs)
    if setup.fpu is not None and setup.sregs is not None and setup.lapic is not None:
        vcpu.set_fpu(setup.fpu)
        vcpu.set_sregs(setup.sregs)
        vcpu.set_lapic(setup.lapic)
        return
    fpu = vcpu.get_fpu()
    boot_state.configure_fpu(fpu)
    vcpu.set_fpu(fpu)
    sregs = vcpu.get_sregs()
    boot_state.configure_sregs(sregs)
    vcpu.set_sregs(sregs)
    lapic = vcpu.get_lapic()
    boot_state.configure_lapic(lapic)
    vcpu.set_lapic(lapic)
