"""Unicorn's x86 CPU state as raw bytes: the layout of a saved context, and KVM's view of it.

Unicorn has no API for hidden segment state, EFER-driven mode bits or QEMU's ``hflags``,
while KVM_SET_SREGS sets them directly. So the backend saves a context, patches the
CPUX86State copy inside it and restores it. This module knows where the fields live
(QEMU 5 as built into unicorn 2.1.4), checks that at import time against the running
library, and converts between that layout and the kvm_* structs. It also decodes the
few instruction forms whose IN/MMIO exits the backend completes without unicorn.
"""

from __future__ import annotations

import ctypes
import functools
import struct
from typing import NamedTuple

import unicorn
from unicorn import x86_const as X
from unicorn.unicorn_py3.unicorn import uclib

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
QEMU_TO_KVM_REG = tuple(KVM_TO_QEMU_REG.index(i) for i in range(16))

# QEMU hflags bits (target/i386/cpu.h)
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
DESC_L = 1 << 21
DESC_B = 1 << 22

CR0_PE, CR0_PG = 1, 1 << 31
CR4_PAE, CR4_PSE, CR4_OSFXSR, CR4_SMAP = 1 << 5, 1 << 4, 1 << 9, 1 << 21
EFER_LME, EFER_LMA, EFER_NXE = 1 << 8, 1 << 10, 1 << 11
RFLAGS_TF, RFLAGS_IF, RFLAGS_DF, RFLAGS_RF, RFLAGS_VM = 1 << 8, 1 << 9, 1 << 10, 1 << 16, 1 << 17

_Q = struct.Struct("<Q")
_SEG = struct.Struct("<I4xQII")


class LayoutError(RuntimeError):
    """The unicorn library does not keep its CPU state where this module expects it."""


class Context:
    """A preallocated unicorn context with a writable view of its CPUX86State bytes.

    Exits read and patch registers here rather than with ``reg_read``/``reg_write``: the
    binding's per-register type dispatch costs ~5 us a call, a whole-context copy ~1.4 us.
    """

    def __init__(self, uc: unicorn.Uc) -> None:
        self.uc: unicorn.Uc | None = uc
        self.saved: unicorn.UcContext | None = uc.context_save()
        address = self.saved.context.value
        header = ctypes.c_size_t.from_address(address).value  # uc_context.context_size
        self.data = memoryview((ctypes.c_char * header).from_address(address + self.saved.size - header)).cast("B")
        self._eflags = ctypes.c_uint64()

    def save(self) -> memoryview:
        self.uc.context_update(self.saved)
        return self.data

    def restore(self) -> None:
        self.uc.context_restore(self.saved)

    def live_eflags(self) -> int:
        """EFLAGS with QEMU's lazily computed arithmetic flags folded in (a context copy lacks
        them inside a hook). Called directly: the binding's reg_read is 5x slower."""
        uclib.uc_reg_read(self.uc._uch, X.UC_X86_REG_EFLAGS, ctypes.byref(self._eflags))
        return self._eflags.value

    def close(self) -> None:
        """Free the context buffer; ``data`` must not be used afterwards."""
        self.data.release()
        self.uc = self.saved = None

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
    # the binding internals the backend uses: the raw handle (fast EFLAGS read) and the finalizer (close)
    if ctx.live_eflags() & 2 != 2 or not callable(getattr(uc, "_Uc__finalizer", None)):
        raise LayoutError(f"unicorn {unicorn.__version__}: binding internals moved")


# --- segments -------------------------------------------------------------------------


_KVM_SEGMENT = struct.Struct("<QIH10B")  # kvm_segment
KVM_DTABLE = struct.Struct("<QH6x")  # kvm_dtable


def segment_bytes(data: memoryview, offset: int) -> bytes:
    """KVM's view of a SegmentCache, as kvm_segment bytes (cheaper than filling the struct).

    QEMU marks an unusable segment by a clear P bit. A loaded code/data segment shows
    "accessed": the CPU sets it on every load, QEMU only for data segments (so a far jump
    to a descriptor without it would read differently from KVM).
    """
    selector, base, limit, flags = _SEG.unpack_from(data, offset)
    present = (flags >> 15) & 1
    code_or_data = (flags >> 12) & 1  # the descriptor's S bit
    kind = (flags >> 8) & 15 | (present & code_or_data)
    dpl, db, long_ = (flags >> 13) & 3, (flags >> 22) & 1, (flags >> 21) & 1
    granular, avl = (flags >> 23) & 1, (flags >> 20) & 1
    return _KVM_SEGMENT.pack(
        base, limit, selector & 0xFFFF, kind, present, dpl, db, code_or_data, long_, granular, avl, 1 - present, 0
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


_FPU_CONTROL = struct.Struct("<HHBxHQQ")  # kvm_fpu from fcw to last_dp
_FPU_TAIL = struct.Struct("<I4x")  # mxcsr, pad2


def read_fpu(data: memoryview) -> abi.kvm_fpu:
    """kvm_fpu (FXSAVE layout: ST-relative registers, abridged tag word) from QEMU's state.

    Built as one byte string: filling the ctypes arrays field by field costs 4x more.
    """
    top = data[FPSTT] & 7
    stack = bytes(data[FPREGS : FPREGS + 128])
    fpr = b"".join(stack[16 * ((top + i) & 7) :][:10] + bytes(6) for i in range(8))
    ftwx = sum(1 << i for i, tag in enumerate(data[FPTAGS : FPTAGS + 8]) if not tag)
    fsw = (struct.unpack_from("<H", data, FPUS)[0] & ~0x3800) | (top << 11)
    fcw, fop = struct.unpack_from("<H", data, FPUC)[0], struct.unpack_from("<H", data, FPOP)[0]
    control = _FPU_CONTROL.pack(fcw, fsw, ftwx, fop, _Q.unpack_from(data, FPIP)[0], _Q.unpack_from(data, FPDP)[0])
    xmm = b"".join(data[XMM + 64 * i : XMM + 64 * i + 16] for i in range(16))
    tail = _FPU_TAIL.pack(struct.unpack_from("<I", data, MXCSR)[0])
    return abi.kvm_fpu.from_buffer_copy(fpr + control + xmm + tail)


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


# --- instruction decoding -------------------------------------------------------------
#
# An MMIO access stops the engine at the instruction with the address and size of the
# access. For the common forms below the backend completes the instruction itself
# (register write, RIP advance) instead of single-stepping it, which costs a TB flush.

_SEGMENT_PREFIXES = frozenset((0x26, 0x2E, 0x36, 0x3E, 0x64, 0x65))
_IO_PREFIXES = frozenset((0x66, 0xF0, *_SEGMENT_PREFIXES))


@functools.lru_cache(maxsize=1024)
def decode_io(code: bytes, hflags: int) -> tuple[int, bool, bool, int]:
    """(length, string, rep, address size in bytes) of the IN/OUT/INS/OUTS at the start of ``code``."""
    long_mode = bool(hflags & HF_CS64)
    addr = 8 if long_mode else 4 if hflags & HF_CS32 else 2
    rep = False
    for length, byte in enumerate(code):
        if byte == 0x67:
            addr = 4 if long_mode or not hflags & HF_CS32 else 2
        elif byte in (0xF2, 0xF3):
            rep = True
        elif byte not in _IO_PREFIXES and not (long_mode and 0x40 <= byte <= 0x4F):
            return length + (2 if byte in (0xE4, 0xE5, 0xE6, 0xE7) else 1), 0x6C <= byte <= 0x6F, rep, addr
    return 1, False, False, addr


class MemoryAccess(NamedTuple):
    """An instruction whose only effects are one memory access, a register and RIP."""

    length: int  # bytes of the instruction
    store: bool
    size: int  # bytes accessed
    register: int  # QEMU regs[] index a load writes (0 for stores)
    register_size: int  # bytes of that register written (after extension)
    high_byte: bool  # AH/CH/DH/BH
    signed: bool  # movsx/movsxd: sign-extend, else zero-extend
    string: bool  # stos: RDI moves by ``size``
    address_size: int  # bytes


@functools.lru_cache(maxsize=1024)  # pure, and the same few instructions exit again and again
def decode_memory_access(code: bytes, hflags: int) -> MemoryAccess | None:
    """Decode mov/movzx/movsx/movsxd to or from memory, mov imm to memory, moffs moves and
    stos without rep; None for anything else (the caller single-steps those)."""
    try:
        return _decode(code, hflags)
    except IndexError:  # the code ended (unreadable page): not a form this decoder vouches for
        return None


def _decode(code: bytes, hflags: int) -> MemoryAccess | None:
    long_mode = bool(hflags & HF_CS64)
    default = 4 if hflags & HF_CS32 else 2
    operand, address, i = default, 8 if long_mode else default, 0
    while code[i] in _SEGMENT_PREFIXES or code[i] in (0x66, 0x67):
        if code[i] == 0x66:
            operand = 6 - default  # 4 <-> 2
        elif code[i] == 0x67:
            address = 4 if long_mode or default == 2 else 2
        i += 1
    rex = code[i] if long_mode and 0x40 <= code[i] <= 0x4F else 0
    i += bool(rex)
    if rex & 8:
        operand = 8
    opcode, i = code[i], i + 1
    wide = operand if opcode & 1 else 1
    if 0xA0 <= opcode <= 0xA3:  # mov al/ax/eax/rax <-> moffs
        return MemoryAccess(i + address, opcode >= 0xA2, wide, 0, wide, False, False, False, address)
    if opcode in (0xAA, 0xAB):  # stos
        return MemoryAccess(i, True, wide, 0, wide, False, False, True, address)
    extend = None
    if opcode == 0x0F:
        opcode, i = 0x0F00 | code[i], i + 1
        if opcode not in (0x0FB6, 0x0FB7, 0x0FBE, 0x0FBF):
            return None
        extend = (2 if opcode & 1 else 1, opcode >= 0x0FBE)
    elif opcode == 0x63 and rex & 8:  # movsxd
        extend = (4, True)
    elif opcode not in (0x88, 0x89, 0x8A, 0x8B, 0xC6, 0xC7):
        return None
    modrm = code[i]
    length = _modrm_length(code, i, address)
    if length is None or (opcode in (0xC6, 0xC7) and modrm & 0x38):
        return None
    i += length
    if opcode in (0xC6, 0xC7):  # mov r/m, imm (imm32 sign-extended for 64-bit operands)
        return MemoryAccess(i + min(wide, 4), True, wide, 0, wide, False, False, False, address)
    register = ((rex & 4) << 1) | ((modrm >> 3) & 7)
    if extend:
        size, signed = extend
        return MemoryAccess(i, False, size, register, operand, False, signed, False, address)
    high = wide == 1 and not rex and register >= 4
    register = register - 4 if high else register
    return MemoryAccess(i, opcode < 0x8A, wide, register, wide, high, False, False, address)


def _modrm_length(code: bytes, i: int, address: int) -> int | None:
    """Bytes of ModRM, SIB and displacement at ``code[i]``; None for a register operand."""
    mod, rm = code[i] >> 6, code[i] & 7
    if mod == 3:
        return None
    if address == 2:
        return 1 + (2 if mod == 2 or (mod == 0 and rm == 6) else mod)
    sib = rm == 4
    base = code[i + 1] & 7 if sib else rm
    displacement = 4 if mod == 2 or (mod == 0 and base == 5) else mod
    return 1 + sib + displacement


def loaded_value(access: MemoryAccess, raw: int) -> int:
    """The value a load puts in its register, after movzx/movsx extension."""
    if access.signed and raw >> (8 * access.size - 1):
        raw -= 1 << (8 * access.size)
    return raw & ((1 << (8 * access.register_size)) - 1)


def merge_register(old: int, value: int, size: int, high_byte: bool = False) -> int:
    """A 64-bit register after writing ``size`` bytes: 1 and 2 keep the rest, 4 zero-extends."""
    if high_byte:
        return (old & ~0xFF00) | (value & 0xFF) << 8
    if size >= 4:
        return value & ((1 << (8 * size)) - 1)
    mask = (1 << (8 * size)) - 1
    return (old & ~mask) | (value & mask)
