/* Prints "." after every few thousand loop iterations, for ever: a guest
 * whose progress shows on the console, to see that a paused VM makes none. */
.code64
.globl _start
.text
_start:
    mov $0x3f8, %dx
1:  mov $5000, %ecx
2:  dec %ecx
    jnz 2b
    mov $'.', %al
    out %al, %dx
    jmp 1b
