"""CPU-mode set-ups shared by the backend tests: state is set with KVM_SET_SREGS, no firmware.

Memory map of every guest: RAM 0-0xC000 (code at 0x1000, handlers at 0x1800, stack top
0x7000, page tables 0x8000-0xb000, IVT/IDT at 0/0x3000, GDT at 0x500); MMIO from 0xC000 (reachable from real mode too).
"""

from __future__ import annotations

import struct

from kvmfs import abi

from .harness import Machine, assemble

CODE, HANDLER, STACK, IDT, GDT, MMIO = 0x1000, 0x1800, 0x7000, 0x3000, 0x500, 0xD000
BITS = {"real": 16, "prot32": 32, "long64": 64}
MODES = list(BITS)

# null, 64-bit code (8), flat data (0x10), 32-bit code (0x18)
_GDT = struct.pack("<4Q", 0, 0x00AF9B000000FFFF, 0x00CF93000000FFFF, 0x00CF9B000000FFFF)


def _segment(selector: int, type_: int, **fields: int) -> abi.kvm_segment:
    return abi.kvm_segment(base=0, limit=0xFFFFFFFF, selector=selector, type=type_, present=1, s=1, g=1, **fields)


def setup(m: Machine, mode: str, code: str, handler: str = "hlt") -> None:
    """RAM, the assembled guest at CODE (and ``handler`` at HANDLER), vcpu in ``mode``."""
    bits = BITS[mode]
    m.map(0, 0xC000)
    m.write(CODE, assemble(code, bits, CODE))
    m.write(HANDLER, assemble(handler, bits, HANDLER))
    m.write(GDT, _GDT)
    sregs = m.vcpu.get_sregs()
    if mode == "real":
        m.write(0, struct.pack("<HH", HANDLER, 0) * 32)  # IVT: vectors 0-31 -> 0:HANDLER
        sregs.cs.base, sregs.cs.selector = 0, 0
    else:
        long = mode == "long64"
        gate = (HANDLER & 0xFFFF) | (8 if long else 0x18) << 16 | (0x8E00 << 32) | (HANDLER >> 16) << 48
        entry = struct.pack("<QQ", gate, 0) if long else struct.pack("<Q", gate)
        m.write(IDT, entry * 32)
        sregs.idt.base, sregs.idt.limit = IDT, 32 * len(entry) - 1
        sregs.gdt.base, sregs.gdt.limit = GDT, len(_GDT) - 1
        data = _segment(0x10, 3, db=1)
        for name in ("ds", "es", "fs", "gs", "ss"):
            setattr(sregs, name, data)
        sregs.tr = abi.kvm_segment(limit=0x67, type=0xB, present=1)
        sregs.cr0 = 0x60000011
        if long:
            sregs.cs = _segment(8, 0xB, l=1)
            m.write(0x8000, struct.pack("<Q", 0x9003))  # PML4[0] -> PDPT
            m.write(0x9000, struct.pack("<Q", 0xA003))  # PDPT[0] -> PD
            m.write(0xA000, struct.pack("<Q", 0x83))  # PD[0]: 2 MiB identity page
            sregs.cr3, sregs.cr4, sregs.efer = 0x8000, 0x20, 0x500
            sregs.cr0 |= 0x80000000
        else:
            sregs.cs = _segment(0x18, 0xB, db=1)
    m.vcpu.set_sregs(sregs)
    regs = m.vcpu.get_regs()
    regs.rip, regs.rsp = CODE, STACK
    m.vcpu.set_regs(regs)
