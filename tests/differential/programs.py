"""Small hand-assembled guest programs for the differential scenarios (GNU as source in the comments).

All are loaded at guests.LOAD (0x1000) and, except LONGMEM, run in real mode with CS = DS = 0.
"""

from kvmfs.guests import LOAD, hexcode

PIO = hexcode(
    # .code16
    "ba7000",  # mov $0x70, %dx
    "b011",  # mov $0x11, %al
    "ee",  # out %al, (%dx)
    "b83322",  # mov $0x2233, %ax
    "ef",  # out %ax, (%dx)
    "66b877665544",  # mov $0x44556677, %eax
    "66ef",  # out %eax, (%dx)
    "e680",  # out %al, $0x80
    "ec",  # in (%dx), %al
    "a20006",  # mov %al, 0x600
    "ed",  # in (%dx), %ax
    "a30206",  # mov %ax, 0x602
    "66ed",  # in (%dx), %eax
    "66a30406",  # mov %eax, 0x604
    "e481",  # in $0x81, %al
    "a20806",  # mov %al, 0x608
    "f4",  # hlt
)

REP = hexcode(
    # .set LOAD, 0x1000
    # .code16
    # start:
    "fc",  # cld
    "baf803",  # mov $0x3f8, %dx
    "be2610",  # mov $(LOAD + msg - start), %si
    "b90500",  # mov $5, %cx
    "f36e",  # rep outsb
    "bf0007",  # mov $0x700, %di
    "b90400",  # mov $4, %cx
    "f36c",  # rep insb
    "bf1007",  # mov $0x710, %di
    "b90200",  # mov $2, %cx
    "f36d",  # rep insw
    "be2610",  # mov $(LOAD + msg - start), %si
    "b90300",  # mov $3, %cx
    "66f36f",  # rep outsl
    "f4",  # hlt
    "48656c6c6f2c20776f726c64210a",  # msg: .ascii "Hello, world!\n"
)

MMIO = hexcode(
    # .code16
    "b80020",  # mov $0x2000, %ax
    "8ed8",  # mov %ax, %ds
    "8a1e1000",  # mov 0x10, %bl
    "8b0e1200",  # mov 0x12, %cx
    "668b161400",  # mov 0x14, %edx
    "c60620005a",  # movb $0x5a, 0x20
    "c70622003412",  # movw $0x1234, 0x22
    "66c7062400efcdab89",  # movl $0x89abcdef, 0x24
    "31c0",  # xor %ax, %ax
    "8ed8",  # mov %ax, %ds
    "881e0006",  # mov %bl, 0x600
    "890e0206",  # mov %cx, 0x602
    "6689160406",  # mov %edx, 0x604
    "f4",  # hlt
)

READONLY = hexcode(
    # .code16
    "b80020",  # mov $0x2000, %ax
    "8ed8",  # mov %ax, %ds
    "8a1e0400",  # mov 0x4, %bl
    "c606040099",  # movb $0x99, 0x4
    "8a0e0400",  # mov 0x4, %cl
    "f4",  # hlt
)

UD2 = hexcode(
    "0f0b",  # ud2
)

DEBUG = hexcode(
    # .code16
    "b80100",  # mov $1, %ax
    "cc",  # int3
    "b80200",  # mov $2, %ax
    "40",  # inc %ax
    "f4",  # hlt
)

STEP = hexcode(
    # .code16
    "b80100",  # mov $1, %ax
    "40",  # inc %ax
    "e680",  # out %al, $0x80
    "40",  # inc %ax
    "f4",  # hlt
)

CPUID = hexcode(
    # .code16
    "6631c0",  # xor %eax, %eax
    "6631c9",  # xor %ecx, %ecx
    "0fa2",  # cpuid
    "f4",  # hlt
)

IRQ = hexcode(
    # .set LOAD, 0x1000
    # .code16
    # start:
    "fb",  # sti
    "90",  # nop
    "e680",  # out %al, $0x80
    "b005",  # mov $0x5, %al
    "e682",  # out %al, $0x82
    "f4",  # 1: hlt
    "ebfd",  # jmp 1b
    # handler:
    "b042",  # mov $0x42, %al
    "e681",  # out %al, $0x81
    "cf",  # iret
)

PATCH = hexcode(
    # .code16
    "c606000611",  # movb $0x11, 0x600
    "a00106",  # again: mov 0x601, %al
    "e680",  # out %al, $0x80
    "b301",  # patch: mov $0x01, %bl
    "88d8",  # mov %bl, %al
    "e680",  # out %al, $0x80
    "80fb03",  # cmp $0x03, %bl
    "75f0",  # jne again
    "f4",  # hlt
)

SLOTS = hexcode(
    # .code16
    "b80020",  # again: mov $0x2000, %ax
    "8ed8",  # mov %ax, %ds
    "a00000",  # mov 0x0, %al
    "e680",  # out %al, $0x80
    "b80030",  # mov $0x3000, %ax
    "8ed8",  # mov %ax, %ds
    "a00000",  # mov 0x0, %al
    "e680",  # out %al, $0x80
    "ebea",  # jmp again
)

LONGMEM = hexcode(
    # .code64
    "48b88877665544332211",  # movabs $0x1122334455667788, %rax
    "4889042500060000",  # mov %rax, 0x600
    "48bb0000300000000000",  # movabs $0x300000, %rbx
    "488b0b",  # mov (%rbx), %rcx
    "48894308",  # mov %rax, 8(%rbx)
    "f4",  # hlt
)

IRQ_HANDLER = LOAD + 0xB  # `handler:` in IRQ
PATCH_IMMEDIATE = LOAD + 0xB  # the immediate of `patch: mov $0x01, %bl` in PATCH
