"""x86-64 boot state: guest layout, page tables, GDT, registers, CPUID, MSRs, LAPIC."""
