"""Host memory: raw mappings (``host_mapping``) and guest RAM (``guest_memory``)."""
