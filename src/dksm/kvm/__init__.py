"""KVM bindings: the kernel's ABI (``abi``) and thin objects over its ioctls (``system``).

No policy lives here: what registers a guest starts with is ``arch``'s business,
what to do with an exit is ``vmm``'s.
"""
