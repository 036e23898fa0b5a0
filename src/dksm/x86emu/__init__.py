"""The x86-64 instruction emulator: decoding, paging and execution of the instructions
the VMM runs itself when the host's KVM cannot (see :mod:`dksm.vmm.emulation`)."""
