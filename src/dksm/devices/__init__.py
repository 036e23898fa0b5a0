"""Emulated devices, each behind the one small :class:`~dksm.devices.bus.BusDevice`
interface, dispatched by address through a port or MMIO bus; the virtio devices
live in :mod:`dksm.devices.virtio`."""
