"""dksm: daemonless, load-time same-page merging for KVM microVMs.

Layers, lowest first (a module never imports from a layer above its own):
``kvm`` (ioctl ABI) - ``arch`` (x86-64 boot state) - ``loader`` (images) -
``memory`` (host mappings, guest RAM) - ``devices`` - ``vmm`` - ``dedup`` (page pool,
KSM) - ``bench`` - ``cli``.  Import-time work is kept near zero: start-up time and
per-VM memory are measured products.  So the modules ``dksm run`` imports do not
import :mod:`typing` (milliseconds of every start) for names only the type checker
needs: they say ``TYPE_CHECKING = False``, which mypy reads as typing's own, and
import under ``if TYPE_CHECKING:`` what annotations name (protocols included).
"""

__version__ = "0.1.0"
