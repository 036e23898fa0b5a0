"""virtio devices over the virtio-mmio transport, laid out as Firecracker does:
block, network, entropy and vsock, each served on a thread of its own."""
