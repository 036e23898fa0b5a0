"""The x86-64 register file as the emulator indexes it, and the architectural bits it reads.

Registers are numbered in ``kvm_regs`` order so the VMM can hand KVM's own register
block to the emulator; :data:`ENCODING_TO_INDEX` maps an instruction's register
number onto it.  The flag and control-register bits the emulator reads are here,
for the executor and the page walker alike.  Facts from the Intel SDM volume 3
(2.5, 2.6); no code from elsewhere.
"""

from __future__ import annotations

MASK32 = (1 << 32) - 1
MASK64 = (1 << 64) - 1
MASK128 = (1 << 128) - 1

# Register file indices: struct kvm_regs order (rax rbx rcx rdx rsi rdi rsp rbp
# r8-r15 rip rflags), so a vCPU's registers can be used in place.
RAX, RBX, RCX, RDX, RSI, RDI, RSP, RBP = range(8)
RIP = 16
RFLAGS = 17
REGISTER_COUNT = 18
# x86 encoding number (rax rcx rdx rbx rsp rbp rsi rdi r8-r15) -> kvm_regs index.
ENCODING_TO_INDEX = (0, 2, 3, 1, 6, 7, 4, 5, 8, 9, 10, 11, 12, 13, 14, 15)

FLAG_CF = 1 << 0
FLAG_PF = 1 << 2
FLAG_AF = 1 << 4
FLAG_ZF = 1 << 6
FLAG_SF = 1 << 7
FLAG_TF = 1 << 8
FLAG_OF = 1 << 11
FLAG_AC = 1 << 18

CR0_PE = 1 << 0
CR0_MP = 1 << 1
CR0_EM = 1 << 2
CR0_TS = 1 << 3
CR0_WP = 1 << 16
CR0_PG = 1 << 31
CR4_OSFXSR = 1 << 9
CR4_LA57 = 1 << 12
CR4_OSXSAVE = 1 << 18
EFER_LMA = 1 << 10
EFER_NXE = 1 << 11
