/* Prints "s", then reads the RTC data port for ever: a vCPU that is always in the
 * middle of a port-IO exit, which is where stopping it once raced with teardown. */
.code64
.globl _start
.text
_start:
    mov $0x3f8, %dx
    mov $'s', %al
    out %al, %dx
1:  in $0x71, %al
    jmp 1b
