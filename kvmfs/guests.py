"""Tiny hand-assembled guests that print "Hello, world!\\n" to port 0x3f8, and the vcpu set-up each needs.

The code is kept as bytes with its GNU as source (AT&T syntax) in the comments, so nothing but Python
is needed at run time. Every guest is loaded at LOAD in RAM starting at guest physical 0 and ends in HLT.
Four modes, each entered differently, exercise different parts of a VMM:

- "real": real mode, CS base 0.
- "protected": 32-bit protected mode entered by KVM_SET_SREGS alone (flat hidden segment state, no GDT
  in guest memory), which is what a backend that cannot set hidden state gets wrong.
- "long": 64-bit mode with 4-level identity paging built by the VMM, segments set by KVM_SET_SREGS.
- "boot": starts in real mode and makes every transition itself (lgdt, CR0.PE, far jmp, PAE page
  tables, EFER.LME through wrmsr, CR0.PG, far jmp to 64-bit), like a boot loader.
"""

from __future__ import annotations

import struct
from types import TracebackType
from typing import Self

from kvmfs import abi
from kvmfs.client import GuestMemory, Kvm, VcpuFd, VmFd

MEM_SIZE = 0x200000  # 2 MiB of RAM at guest physical 0
LOAD = 0x1000  # where the code goes
STACK = 0x7000  # initial stack pointer; below the page tables
PML4 = 0x8000  # page tables: PML4, PDPT, PD at PML4 + 0, 0x1000, 0x2000
TSS_ADDR = 0xFFFBD000  # what QEMU passes to KVM_SET_TSS_ADDR: three pages just below the BIOS
SERIAL_PORT = 0x3F8
HELLO = b"Hello, world!\n"

CR0_PE, CR0_MP, CR0_ET, CR0_NE, CR0_WP, CR0_AM, CR0_PG = 1, 2, 0x10, 0x20, 1 << 16, 1 << 18, 1 << 31
CR4_PAE = 1 << 5
EFER_LME, EFER_LMA = 1 << 8, 1 << 10
PTE_PRESENT, PTE_WRITE, PTE_PS = 1, 2, 0x80


def hexcode(*chunks: str) -> bytes:
    """Machine code from hex chunks, one instruction each, so that its source can sit beside it."""
    return bytes.fromhex("".join(chunks))


REAL_CODE = hexcode(
    # .set LOAD, 0x1000
    # .code16
    # start:
    "baf803",  # mov $0x3f8, %dx
    "be0f10",  # mov $(LOAD + msg - start), %si
    "ac",  # 1: lodsb
    "84c0",  # test %al, %al
    "7403",  # jz 2f
    "ee",  # out %al, (%dx)
    "ebf8",  # jmp 1b
    "f4",  # 2: hlt
    "48656c6c6f2c20776f726c64210a00",  # msg: .asciz "Hello, world!\n"
)

PROTECTED_CODE = hexcode(
    # .set LOAD, 0x1000
    # .code32
    # start:
    "66baf803",  # mov $0x3f8, %dx
    "be12100000",  # mov $(LOAD + msg - start), %esi
    "ac",  # 1: lodsb
    "84c0",  # test %al, %al
    "7403",  # jz 2f
    "ee",  # out %al, (%dx)
    "ebf8",  # jmp 1b
    "f4",  # 2: hlt
    "48656c6c6f2c20776f726c64210a00",  # msg: .asciz "Hello, world!\n"
)

# The same bytes decode to the same program in 64-bit mode (mov to %esi zero-extends into %rsi).
LONG_CODE = PROTECTED_CODE

BOOT_CODE = hexcode(
    # .set LOAD, 0x1000
    # .set PML4, 0x8000
    # .code16
    # start:
    "fa",  # cli
    "660f0116a810",  # lgdtl (LOAD + gdtr - start)
    "0f20c0",  # mov %cr0, %eax
    "6683c801",  # or $1, %eax
    "0f22c0",  # mov %eax, %cr0
    "66ea191000000800",  # ljmpl $0x08, $(LOAD + pm - start)
    # .code32
    # pm:
    "66b81000",  # mov $0x10, %ax
    "8ed8",  # mov %ax, %ds
    "8ec0",  # mov %ax, %es
    "8ed0",  # mov %ax, %ss
    "c7050080000003900000",  # movl $(PML4 + 0x1003), PML4
    "c7050090000003a00000",  # movl $(PML4 + 0x2003), PML4 + 0x1000
    "c70500a0000083000000",  # movl $0x83, PML4 + 0x2000
    "b800800000",  # mov $PML4, %eax
    "0f22d8",  # mov %eax, %cr3
    "0f20e0",  # mov %cr4, %eax
    "83c820",  # or $0x20, %eax
    "0f22e0",  # mov %eax, %cr4
    "b9800000c0",  # mov $0xc0000080, %ecx
    "0f32",  # rdmsr
    "0d00010000",  # or $0x100, %eax
    "0f30",  # wrmsr
    "0f20c0",  # mov %cr0, %eax
    "0d00000080",  # or $0x80000000, %eax
    "0f22c0",  # mov %eax, %cr0
    "ea721000001800",  # ljmp $0x18, $(LOAD + lm - start)
    # .code64
    # lm:
    "66baf803",  # mov $0x3f8, %dx
    "beae100000",  # mov $(LOAD + msg - start), %esi
    "ac",  # 1: lodsb
    "84c0",  # test %al, %al
    "7403",  # jz 2f
    "ee",  # out %al, (%dx)
    "ebf8",  # jmp 1b
    "f4",  # 2: hlt
    "0f1f4000",  # .balign 8
    "0000000000000000",  # gdt: .quad 0
    # Descriptors marked accessed already: the CPU would set the bit in memory when loading them,
    # which unicorn does not do for a far jump (README, "what unicorn cannot do").
    "ffff0000009bcf00",  # .quad 0x00cf9b000000ffff
    "ffff00000093cf00",  # .quad 0x00cf93000000ffff
    "ffff0000009baf00",  # .quad 0x00af9b000000ffff
    "1f00",  # gdtr: .word gdtr - gdt - 1
    "88100000",  # .long LOAD + gdt - start
    "48656c6c6f2c20776f726c64210a00",  # msg: .asciz "Hello, world!\n"
)


CODE = {"real": REAL_CODE, "protected": PROTECTED_CODE, "long": LONG_CODE, "boot": BOOT_CODE}
MODES = tuple(CODE)


def _flat_segment(selector: int, code: bool, long: bool = False) -> abi.kvm_segment:
    """A flat 4 GiB segment as a GDT descriptor would load it (accessed, present, ring 0)."""
    return abi.kvm_segment(
        base=0,
        limit=0xFFFFFFFF,
        selector=selector,
        type=11 if code else 3,
        present=1,
        dpl=0,
        db=0 if long else 1,
        s=1,
        l=1 if long else 0,
        g=1,
    )


def setup_real(vcpu: VcpuFd, entry: int = LOAD) -> None:
    """Real mode at 0000:entry; KVM's reset state has CS at 0xf000 (base 0xffff0000), which we move to 0."""
    sregs = vcpu.get_sregs()
    sregs.cs.base, sregs.cs.selector = 0, 0
    vcpu.set_sregs(sregs)
    vcpu.set_regs(abi.kvm_regs(rip=entry, rsp=STACK, rflags=2))


def setup_protected(vcpu: VcpuFd, entry: int = LOAD) -> None:
    """32-bit protected mode, paging off: hidden segment state written directly, no GDT in memory."""
    sregs = vcpu.get_sregs()
    sregs.cs = _flat_segment(0x08, code=True)
    sregs.ds = sregs.es = sregs.fs = sregs.gs = sregs.ss = _flat_segment(0x10, code=False)
    sregs.cr0 |= CR0_PE
    vcpu.set_sregs(sregs)
    vcpu.set_regs(abi.kvm_regs(rip=entry, rsp=STACK, rflags=2))


def build_page_tables(mem: GuestMemory) -> None:
    """Identity-map the first 1 GiB with 2 MiB pages (PML4[0] -> PDPT[0] -> PD), beyond RAM so MMIO is reachable."""
    pdpt, pd = PML4 + 0x1000, PML4 + 0x2000
    mem.write(PML4, struct.pack("<Q", pdpt | PTE_PRESENT | PTE_WRITE))
    mem.write(pdpt, struct.pack("<Q", pd | PTE_PRESENT | PTE_WRITE))
    mem.write(pd, b"".join(struct.pack("<Q", i << 21 | PTE_PRESENT | PTE_WRITE | PTE_PS) for i in range(512)))


def setup_long(vcpu: VcpuFd, mem: GuestMemory, entry: int = LOAD) -> None:
    """64-bit mode with the VMM's page tables, as kvm-hello-world and Firecracker enter it."""
    build_page_tables(mem)
    sregs = vcpu.get_sregs()
    sregs.cs = _flat_segment(0x08, code=True, long=True)
    sregs.ds = sregs.es = sregs.fs = sregs.gs = sregs.ss = _flat_segment(0x10, code=False)
    sregs.cr3 = PML4
    sregs.cr4 = CR4_PAE
    sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_AM | CR0_PG
    sregs.efer = EFER_LME | EFER_LMA
    vcpu.set_sregs(sregs)
    vcpu.set_regs(abi.kvm_regs(rip=entry, rsp=STACK, rflags=2))


class Machine:
    """A VM with one vcpu and RAM at guest physical 0 (slot 0) holding `code` at LOAD, set up for `mode`.

    `mode` is one of MODES; "boot" starts in real mode like "real" (its code switches modes itself).
    """

    def __init__(self, kvm: Kvm, mode: str, code: bytes, mem_size: int = MEM_SIZE, shared: bool = False) -> None:
        self.mem = GuestMemory(mem_size, shared=shared)
        self.vm: VmFd | None = None
        self.vcpu: VcpuFd | None = None
        try:
            self.vm = kvm.create_vm()
            self.vm.set_tss_addr(TSS_ADDR)
            self.vm.set_user_memory_region(0, 0, mem_size, self.mem.address)
            self.mem.write(LOAD, code)
            self.vcpu = self.vm.create_vcpu(0)
            # Without CPUID the guest has no long mode: its own wrmsr of EFER.LME would #GP.
            self.vcpu.set_cpuid2(kvm.get_supported_cpuid())
            if mode in ("real", "boot"):
                setup_real(self.vcpu)
            elif mode == "protected":
                setup_protected(self.vcpu)
            elif mode == "long":
                setup_long(self.vcpu, self.mem)
            else:
                raise ValueError(f"unknown mode {mode!r}")
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Closes the vcpu before the VM, and unmaps guest RAM last, as a VMM must."""
        if self.vcpu is not None:
            self.vcpu.close()
        if self.vm is not None:
            self.vm.close()
        self.mem.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


def run_hello(kvm: Kvm, mode: str, shared: bool = False) -> bytes:
    """Runs the hello guest for `mode` until HLT and returns what it wrote to the serial port."""
    with Machine(kvm, mode, CODE[mode], shared=shared) as machine:
        vcpu = machine.vcpu
        assert vcpu is not None
        out = bytearray()
        while (reason := vcpu.run()) != abi.KVM_EXIT_HLT:
            io = vcpu.run.io
            if reason != abi.KVM_EXIT_IO or io.direction != abi.KVM_EXIT_IO_OUT or io.port != SERIAL_PORT:
                raise RuntimeError(f"unexpected exit {reason} in {mode} mode at rip {vcpu.get_regs().rip:#x}")
            out += vcpu.io_data()
        return bytes(out)
