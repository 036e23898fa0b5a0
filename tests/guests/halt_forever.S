/* Halts with interrupts enabled forever: KVM_RUN never returns by itself. */
.code64
.globl _start
.text
_start:
    mov $0x3f8, %dx
    mov $'z', %al
    out %al, %dx
    sti
1:  hlt
    jmp 1b
