"""Emulated devices, each behind the one small :class:`~dksm.devices.bus.PortDevice`
interface, dispatched by address through a :class:`~dksm.devices.bus.PortBus`."""
