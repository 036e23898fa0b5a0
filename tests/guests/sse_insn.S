/* An SSE instruction in guest kernel mode: the PVM host emulator rejects it. */
.code64
.globl _start
.text
_start:
    pxor %xmm1, %xmm1
    mov $0x64, %dx
    mov $0xfe, %al
    out %al, %dx
