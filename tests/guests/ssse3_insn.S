/* SSSE3/SSE4.1 instructions dksm has no hand-written code for: with the optional
 * Unicorn engine the VMM runs them, without it the VM ends with a clear error.
 * The test reads xmm0 and xmm2 from the vCPU after the guest's shutdown. */
.code64
.globl _start
.text
_start:
    mov %cr4, %rax
    or $0x600, %rax         /* OSFXSR | OSXMMEXCPT */
    mov %rax, %cr4
    lea data(%rip), %rsi
    movdqu (%rsi), %xmm0
    movdqu 16(%rsi), %xmm1
    pshufb %xmm1, %xmm0     /* 66 0f 38 00 c1 */
    movdqu 32(%rsi), %xmm2
    palignr $5, %xmm1, %xmm2
    mov $0x64, %dx
    mov $0xfe, %al
    out %al, %dx
    .balign 16
data:
    .byte 0x00, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x99, 0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0xff
    .byte 15, 14, 13, 12, 0x80, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0x81
    .byte 0xa0, 0xa1, 0xa2, 0xa3, 0xa4, 0xa5, 0xa6, 0xa7, 0xa8, 0xa9, 0xaa, 0xab, 0xac, 0xad, 0xae, 0xaf
