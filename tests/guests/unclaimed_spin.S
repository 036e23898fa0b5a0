/* Reads port 0x80, which no device claims, for ever: each read is an exit the port
 * bus counts (PortBus.unclaimed_accesses), so a test can watch the vCPU progress. */
.code64
.globl _start
.text
_start:
1:  in $0x80, %al
    jmp 1b
