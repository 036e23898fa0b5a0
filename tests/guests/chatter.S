/* Writes "x" to the console for ever, as fast as it can: enough to fill any pipe. */
.code64
.globl _start
.text
_start:
    mov $0x3f8, %dx
    mov $'x', %al
1:  out %al, %dx
    jmp 1b
