"""Unicorn's x86 CPU state as raw bytes: the layout of a saved context, and KVM's view of it.

Unicorn has no API for hidden segment state, EFER-driven mode bits or QEMU's ``hflags``,
while KVM_SET_SREGS sets them directly. So the backend saves a context, patches the
CPUX86State copy inside it and restores it. This module knows where the fields live
(QEMU 5 as built into unicorn 2.1.4), checks that at import time against the running
library, and converts between that layout and the kvm_* structs.
"""

from __future__ import annotations

import ctypes
import struct

import unicorn
from unicorn import x86_const as X

from kvmfs import abi

# --- CPUX86State offsets inside a context's data (verified by verify_layout) -----------

REGS = 0x000  # target_ulong regs[16], QEMU order: ax cx dx bx sp bp si di r8..r15
RIP = 0x080
RFLAGS = 0x088
HFLAGS = 0x0B0
SEGS = 0x0B8  # SegmentCache {u32 selector; u64 base; u32 limit; u32 flags} x 6: es cs ss ds fs gs
LDT = 0x148
TR = 0x160
GDT = 0x178
IDT = 0x190
CR = 0x1A8  # target_ulong cr[5]
EFER = 0x250
FPSTT = 0x25C
FPUS = 0x260
FPUC = 0x262
FPTAGS = 0x264
FPREGS = 0x270
FPOP = 0x2F0
FPIP = 0x2F8
FPDP = 0x300
MXCSR = 0x330
XMM = 0x338  # ZMMReg xmm_regs[], 64 bytes each
ERROR_CODE = 0x1508
EXCEPTION_IS_INT = 0x150C
DR = 0x1518
OLD_EXCEPTION = 0x1578  # "exception in progress": unicorn never resets it by itself

SEG_SIZE = 24
# kvm_sregs segment name -> offset of its SegmentCache
SEG_OFFSETS = {
    "es": SEGS,
    "cs": SEGS + SEG_SIZE,
    "ss": SEGS + 2 * SEG_SIZE,
    "ds": SEGS + 3 * SEG_SIZE,
    "fs": SEGS + 4 * SEG_SIZE,
    "gs": SEGS + 5 * SEG_SIZE,
    "ldt": LDT,
    "tr": TR,
}
# kvm_regs field order -> QEMU regs[] index
KVM_TO_QEMU_REG = (0, 3, 1, 2, 6, 7, 4, 5, *range(8, 16))

# QEMU hflags bits (target/i386/cpu.h)
HF_CPL_MASK = 3
HF_CS32 = 1 << 4
HF_SS32 = 1 << 5
HF_ADDSEG = 1 << 6
HF_PE = 1 << 7
HF_MP_SHIFT = 9  # MP, EM, TS follow: cr0 bits 1..3 shifted by 8
HF_LMA = 1 << 14
HF_CS64 = 1 << 15
HF_OSFXSR = 1 << 22
HF_SMAP = 1 << 23
HF_KEEP = (1 << 3) | (1 << 19) | (1 << 20) | (1 << 21) | (1 << 24) | (1 << 25) | (1 << 26)

# descriptor bits as QEMU keeps them in SegmentCache.flags (the descriptor's high dword)
DESC_P = 1 << 15
DESC_L = 1 << 21
DESC_B = 1 << 22

CR0_PE, CR0_PG = 1, 1 << 31
CR4_PAE, CR4_PSE, CR4_OSFXSR, CR4_SMAP = 1 << 5, 1 << 4, 1 << 9, 1 << 21
EFER_LME, EFER_LMA, EFER_NXE = 1 << 8, 1 << 10, 1 << 11
RFLAGS_TF, RFLAGS_IF, RFLAGS_RF, RFLAGS_VM = 1 << 8, 1 << 9, 1 << 16, 1 << 17

_Q = struct.Struct("<Q")
_SEG = struct.Struct("<I4xQII")


class LayoutError(RuntimeError):
    """The unicorn library does not keep its CPU state where this module expects it."""


class Context:
    """A preallocated unicorn context with a writable view of its CPUX86State bytes."""

    def __init__(self, uc: unicorn.Uc) -> None:
        self.uc = uc
        self.saved = uc.context_save()
        address = self.saved.context.value
        header = ctypes.c_size_t.from_address(address).value  # uc_context.context_size
        self.data = memoryview((ctypes.c_char * header).from_address(address + self.saved.size - header)).cast("B")

    def save(self) -> memoryview:
        self.uc.context_update(self.saved)
        return self.data

    def restore(self) -> None:
        self.uc.context_restore(self.saved)

    def u64(self, offset: int) -> int:
        return _Q.unpack_from(self.data, offset)[0]

    def put64(self, offset: int, value: int) -> None:
        _Q.pack_into(self.data, offset, value & 0xFFFFFFFFFFFFFFFF)


def verify_layout() -> None:
    """Fail loudly unless the offsets above are where this unicorn keeps the fields."""
    uc = unicorn.Uc(unicorn.UC_ARCH_X86, unicorn.UC_MODE_64)
    probes = [
        (X.UC_X86_REG_RAX, 0x1111222233334441, REGS),
        (X.UC_X86_REG_RBX, 0x1111222233334442, REGS + 3 * 8),
        (X.UC_X86_REG_R15, 0x1111222233334443, REGS + 15 * 8),
        (X.UC_X86_REG_RIP, 0x1111222233334444, RIP),
        (X.UC_X86_REG_FS_BASE, 0x1111222233334445, SEG_OFFSETS["fs"] + 8),
        (X.UC_X86_REG_GS_BASE, 0x1111222233334446, SEG_OFFSETS["gs"] + 8),
        (X.UC_X86_REG_CR3, 0x1111222233334000, CR + 3 * 8),
        (X.UC_X86_REG_CR2, 0x1111222233334447, CR + 2 * 8),
        (X.UC_X86_REG_DR0, 0x1111222233334448, DR),
        (X.UC_X86_REG_FIP, 0x1111222233334449, FPIP),
        (X.UC_X86_REG_FDP, 0x111122223333444A, FPDP),
    ]
    for reg, value, _ in probes:
        uc.reg_write(reg, value)
    uc.reg_write(X.UC_X86_REG_GDTR, (0, 0x2222333344445555, 0x1234, 0))
    uc.reg_write(X.UC_X86_REG_IDTR, (0, 0x2222333344446666, 0x4321, 0))
    uc.reg_write(X.UC_X86_REG_MSR, (abi.MSR_EFER, 0xD01))
    uc.reg_write(X.UC_X86_REG_FPCW, 0x1A7F)
    uc.reg_write(X.UC_X86_REG_MXCSR, 0x1F81)
    uc.reg_write(X.UC_X86_REG_XMM1, 0x99887766554433221100FFEEDDCCBBAA)
    ctx = Context(uc)
    data = ctx.save()
    checks = [(offset, value, 8) for _, value, offset in probes]
    checks += [
        (GDT + 8, 0x2222333344445555, 8),
        (GDT + 16, 0x1234, 4),
        (IDT + 8, 0x2222333344446666, 8),
        (IDT + 16, 0x4321, 4),
        (EFER, 0xD01, 8),
        (FPUC, 0x1A7F, 2),
        (MXCSR, 0x1F81, 4),
        (XMM + 64, 0x99887766554433221100FFEEDDCCBBAA, 16),
        (OLD_EXCEPTION, 0xFFFFFFFF, 4),
    ]
    for offset, value, width in checks:
        found = int.from_bytes(data[offset : offset + width], "little")
        if found != value:
            raise LayoutError(f"unicorn {unicorn.__version__}: expected {value:#x} at {offset:#x}, found {found:#x}")


# --- segments -------------------------------------------------------------------------


def read_segment(data: memoryview, offset: int) -> abi.kvm_segment:
    """KVM's view of a SegmentCache; QEMU marks an unusable segment by a clear P bit."""
    selector, base, limit, flags = _SEG.unpack_from(data, offset)
    present = (flags >> 15) & 1
    return abi.kvm_segment(
        base=base,
        limit=limit,
        selector=selector & 0xFFFF,
        type=(flags >> 8) & 15,
        present=present,
        dpl=(flags >> 13) & 3,
        db=(flags >> 22) & 1,
        s=(flags >> 12) & 1,
        l=(flags >> 21) & 1,
        g=(flags >> 23) & 1,
        avl=(flags >> 20) & 1,
        unusable=1 - present,
    )


def segment_flags(seg: abi.kvm_segment) -> int:
    present = seg.present and not seg.unusable
    return (
        (seg.type & 15) << 8
        | (seg.s & 1) << 12
        | (seg.dpl & 3) << 13
        | int(bool(present)) << 15
        | (seg.avl & 1) << 20
        | (seg.l & 1) << 21
        | (seg.db & 1) << 22
        | (seg.g & 1) << 23
    )


def write_segment(data: memoryview, offset: int, seg: abi.kvm_segment) -> None:
    _SEG.pack_into(data, offset, seg.selector, seg.base, seg.limit, segment_flags(seg))


def segment_from_descriptor(selector: int, raw: int) -> abi.kvm_segment:
    """A kvm_segment loaded from an 8-byte GDT/LDT descriptor (as the CPU would load it)."""
    limit = (raw & 0xFFFF) | ((raw >> 32) & 0xF0000)
    flags = raw >> 32
    if flags & (1 << 23):
        limit = (limit << 12) | 0xFFF
    base = ((raw >> 16) & 0xFFFFFF) | ((raw >> 32) & 0xFF000000)
    return abi.kvm_segment(
        base=base,
        limit=limit,
        selector=selector,
        type=(flags >> 8) & 15,
        present=(flags >> 15) & 1,
        dpl=(flags >> 13) & 3,
        db=(flags >> 22) & 1,
        s=(flags >> 12) & 1,
        l=(flags >> 21) & 1,
        g=(flags >> 23) & 1,
        avl=(flags >> 20) & 1,
        unusable=0,
    )


def compute_hflags(data: memoryview) -> int:
    """QEMU's cached mode bits for the CR0/CR4/EFER/segments now in ``data``.

    The same derivation as cpu_x86_update_cr0/cr4, cpu_load_efer and
    cpu_x86_load_seg_cache, so translated code sees the mode KVM_SET_SREGS set.
    """
    old = struct.unpack_from("<I", data, HFLAGS)[0]
    cr0 = _Q.unpack_from(data, CR)[0]
    cr4 = _Q.unpack_from(data, CR + 32)[0]
    efer = _Q.unpack_from(data, EFER)[0]
    rflags = _Q.unpack_from(data, RFLAGS)[0]
    cs_flags = struct.unpack_from("<I", data, SEG_OFFSETS["cs"] + 20)[0]
    ss_flags = struct.unpack_from("<I", data, SEG_OFFSETS["ss"] + 20)[0]
    hflags = old & HF_KEEP
    hflags |= ((cr0 >> 1) & 7) << HF_MP_SHIFT
    if cr4 & CR4_OSFXSR:
        hflags |= HF_OSFXSR
    if cr4 & CR4_SMAP:
        hflags |= HF_SMAP
    if efer & EFER_LMA:
        hflags |= HF_LMA
    if cr0 & CR0_PE:
        hflags |= HF_PE
        hflags |= 3 if rflags & RFLAGS_VM else (ss_flags >> 13) & 3
    if hflags & HF_LMA and cs_flags & DESC_L:
        hflags |= HF_CS32 | HF_SS32 | HF_CS64
    else:
        if cs_flags & DESC_B:
            hflags |= HF_CS32
        if ss_flags & DESC_B:
            hflags |= HF_SS32
    if not hflags & HF_CS64:
        bases = [_SEG.unpack_from(data, SEG_OFFSETS[name])[1] for name in ("ds", "es", "ss")]
        if not cr0 & CR0_PE or rflags & RFLAGS_VM or not hflags & HF_CS32 or any(bases):
            hflags |= HF_ADDSEG
    return hflags


# --- FPU ------------------------------------------------------------------------------


def read_fpu(data: memoryview) -> abi.kvm_fpu:
    """kvm_fpu (FXSAVE layout: ST-relative registers, abridged tag word) from QEMU's state."""
    top = struct.unpack_from("<I", data, FPSTT)[0] & 7
    fpu = abi.kvm_fpu()
    fpu.fcw = struct.unpack_from("<H", data, FPUC)[0]
    fpu.fsw = (struct.unpack_from("<H", data, FPUS)[0] & ~0x3800) | (top << 11)
    fpu.ftwx = sum(1 << i for i in range(8) if not data[FPTAGS + i])
    for i in range(8):
        offset = FPREGS + 16 * ((top + i) & 7)
        ctypes.memmove(fpu.fpr[i], bytes(data[offset : offset + 10]), 10)
    fpu.last_opcode = struct.unpack_from("<H", data, FPOP)[0]
    fpu.last_ip = _Q.unpack_from(data, FPIP)[0]
    fpu.last_dp = _Q.unpack_from(data, FPDP)[0]
    for i in range(16):
        ctypes.memmove(fpu.xmm[i], bytes(data[XMM + 64 * i : XMM + 64 * i + 16]), 16)
    fpu.mxcsr = struct.unpack_from("<I", data, MXCSR)[0]
    return fpu


def write_fpu(data: memoryview, fpu: abi.kvm_fpu) -> None:
    top = (fpu.fsw >> 11) & 7
    struct.pack_into("<I", data, FPSTT, top)
    struct.pack_into("<H", data, FPUS, fpu.fsw & ~0x3800)
    struct.pack_into("<H", data, FPUC, fpu.fcw)
    for i in range(8):
        data[FPTAGS + i] = 0 if fpu.ftwx & (1 << i) else 1
        offset = FPREGS + 16 * ((top + i) & 7)
        data[offset : offset + 10] = bytes(fpu.fpr[i])[:10]
    struct.pack_into("<H", data, FPOP, fpu.last_opcode)
    _Q.pack_into(data, FPIP, fpu.last_ip)
    _Q.pack_into(data, FPDP, fpu.last_dp)
    for i in range(16):
        data[XMM + 64 * i : XMM + 64 * i + 16] = bytes(fpu.xmm[i])
    struct.pack_into("<I", data, MXCSR, fpu.mxcsr)
