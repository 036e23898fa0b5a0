/* Executes int3 with an IDT whose #BP handler prints "bp" and the distance from
 * the int3 to the return address the CPU pushed (must be 1: #BP is a trap), then
 * returns and prints "ok" and resets through the i8042.  On a PVM host the host's
 * emulator refuses int3 in kernel mode and dksm delivers the #BP itself. */
.code64
.globl _start
.text
_start:
    lea idt(%rip), %rdi
    lea handler(%rip), %rax
    mov %ax, 3*16(%rdi)          /* offset 15:0 */
    movw $0x08, 3*16+2(%rdi)     /* the boot GDT's code selector */
    movw $0x8e00, 3*16+4(%rdi)   /* present, DPL 0, 64-bit interrupt gate */
    shr $16, %rax
    mov %ax, 3*16+6(%rdi)        /* offset 31:16 */
    shr $16, %rax
    mov %eax, 3*16+8(%rdi)       /* offset 63:32 */
    lea idtr(%rip), %rax
    mov %rdi, 2(%rax)
    lidt (%rax)
    mov $0x3f8, %dx
the_int3:
    int3
    mov $'o', %al
    out %al, %dx
    mov $'k', %al
    out %al, %dx
    mov $0x64, %dx
    mov $0xfe, %al
    out %al, %dx
1:  hlt
    jmp 1b
handler:
    mov $'b', %al
    out %al, %dx
    mov $'p', %al
    out %al, %dx
    mov (%rsp), %rax             /* the pushed RIP */
    lea the_int3(%rip), %rcx
    sub %rcx, %rax
    add $'0', %al
    out %al, %dx
    iretq
.data
.balign 16
idt:
    .fill 64, 8, 0
idtr:
    .word 32*16 - 1
    .quad 0
