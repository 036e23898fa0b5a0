/* An SSE instruction dksm deliberately does not emulate: floating-point
 * arithmetic (its MXCSR exception flags could not be reproduced exactly).  On a
 * PVM host neither KVM nor dksm runs it, and the VM ends with a clear error;
 * on hardware KVM it simply runs. */
.code64
.globl _start
.text
_start:
    mov %cr4, %rax
    or $0x600, %rax         /* OSFXSR | OSXMMEXCPT: SSE enabled */
    mov %rax, %cr4
    addps %xmm1, %xmm0
    mov $0x64, %dx
    mov $0xfe, %al
    out %al, %dx
