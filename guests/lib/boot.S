/* dksm guest kit: 64-bit Linux-boot-protocol entry, trap stubs, IDT.
 *
 * State on entry (set by the VMM, like Firecracker): long mode, paging on
 * with an identity map of 0-1 GiB, RSI = zero page (0x7000), RSP = 0x8ff0,
 * interrupts off, CS = 0x08.
 *
 * Every instruction here may cost about 1 us (emulated guest kernel mode),
 * so the path to kit_start is kept to a few hundred instructions: the .bss is
 * not cleared (the loader zero-fills p_memsz) and the IDT covers vectors 0-47
 * only (anything above raises #GP, which is handled).
 */

#define NVEC      48          /* IDT entries installed: exceptions + 16 IRQs */
#define STUB_SIZE 16          /* every trap stub is 16 bytes, 16-aligned */
#define STACK_SIZE (32 * 1024)

        .section .text.dksm.entry, "ax", @progbits
        .code64
        .globl  _dksm_entry
        .type   _dksm_entry, @function
_dksm_entry:
        cli
        cld
        movl    $dksm_stack_top, %esp   /* own stack in .bss (below 4 GiB) */
        xorl    %ebp, %ebp
        movq    %rsi, %rbx              /* zero page */
        cmpl    $0x53726448, 0x202(%rbx)/* "HdrS" */
        jne     1f
        cmpw    $0xaa55, 0x1fe(%rbx)    /* boot_flag */
        jne     1f

        /* Mask both 8259 PICs. */
        movb    $0xff, %al
        outb    %al, $0x21
        outb    %al, $0xa1

        /* Build the IDT: gate i -> dksm_trap_stubs + i * STUB_SIZE,
         * present, DPL 0, 64-bit interrupt gate (0x8e00), current CS.
         * High dword of each gate stays 0 (.bss, addresses < 4 GiB). */
        movl    $dksm_idt, %edi
        movl    $dksm_trap_stubs, %eax
        movw    %cs, %dx
        shll    $16, %edx
        movl    $NVEC, %ecx
2:      movw    %ax, %dx                /* dx = offset 15:0, edx hi = CS */
        movl    %edx, (%rdi)
        movl    %eax, %r8d
        movw    $0x8e00, %r8w           /* offset 31:16 | P DPL0 type 0xe */
        movl    %r8d, 4(%rdi)
        addq    $16, %rdi
        addl    $STUB_SIZE, %eax
        decl    %ecx
        jnz     2b
        lidt    dksm_idtr

        movq    %rbx, %rdi
        call    kit_start               /* does not return */
        jmp     3f
1:      movq    %rbx, %rdi
        call    kit_bad_boot            /* does not return */
3:      cli
        hlt
        jmp     3b
        .size   _dksm_entry, . - _dksm_entry

/* ---- trap stubs ----------------------------------------------------------
 * Each is STUB_SIZE bytes.  Exceptions push a dummy error code when the CPU
 * does not, then the vector, and go to dksm_exc_common.  IRQ stubs (32-47)
 * push the vector and go to dksm_irq_common.
 */
        .section .text.dksm.traps, "ax", @progbits
        .balign STUB_SIZE
        .globl  dksm_trap_stubs
dksm_trap_stubs:
        /* .org fails to assemble if a stub is longer than STUB_SIZE. */
        .irp    v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
        .if (\v == 8) || (\v == 10) || (\v == 11) || (\v == 12) || (\v == 13) || (\v == 14) || (\v == 17) || (\v == 21) || (\v == 29) || (\v == 30)
        pushq   $\v
        .else
        pushq   $0
        pushq   $\v
        .endif
        jmp     dksm_exc_common
        .org    dksm_trap_stubs + (\v + 1) * STUB_SIZE, 0xcc
        .endr
        .irp    v, 32,33,34,35,36,37,38,39,40,41,42,43,44,45,46,47
        pushq   $\v
        jmp     dksm_irq_common
        .org    dksm_trap_stubs + (\v + 1) * STUB_SIZE, 0xcc
        .endr

/* Exception: build a frame (see struct kit_trap_frame in trap.c), print, stop. */
dksm_exc_common:
        pushq   %rax
        pushq   %rcx
        pushq   %rdx
        pushq   %rbx
        pushq   %rbp
        pushq   %rsi
        pushq   %rdi
        pushq   %r8
        pushq   %r9
        pushq   %r10
        pushq   %r11
        pushq   %r12
        pushq   %r13
        pushq   %r14
        pushq   %r15
        movq    %rsp, %rdi
        andq    $-16, %rsp
        call    kit_exception           /* does not return */
4:      cli
        hlt
        jmp     4b

/* IRQ: acknowledge at the 8259(s) and return.  The PICs are masked, so this
 * only runs if someone unmasks them. */
dksm_irq_common:
        pushq   %rax
        movb    $0x20, %al
        cmpq    $40, 8(%rsp)
        jb      5f
        outb    %al, $0xa0
5:      outb    %al, $0x20
        popq    %rax
        addq    $8, %rsp
        iretq

        .section .rodata.dksm.idtr, "a", @progbits
        .balign 16
        .word   0
        .globl  dksm_idtr
dksm_idtr:
        .word   NVEC * 16 - 1
        .quad   dksm_idt

        .section .bss.dksm.boot, "aw", @nobits
        .balign 4096
        .globl  dksm_idt
dksm_idt:
        .skip   NVEC * 16
        .balign 4096
dksm_stack:
        .skip   STACK_SIZE
        .globl  dksm_stack_top
dksm_stack_top:

        .section .note.GNU-stack, "", @progbits
