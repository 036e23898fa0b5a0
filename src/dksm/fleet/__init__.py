"""Running microVMs with deduplication: one instance (``instance``) or many
(``launcher``).  This layer joins the VMM and the page pool, which know nothing of
each other: the VMM takes any page sharer, the pool serves any program."""
