/* Prints "hi" and asks for a reset through the i8042. */
.code64
.globl _start
.text
_start:
    mov $0x3f8, %dx
    mov $'h', %al
    out %al, %dx
    mov $'i', %al
    out %al, %dx
    mov $0x64, %dx
    mov $0xfe, %al
    out %al, %dx
1:  hlt
    jmp 1b
