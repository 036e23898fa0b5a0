"""dksm: daemonless, load-time same-page merging for KVM microVMs.

Layers, lowest first (a module never imports from a layer above its own):
``kvm`` (ioctl ABI) - ``arch`` (x86-64 boot state) - ``loader`` (images) -
``memory`` (host mappings, guest RAM) - ``devices`` - ``vmm`` - ``dedup`` (page pool,
KSM) - ``bench`` - ``cli``.  Import-time work is kept near zero: start-up time and
per-VM memory are measured products.
"""

__version__ = "0.1.0"
