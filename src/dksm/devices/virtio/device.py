"""What every virtio device shares: its queues, its interrupt, the thread that
serves it, and what happens when a guest breaks the rules.

Threads.  A device's queues are served on a thread of its own
(:class:`DeviceWorker`), never on a vCPU: the guest's queue notifications reach it
through eventfds that KVM signals itself (ioeventfd), and its interrupts leave
through an eventfd KVM turns into an interrupt (irqfd), so the data path never
passes through the vCPU loop.  The worker also waits on the device's backend
(a tap, sockets).  Register accesses still arrive on vCPU threads, through the
transport; one lock per device (:attr:`VirtioDevice.lock`) keeps the two apart.

Failure.  Whatever a guest writes into its queues -- descriptors outside its RAM,
loops, wrong directions, a queue used before it is ready -- ends in the device
asking for a reset (``DEVICE_NEEDS_RESET`` in its status, and a configuration-change
interrupt, virtio 1.2 section 2.1.2) and one line in the log; the device then
ignores its queues until the driver resets it.  The VMM and the other devices go on.
"""

from __future__ import annotations

import logging
import os
import select
import threading
from collections.abc import Callable

from dksm.devices.virtio.queue import QueueError, Virtqueue

log = logging.getLogger("dksm.devices.virtio")

# Device types (virtio 1.2, section 5).
TYPE_NET = 1
TYPE_BLOCK = 2
TYPE_ENTROPY = 4
TYPE_VSOCK = 19

# Feature bits every device may offer (section 6).
F_VERSION_1 = 1 << 32

# A guest can make the device complain at will: this many lines per device are
# logged, the rest only counted.
LOGGED_COMPLAINTS = 20

# InterruptStatus bits (section 4.2.2).
INTERRUPT_USED_BUFFER = 1
INTERRUPT_CONFIG_CHANGE = 2


class Interrupt:
    """A device's interrupt line: the status bits the driver reads and acknowledges,
    and the eventfd (registered with KVM as an irqfd) that raises the line."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.status = 0
        self._lock = threading.Lock()
        self.raised = 0

    def trigger(self, bits: int) -> None:
        with self._lock:
            self.status |= bits
        self.raised += 1
        os.eventfd_write(self.fd, 1)

    def acknowledge(self, bits: int) -> None:
        with self._lock:
            self.status &= ~bits

    def clear(self) -> None:
        with self._lock:
            self.status = 0


class VirtioDevice:
    """The device half of a virtio device; the transport drives it.

    Subclasses set :attr:`device_type` and the queue sizes, offer their feature
    bits, describe their configuration space and serve their queues in
    :meth:`queue_notified`.  Every method runs with :attr:`lock` held.
    """

    device_type = 0
    kind = "virtio"

    def __init__(self, name: str, queue_sizes: tuple[int, ...], ram: memoryview) -> None:
        self.name = name
        self.queues = [Virtqueue(size) for size in queue_sizes]
        self.ram = ram
        self.lock = threading.Lock()
        self.acked_features = 0
        self.activated = False
        self.needs_reset = False
        self.errors = 0  # times the guest broke the rules (each asked for a reset)
        self.complaints = 0  # log lines about the guest, logged or not
        self.interrupt: Interrupt | None = None  # set by the transport
        self.worker: DeviceWorker | None = None  # set by whoever starts the device

    @property
    def label(self) -> str:
        return f"{self.kind} {self.name}"

    # -- what subclasses describe -------------------------------------------------

    def offered_features(self) -> int:
        """Device-specific feature bits (VERSION_1 is added by the transport)."""
        return 0

    def config_space(self) -> bytes:
        """The device configuration space, little-endian as the driver reads it."""
        return b""

    def write_config(self, offset: int, size: int, value: int) -> None:
        self.complain(f"the driver wrote configuration byte {offset:#x}, which is read-only")

    def complain(self, message: str) -> None:
        """Log what the guest did wrong, up to :data:`LOGGED_COMPLAINTS` lines."""
        self.complaints += 1
        if self.complaints <= LOGGED_COMPLAINTS:
            log.warning("%s: %s", self.label, message)
        elif self.complaints == LOGGED_COMPLAINTS + 1:
            log.warning(
                "%s: further complaints about the guest are counted, not logged", self.label
            )

    # -- lifecycle (transport) ------------------------------------------------------

    def activate(self) -> None:
        """The driver set DRIVER_OK: check its queues and start serving them."""
        try:
            for queue in self.queues:
                if queue.ready:
                    queue.validate(self.ram)
        except QueueError as exc:
            self.fail(str(exc))
            return
        self.activated = True
        self.on_activate()
        for index, queue in enumerate(self.queues):
            if queue.ready:
                self.serve(index)  # buffers offered before DRIVER_OK

    def reset(self) -> None:
        """The driver wrote 0 to the status: forget everything it configured."""
        self.on_reset()
        self.activated = False
        self.needs_reset = False
        self.acked_features = 0
        for queue in self.queues:
            queue.reset()

    def on_activate(self) -> None:
        """Start using the backend (subclasses)."""

    def on_reset(self) -> None:
        """Stop using the backend and drop what was in flight (subclasses)."""

    def close(self) -> None:
        """Release the backend for good (subclasses)."""

    # -- queues ---------------------------------------------------------------------

    def notified(self, index: int) -> None:
        """The driver notified queue ``index`` (worker thread, lock held)."""
        if self.needs_reset:
            return
        if index >= len(self.queues):
            self.fail(f"the driver notified queue {index}, which does not exist")
        elif not self.activated:
            self.fail(f"the driver notified queue {index} before setting DRIVER_OK")
        elif not self.queues[index].ready:
            self.fail(f"the driver notified queue {index}, which it has not made ready")
        else:
            self.serve(index)

    def serve(self, index: int) -> None:
        try:
            self.queue_notified(index)
        except QueueError as exc:
            self.fail(f"queue {index}: {exc}")

    def queue_notified(self, index: int) -> None:
        """Take and answer what the driver offered on queue ``index`` (subclasses)."""

    def used(self, index: int, head: int, written: int) -> None:
        """Give chain ``head`` back on queue ``index`` (``written`` bytes written);
        :meth:`signal_used` tells the driver once a batch is done."""
        self.queues[index].put_used(self.ram, head, written)

    def signal_used(self, index: int) -> None:
        """Interrupt the driver for queue ``index``, unless it asked not to be."""
        if self.queues[index].wants_interrupt(self.ram) and self.interrupt is not None:
            self.interrupt.trigger(INTERRUPT_USED_BUFFER)

    def fail(self, reason: str) -> None:
        """The guest broke the rules: stop serving and ask the driver for a reset."""
        self.errors += 1
        if self.needs_reset:
            return
        self.complain(f"{reason}; the device needs a reset")
        self.needs_reset = True
        self.on_reset()
        if self.interrupt is not None:
            self.interrupt.trigger(INTERRUPT_CONFIG_CHANGE)


Handler = Callable[[int], None]


class DeviceWorker:
    """The thread that serves one device: it waits (epoll) on the device's queue
    eventfds and backend descriptors and runs their handlers with the device's
    lock held."""

    def __init__(self, device: VirtioDevice) -> None:
        self.device = device
        self.epoll = select.epoll()
        try:
            self._stop_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        except BaseException:
            self.epoll.close()
            raise
        try:
            self.epoll.register(self._stop_fd, select.EPOLLIN)
        except BaseException:
            self.epoll.close()
            os.close(self._stop_fd)
            raise
        self._handlers: dict[int, Handler] = {}
        self._thread: threading.Thread | None = None
        self._done = threading.Event()
        device.worker = self

    def watch(self, fd: int, handler: Handler, events: int = select.EPOLLIN) -> None:
        self._handlers[fd] = handler
        self.epoll.register(fd, events)

    def modify(self, fd: int, events: int) -> None:
        self.epoll.modify(fd, events)

    def unwatch(self, fd: int) -> None:
        if self._handlers.pop(fd, None) is not None and not self.epoll.closed:
            self.epoll.unregister(fd)

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._main, name=f"virtio-{self.device.name}", daemon=True
        )
        self._thread.start()

    def _main(self) -> None:
        try:
            while True:
                for fd, events in self.epoll.poll():
                    if fd == self._stop_fd:
                        return
                    with self.device.lock:
                        handler = self._handlers.get(fd)
                        if handler is None:
                            continue
                        try:
                            handler(events)
                        except QueueError as exc:  # met while serving a backend
                            self.device.fail(str(exc))
                        except Exception as exc:  # a host-side fault ends the device, not the VMM
                            log.error("%s: %s: %s", self.device.label, type(exc).__name__, exc)
                            self.device.fail("the device failed on the host")
        finally:
            self._done.set()

    def stop(self) -> None:
        """Stop the thread and wait for it: it finishes the handler it is in (host IO,
        bounded), and guest RAM must not go away under it."""
        if self._thread is not None and self._thread.ident is not None:
            os.eventfd_write(self._stop_fd, 1)
            self._done.wait()
        self._thread = None

    def close(self) -> None:
        self.stop()
        self.epoll.close()
        os.close(self._stop_fd)
