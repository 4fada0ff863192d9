"""The default backend: x86 guests executed by unicorn 2.1.4, with KVM's exit semantics.

One UC_MODE_64 unicorn instance per vcpu runs real, protected and long mode. Guest RAM
is the daemon's memory mapped with ``mem_map_ptr`` into every vcpu; what no slot covers
is MMIO. Exits are exact without per-instruction hooks: an IN/OUT/CPU-exception hook
saves the context (patched to KVM's post-exit view), calls ``emu_stop`` and the context
is restored once the engine has stopped; MMIO faults leave the engine at the faulting
instruction. The backend completes IN and the common MMIO forms itself (register write,
RIP advance); other MMIO instructions are single-stepped with the client's data, which
is slow (unicorn drops all translated code after a counted run).
"""

from __future__ import annotations

import ctypes
import errno
import struct
import threading
import time

import unicorn
from unicorn import x86_const as X

from kvmfs import abi
from kvmfs.backends import x86_state as S
from kvmfs.backends.base import Backend, BackendError, VcpuBackend, VmBackend

_NEVER = 0x8000_0000_0000_0001  # an emu_start "until" no guest can reach (non-canonical)
_PAGE = abi.PAGE_SIZE
_PIO_DATA = abi.KVM_PIO_PAGE_OFFSET * _PAGE
_MASK64 = (1 << 64) - 1
_KVM_CPUID_FLAG_SIGNIFCANT_INDEX = 1
_EXCEPTIONS_WITH_ERROR_CODE = frozenset((8, 10, 11, 12, 13, 14, 17, 21))
_FAULTS = frozenset((0, 5, 6, 7, 10, 11, 12, 13, 14, 16, 17, 19, 20, 21))  # these push RFLAGS.RF=1
_DR6_SINGLESTEP = 0xFFFF4FF0  # DR6.BS with the always-one bits, as /dev/kvm reports it
_CR4_ALLOWED = 0x7FF | (1 << 16) | (1 << 18) | (1 << 20) | (1 << 21) | (1 << 22)
_EFER_ALLOWED = 0x1 | S.EFER_LME | S.EFER_LMA | S.EFER_NXE
_REGS = struct.Struct("<18Q")  # kvm_regs, and QEMU's regs[16], eip, eflags
_SREGS_TAIL = struct.Struct("<7Q4Q")  # kvm_sregs from cr0: cr0 cr2 cr3 cr4 cr8 efer apic_base, interrupt_bitmap
_TRIPLE_FAULT = -1
_KICK_RETRY = 0.0005  # seconds between repeated stops while a kicked run has not ended
_KICK_PATIENCE = 0.1  # a kick gives up waiting (the run still ends at its next exit)

# the MSRs this backend keeps, in KVM_GET_MSR_INDEX_LIST order
_MSRS = (
    abi.MSR_IA32_SYSENTER_CS,
    abi.MSR_IA32_SYSENTER_ESP,
    abi.MSR_IA32_SYSENTER_EIP,
    abi.MSR_STAR,
    abi.MSR_CSTAR,
    abi.MSR_KERNEL_GS_BASE,
    abi.MSR_SYSCALL_MASK,
    abi.MSR_LSTAR,
    abi.MSR_IA32_TSC,
    abi.MSR_IA32_CR_PAT,
    abi.MSR_EFER,
    abi.MSR_FS_BASE,
    abi.MSR_GS_BASE,
    abi.MSR_IA32_APICBASE,
)
_CANONICAL_MSRS = frozenset((abi.MSR_LSTAR, abi.MSR_CSTAR, abi.MSR_FS_BASE, abi.MSR_GS_BASE, abi.MSR_KERNEL_GS_BASE))

# what KVM_GET_SUPPORTED_CPUID offers: an x86-64 CPU with the features QEMU's TCG implements
_SUPPORTED_CPUID = (
    # function, index, flags, eax, ebx, ecx, edx
    (0x0, 0, 0, 0xD, 0x756E6547, 0x6C65746E, 0x49656E69),  # "GenuineIntel"
    (0x1, 0, 0, 0x000606A6, 0x00000800, 0x80802201, 0x078BFBFF),
    (0x7, 0, 1, 0, 0, 0, 0),
    (0xD, 0, 1, 0, 0, 0, 0),
    (0x80000000, 0, 0, 0x80000008, 0, 0, 0),
    (0x80000001, 0, 0, 0, 0, 0x00000001, 0x20100800),
    (0x80000008, 0, 0, 0x3030, 0, 0, 0),
)


def _canonical(value: int) -> bool:
    return value < (1 << 47) or value >= _MASK64 - (1 << 47) + 1


class UnicornBackend(Backend):
    """Executes guests with unicorn; checks unicorn's CPU-state layout once, at start-up."""

    name = "unicorn"

    def __init__(self) -> None:
        S.verify_layout()

    def create_vm(self) -> UnicornVm:
        return UnicornVm()

    def supported_cpuid(self) -> list[abi.kvm_cpuid_entry2]:
        return [
            abi.kvm_cpuid_entry2(function=f, index=i, flags=fl, eax=a, ebx=b, ecx=c, edx=d)
            for f, i, fl, a, b, c, d in _SUPPORTED_CPUID
        ]

    def msr_index_list(self) -> list[int]:
        return list(_MSRS)


class _Slot:
    def __init__(self, gpa: int, size: int, host: int, readonly: bool) -> None:
        self.gpa, self.size, self.host, self.readonly = gpa, size, host, readonly

    @property
    def perms(self) -> int:
        if self.readonly:
            return unicorn.UC_PROT_READ | unicorn.UC_PROT_EXEC
        return unicorn.UC_PROT_ALL


class UnicornVm(VmBackend):
    """Guest physical memory shared by all vcpus: every mapping goes into every instance."""

    def __init__(self) -> None:
        self.slots: dict[int, _Slot] = {}
        self.vcpus: list[UnicornVcpu] = []

    def create_vcpu(self, vcpu_id: int) -> UnicornVcpu:
        vcpu = UnicornVcpu(self, vcpu_id)
        for slot in self.slots.values():
            vcpu.uc.mem_map_ptr(slot.gpa, slot.size, slot.perms, slot.host)
        self.vcpus.append(vcpu)
        return vcpu

    def map_memory(self, guest_phys_addr: int, size: int, host_addr: int, readonly: bool) -> None:
        slot = _Slot(guest_phys_addr, size, host_addr, readonly)
        for vcpu in self.vcpus:
            vcpu.uc.mem_map_ptr(slot.gpa, slot.size, slot.perms, slot.host)
        self.slots[guest_phys_addr] = slot

    def unmap_memory(self, guest_phys_addr: int, size: int) -> None:
        del self.slots[guest_phys_addr]
        for vcpu in self.vcpus:
            vcpu.uc.mem_unmap(guest_phys_addr, size)

    def memory_changed(self, guest_phys_addr: int, size: int) -> None:
        for vcpu in self.vcpus:
            vcpu.uc.ctl_remove_cache(guest_phys_addr, guest_phys_addr + size)

    def slot_at(self, gpa: int) -> _Slot | None:
        for slot in self.slots.values():
            if slot.gpa <= gpa < slot.gpa + slot.size:
                return slot
        return None

    def close(self) -> None:
        for vcpu in self.vcpus:
            vcpu.close()
        self.vcpus.clear()
        self.slots.clear()


class _Exit(Exception):
    """Raised inside run() to leave the loop with ``kvm_run`` filled."""


class UnicornVcpu(VcpuBackend):
    """One vcpu: a unicorn instance, its saved-context buffer and KVM's extra state."""

    def __init__(self, vm: UnicornVm, vcpu_id: int) -> None:
        self.vm = vm
        self.uc = unicorn.Uc(unicorn.UC_ARCH_X86, unicorn.UC_MODE_64)
        self.ctx = S.Context(self.uc)
        self._lock = threading.Lock()
        self._ended = threading.Condition(self._lock)  # notified when a run ends
        self._running = False
        self._kicked = False
        self._exit: tuple | None = None  # set by a hook: the exit the stopped engine owes
        self._fault: tuple[int, int, int, int] | None = None  # last memory fault: access, addr, size, value
        self._in_rip: int | None = None
        self._last_in = (0, 0)  # (count, size) of the IN exit awaiting data
        self._area: ctypes.Array | None = None
        # (rip, phys, size, decoded instruction or None) of the MMIO read awaiting client data
        self._mmio_read: tuple[int, int, int, S.MemoryAccess | None] | None = None
        self._step_read: bytes | None = None
        self._pending_irq: int | None = None
        self._debug = 0
        self._cpuid: dict[tuple[int, int], abi.kvm_cpuid_entry2] = {}
        self._cpuid_indexed: set[int] = set()
        self._maxphyaddr = 36
        self._mp_state = abi.KVM_MP_STATE_RUNNABLE
        self._cr8 = 0
        self._apic_base = 0xFEE00000 | 0x800 | (0x100 if vcpu_id == 0 else 0)
        self._tsc_offset = 0
        self._seg_shadow: dict[str, tuple[bytes, tuple]] = {}
        uc = self.uc
        self._hooks = [
            uc.hook_add(unicorn.UC_HOOK_INSN, self._on_in, None, 1, 0, X.UC_X86_INS_IN),
            uc.hook_add(unicorn.UC_HOOK_INSN, self._on_out, None, 1, 0, X.UC_X86_INS_OUT),
            uc.hook_add(unicorn.UC_HOOK_INSN, self._on_cpuid, None, 1, 0, X.UC_X86_INS_CPUID),
            uc.hook_add(unicorn.UC_HOOK_INTR, self._on_interrupt),
            uc.hook_add(unicorn.UC_HOOK_MEM_UNMAPPED | unicorn.UC_HOOK_MEM_WRITE_PROT, self._on_fault),
        ]
        self._reset()

    # --- reset state ---------------------------------------------------------------------

    def _reset(self) -> None:
        """KVM's state right after KVM_CREATE_VCPU (values read from /dev/kvm)."""
        data = self.ctx.save()
        struct.pack_into("<I", data, S.OLD_EXCEPTION, 0xFFFFFFFF)
        self.ctx.restore()
        self.set_regs(abi.kvm_regs(rdx=0x600, rip=0xFFF0, rflags=2))
        sregs = abi.kvm_sregs(cr0=0x60000010, apic_base=self._apic_base)
        for name in abi.SEGMENT_NAMES:
            setattr(sregs, name, abi.kvm_segment(limit=0xFFFF, type=3, present=1, s=1))
        sregs.cs.base, sregs.cs.selector, sregs.cs.type = 0xFFFF0000, 0xF000, 0xB
        sregs.tr.type, sregs.tr.s = 0xB, 0
        sregs.ldt.type, sregs.ldt.s = 0x2, 0
        sregs.gdt.limit = sregs.idt.limit = 0xFFFF
        self.set_sregs(sregs)
        fpu = abi.kvm_fpu(fcw=0x37F, mxcsr=0x1F80)
        self.set_fpu(fpu)
        self.uc.reg_write(X.UC_X86_REG_MSR, (abi.MSR_IA32_CR_PAT, 0x0007040600070406))
        self._tsc_offset = -time.monotonic_ns()

    # --- registers -----------------------------------------------------------------------

    def get_regs(self) -> abi.kvm_regs:
        data = self.ctx.save()
        values = _REGS.unpack_from(data, 0)
        regs = abi.kvm_regs(*(values[i] for i in S.KVM_TO_QEMU_REG))
        regs.rip, regs.rflags = values[16], values[17]
        return regs

    def set_regs(self, regs: abi.kvm_regs) -> None:
        data = self.ctx.save()
        self._write_regs(data, regs)
        self.ctx.restore()

    def _write_regs(self, data: memoryview, regs: abi.kvm_regs) -> None:
        values = _REGS.unpack(bytes(regs))
        leaves_vm86 = self.ctx.u64(S.RFLAGS) & S.RFLAGS_VM
        # /dev/kvm forces bit 1 and drops VM (checked on this host)
        rflags = (values[17] | 2) & ~S.RFLAGS_VM
        _REGS.pack_into(data, 0, *(values[i] for i in S.QEMU_TO_KVM_REG), values[16], rflags)
        if leaves_vm86:  # the only register-file change that moves QEMU's hflags
            struct.pack_into("<I", data, S.HFLAGS, S.compute_hflags(data))

    def get_sregs(self) -> abi.kvm_sregs:
        """Built as one byte string: filling the ctypes struct field by field costs 2x more."""
        data = self.ctx.save()
        parts = []
        for name in abi.SEGMENT_NAMES:
            offset = S.SEG_OFFSETS[name]
            shadow = self._seg_shadow.get(name)
            if shadow and shadow[1] == S._SEG.unpack_from(data, offset):
                parts.append(shadow[0])
            else:
                parts.append(S.segment_bytes(data, offset))
        for offset in (S.GDT, S.IDT):
            parts.append(S.KVM_DTABLE.pack(self.ctx.u64(offset + 8), data[offset + 16] | data[offset + 17] << 8))
        crs = [self.ctx.u64(S.CR + 8 * i) for i in (0, 2, 3, 4)]
        bitmap = [0] * 4
        if self._pending_irq is not None:
            bitmap[self._pending_irq // 64] = 1 << (self._pending_irq % 64)
        parts.append(_SREGS_TAIL.pack(*crs, self._cr8, self.ctx.u64(S.EFER), self._apic_base, *bitmap))
        return abi.kvm_sregs.from_buffer_copy(b"".join(parts))

    def _check_sregs(self, sregs: abi.kvm_sregs) -> None:
        """KVM's kvm_is_valid_sregs and apic-base checks: EINVAL, nothing changed."""
        cr0, cr4, efer = sregs.cr0, sregs.cr4, sregs.efer
        bad = cr0 >> 32 or (cr0 & (1 << 29) and not cr0 & (1 << 30)) or (cr0 & S.CR0_PG and not cr0 & S.CR0_PE)
        bad = bad or cr4 & ~_CR4_ALLOWED
        if efer & S.EFER_LME and cr0 & S.CR0_PG:
            bad = bad or not cr4 & S.CR4_PAE or not efer & S.EFER_LMA or sregs.cr3 >> self._maxphyaddr
        else:
            bad = bad or efer & S.EFER_LMA or sregs.cs.l
        apic = sregs.apic_base
        bad = bad or apic & 0x2FF or apic >> self._maxphyaddr or (apic & 0xC00) in (0x400, 0xC00)
        if bad:
            raise BackendError(errno.EINVAL, "invalid sregs")

    def set_sregs(self, sregs: abi.kvm_sregs) -> None:
        self._check_sregs(sregs)
        data = self.ctx.save()
        for name, offset in S.SEG_OFFSETS.items():
            seg = getattr(sregs, name)
            S.write_segment(data, offset, seg)
            self._seg_shadow[name] = (bytes(seg), S._SEG.unpack_from(data, offset))
        for name, offset in (("gdt", S.GDT), ("idt", S.IDT)):
            table = getattr(sregs, name)
            struct.pack_into("<QI", data, offset + 8, table.base, table.limit)
        for index, value in ((0, sregs.cr0), (2, sregs.cr2), (3, sregs.cr3), (4, sregs.cr4)):
            struct.pack_into("<Q", data, S.CR + 8 * index, value)
        struct.pack_into("<Q", data, S.EFER, sregs.efer)
        struct.pack_into("<I", data, S.HFLAGS, S.compute_hflags(data))
        self.ctx.restore()
        self.uc.ctl(unicorn.unicorn_const.UC_CTL_TLB_FLUSH, unicorn.unicorn_const.UC_CTL_IO_WRITE)
        if sregs.cr8 <= 0xF:
            self._cr8 = sregs.cr8
        self._apic_base = sregs.apic_base
        pending = [i * 64 + b for i, word in enumerate(sregs.interrupt_bitmap) for b in range(64) if word >> b & 1]
        self._pending_irq = pending[0] if pending else None

    def get_fpu(self) -> abi.kvm_fpu:
        return S.read_fpu(self.ctx.save())

    def set_fpu(self, fpu: abi.kvm_fpu) -> None:
        data = self.ctx.save()
        S.write_fpu(data, fpu)
        self.ctx.restore()

    # --- MSRs, CPUID, misc -------------------------------------------------------------

    def get_msr(self, index: int) -> int | None:
        if index not in _MSRS:
            return None
        if index == abi.MSR_IA32_TSC:
            return (time.monotonic_ns() + self._tsc_offset) & _MASK64
        if index == abi.MSR_IA32_APICBASE:
            return self._apic_base
        return self.uc.reg_read(X.UC_X86_REG_MSR, index)

    def set_msr(self, index: int, value: int) -> bool:
        if index not in _MSRS or (index in _CANONICAL_MSRS and not _canonical(value)):
            return False
        if index == abi.MSR_IA32_TSC:
            self._tsc_offset = value - time.monotonic_ns()
        elif index == abi.MSR_IA32_APICBASE:
            if value & 0x2FF or value >> self._maxphyaddr or (value & 0xC00) in (0x400, 0xC00):
                return False
            self._apic_base = value
        elif index == abi.MSR_EFER:
            if value & ~_EFER_ALLOWED:
                return False
            # like KVM: LMA is the CPU's to set, whatever the caller wrote
            self.ctx.save()
            lma = self.ctx.u64(S.EFER) & S.EFER_LMA
            self.uc.reg_write(X.UC_X86_REG_MSR, (index, (value & ~S.EFER_LMA) | lma))
        else:
            self.uc.reg_write(X.UC_X86_REG_MSR, (index, value))
        return True

    def set_cpuid(self, entries: list[abi.kvm_cpuid_entry2]) -> None:
        self._cpuid = {(e.function, e.index): e for e in entries}
        self._cpuid_indexed = {e.function for e in entries if e.flags & _KVM_CPUID_FLAG_SIGNIFCANT_INDEX}
        sizes = [e.eax & 0xFF for e in entries if e.function == 0x80000008]
        self._maxphyaddr = sizes[0] if sizes else 36

    def translate(self, linear_address: int) -> abi.kvm_translation:
        """KVM_TRANSLATE; like KVM, writeable is always 1 and usermode 0."""
        self.ctx.save()
        phys = self._walk(linear_address)
        return abi.kvm_translation(
            linear_address=linear_address,
            physical_address=phys if phys is not None else _MASK64,
            valid=int(phys is not None),
            writeable=1,
        )

    def queue_interrupt(self, vector: int) -> None:
        self._pending_irq = vector

    def get_mp_state(self) -> int:
        return self._mp_state

    def set_mp_state(self, state: int) -> None:
        self._mp_state = state

    def set_guest_debug(self, debug: abi.kvm_guest_debug) -> None:
        self._debug = debug.control if debug.control & abi.KVM_GUESTDBG_ENABLE else 0

    def kick(self) -> None:
        """Stop the run in progress, repeating the stop until the run has ended.

        emu_start discards a stop requested before it has begun, and a run checks the kick
        flag only between engine entries: a kick landing between the check and the start
        would be lost. The wait is short (the engine stops at its next block); no thread.
        """
        with self._lock:
            deadline = time.monotonic() + _KICK_PATIENCE
            while self._running and self.uc is not None:
                self._kicked = True
                self.uc.emu_stop()
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return
                self._ended.wait(min(remaining, _KICK_RETRY))

    def close(self) -> None:
        """Free the unicorn instance now rather than at the next cyclic GC.

        The hooks hold bound methods of this vcpu, which holds the instance: delete them,
        then release the engine explicitly, since the binding's callback wrappers form
        ctypes.cast reference cycles of their own that still point at the Uc object.
        """
        with self._lock:
            uc, self.uc = self.uc, None  # type: ignore[assignment]
        self._area = None  # the fs layer unmaps kvm_run next: no view of it may survive
        if uc is None:
            return
        for handle in self._hooks:
            uc.hook_del(handle)
        self._hooks.clear()
        self.ctx.close()
        uc._Uc__finalizer()  # uc_close; the binding does it at garbage collection otherwise

    # --- page tables ---------------------------------------------------------------------

    def _read_phys(self, address: int, size: int) -> bytes | None:
        """Guest RAM read straight from the slot's host memory (uc.mem_read costs 3 us)."""
        slot = self.vm.slot_at(address)
        if slot is None:
            return None
        return ctypes.string_at(slot.host + address - slot.gpa, min(size, slot.gpa + slot.size - address))

    def _walk(self, linear: int) -> int | None:
        """Guest-physical address of ``linear`` under the paging mode in the saved context."""
        ctx = self.ctx
        if not ctx.u64(S.CR) & S.CR0_PG:
            return linear
        cr3, cr4, efer = ctx.u64(S.CR + 24), ctx.u64(S.CR + 32), ctx.u64(S.EFER)
        addr_mask = (1 << 52) - 1 & ~0xFFF
        if efer & S.EFER_LMA:
            table, shifts, width = cr3 & addr_mask, (39, 30, 21, 12), 8
        elif cr4 & S.CR4_PAE:
            entry = self._read_phys((cr3 & ~0x1F) + 8 * ((linear >> 30) & 3), 8)
            if entry is None or not entry[0] & 1:
                return None
            table, shifts, width = int.from_bytes(entry, "little") & addr_mask, (21, 12), 8
        else:
            table, shifts, width = cr3 & 0xFFFFF000, (22, 12), 4
        index_bits = 9 if width == 8 else 10
        for level, shift in enumerate(shifts):
            raw = self._read_phys(table + width * ((linear >> shift) & ((1 << index_bits) - 1)), width)
            if raw is None:
                return None
            entry = int.from_bytes(raw, "little")
            if not entry & 1:
                return None
            large = entry & 0x80 and shift != 12 and (width == 8 or cr4 & S.CR4_PSE)
            if large and width == 4:
                base = (entry & 0xFFC00000) | ((entry >> 13) & 0xFF) << 32
                return base | (linear & 0x3FFFFF)
            if large or level == len(shifts) - 1:
                page_mask = (1 << shift) - 1
                return (entry & addr_mask & ~page_mask) | (linear & page_mask)
            table = entry & (addr_mask if width == 8 else 0xFFFFF000)
        return None

    def _read_linear(self, linear: int, size: int) -> bytes | None:
        out = b""
        while size:
            chunk = min(size, _PAGE - (linear & 0xFFF))
            phys = self._walk(linear)
            data = None if phys is None else self._read_phys(phys, chunk)
            if data is None:
                return out or None
            out, linear, size = out + data, linear + chunk, size - chunk
        return out

    def _write_linear(self, linear: int, value: bytes, rom: bool = True) -> bool:
        """Write guest RAM page by page and drop code translated from it (uc.mem_write does not,
        unlike a guest store); False at the first byte that is not RAM (or ROM, unless ``rom``)."""
        while value:
            chunk = min(len(value), _PAGE - (linear & 0xFFF))
            phys = self._walk(linear)
            slot = None if phys is None else self.vm.slot_at(phys)
            if slot is None or (slot.readonly and not rom):
                return False
            self.uc.mem_write(phys, value[:chunk])
            self.uc.ctl_remove_cache(phys, phys + chunk)
            linear, value = linear + chunk, value[chunk:]
        return True

    # --- hooks (they run inside emu_start) ---------------------------------------------

    def _stop_with(self, exit_: tuple) -> memoryview:
        """Save the context (with the real RFLAGS, which QEMU keeps lazily while running)."""
        data = self.ctx.save()
        struct.pack_into("<Q", data, S.RFLAGS, self.ctx.live_eflags())
        self._exit = exit_
        self.uc.emu_stop()
        return data

    def _decode_io(self, data: memoryview) -> tuple[int, bool, bool, int]:
        """(length, string, rep, address size in bytes) of the IN/OUT/INS/OUTS at RIP."""
        hflags = struct.unpack_from("<I", data, S.HFLAGS)[0]
        code = self._read_linear(self._linear_rip(self.ctx.u64(S.RIP)), 15) or b""
        return S.decode_io(code, hflags)

    def _on_out(self, uc: unicorn.Uc, port: int, size: int, value: int, _: object) -> None:
        if self._exit is not None:
            return
        data = self._stop_with(("io", abi.KVM_EXIT_IO_OUT, port, size, 1, value))
        length, string, rep, addr = self._decode_io(data)
        if string:
            self._advance_string(data, S.REGS + 6 * 8, size, addr, rep, length, 1)
        else:
            struct.pack_into("<Q", data, S.RIP, struct.unpack_from("<Q", data, S.RIP)[0] + length)

    def _advance_string(
        self, data: memoryview, reg: int, size: int, addr: int, rep: bool, length: int, count: int
    ) -> None:
        """KVM's state after ``count`` iterations of a string I/O instruction."""
        mask = (1 << (8 * addr)) - 1
        rflags = struct.unpack_from("<Q", data, S.RFLAGS)[0]
        step = -size if rflags & S.RFLAGS_DF else size
        pointer = struct.unpack_from("<Q", data, reg)[0]
        struct.pack_into("<Q", data, reg, (pointer & ~mask) | ((pointer + step * count) & mask))
        if rep:
            # KVM restarts a rep instruction after each exit, even the last (then RCX is 0)
            rcx = struct.unpack_from("<Q", data, S.REGS + 8)[0]
            struct.pack_into("<Q", data, S.REGS + 8, (rcx & ~mask) | (((rcx & mask) - count) & mask))
            struct.pack_into("<Q", data, S.RFLAGS, rflags | S.RFLAGS_RF)
        else:
            struct.pack_into("<Q", data, S.RIP, struct.unpack_from("<Q", data, S.RIP)[0] + length)

    def _on_in(self, uc: unicorn.Uc, port: int, size: int, _: object) -> int:
        if self._exit is not None:
            return 0
        data = self._stop_with(("io", abi.KVM_EXIT_IO_IN, port, size, 1, 0))
        _, string, rep, addr = self._decode_io(data)
        if string:
            # KVM batches INS up to the end of the destination page
            rdi = struct.unpack_from("<Q", data, S.REGS + 7 * 8)[0] & ((1 << (8 * addr)) - 1)
            rflags = struct.unpack_from("<Q", data, S.RFLAGS)[0]
            in_page = ((rdi & 0xFFF) + size if rflags & S.RFLAGS_DF else _PAGE - (rdi & 0xFFF)) // size
            rcx = struct.unpack_from("<Q", data, S.REGS + 8)[0] & ((1 << (8 * addr)) - 1)
            count = max(1, min(rcx if rep else 1, in_page, _PAGE // size))
            self._exit = ("io", abi.KVM_EXIT_IO_IN, port, size, count, 0)
        return 0

    def _on_cpuid(self, uc: unicorn.Uc, _: object) -> int:
        if self._exit is not None:
            return 1
        function = uc.reg_read(X.UC_X86_REG_EAX) & 0xFFFFFFFF
        index = uc.reg_read(X.UC_X86_REG_ECX) & 0xFFFFFFFF if function in self._cpuid_indexed else 0
        entry = self._cpuid.get((function, index)) or abi.kvm_cpuid_entry2()
        for reg, value in (
            (X.UC_X86_REG_RAX, entry.eax),
            (X.UC_X86_REG_RBX, entry.ebx),
            (X.UC_X86_REG_RCX, entry.ecx),
            (X.UC_X86_REG_RDX, entry.edx),
        ):
            uc.reg_write(reg, value)
        return 1

    def _on_interrupt(self, uc: unicorn.Uc, vector: int, _: object) -> None:
        if self._exit is not None:
            return
        data = self._stop_with(("exception", vector))
        soft = bool(struct.unpack_from("<i", data, S.EXCEPTION_IS_INT)[0])
        error = struct.unpack_from("<i", data, S.ERROR_CODE)[0] & 0xFFFFFFFF
        self._exit = ("exception", vector, soft, error if vector in _EXCEPTIONS_WITH_ERROR_CODE else None)

    def _on_fault(self, uc: unicorn.Uc, access: int, address: int, size: int, value: int, _: object) -> bool:
        if self._exit is None:
            self._fault = (access, address, size, value)
        return False

    # --- run -----------------------------------------------------------------------------

    def run(self, run: ctypes.Array) -> None:
        kvm_run = abi.kvm_run.from_buffer(run)
        self._area = run
        with self._lock:
            self._running, self._kicked = True, False
        try:
            self._complete(kvm_run, run)
            if kvm_run.immediate_exit:
                kvm_run.exit_reason = abi.KVM_EXIT_INTR
            else:
                self._loop(kvm_run)
        except _Exit:
            pass
        finally:
            with self._lock:
                self._running = False
                self._ended.notify_all()
        self.ctx.save()
        rflags = self.ctx.u64(S.RFLAGS)
        kvm_run.if_flag = int(bool(rflags & S.RFLAGS_IF))
        kvm_run.ready_for_interrupt_injection = int(bool(rflags & S.RFLAGS_IF) and self._pending_irq is None)
        kvm_run.flags = 0
        kvm_run.cr8 = self._cr8
        kvm_run.apic_base = self._apic_base

    def _rip(self) -> int:
        """The live RIP (through a context copy: cheaper than reg_read); overwrites ``ctx.data``."""
        self.ctx.save()
        return self.ctx.u64(S.RIP)

    def _complete(self, kvm_run: abi.kvm_run, run: ctypes.Array) -> None:
        """Finish the instruction the previous exit left half done, with the client's data.

        Like KVM, only if RIP is still at it (the client may have moved it).
        """
        if self._in_rip is not None:
            rip, self._in_rip = self._in_rip, None
            if self._rip() == rip:
                self._complete_in(kvm_run, run)
        if self._mmio_read is not None:
            (rip, phys, size, access), self._mmio_read = self._mmio_read, None
            if self._rip() == rip:
                raw = bytes(kvm_run.mmio.data)[:size]
                if access is None:
                    self._step_read = raw
                    self._mmio_step(kvm_run, phys)
                else:
                    self._retire(access, int.from_bytes(raw, "little"))

    def _complete_in(self, kvm_run: abi.kvm_run, run: ctypes.Array) -> None:
        """Put the client's IN data in AL/AX/EAX or, for INS, at ES:RDI, and move on as KVM does.

        Writing the result directly avoids single-stepping the IN, which costs a TB flush.
        """
        count, size = self._last_in
        raw = bytes(run[_PIO_DATA : _PIO_DATA + count * size])
        data = self.ctx.data  # current: _complete just saved it
        length, string, rep, addr = self._decode_io(data)
        if string:
            if not self._store_ins(data, raw, size, addr):
                self._internal_error(kvm_run)  # INS into MMIO or ROM: not supported
            self._advance_string(data, S.REGS + 7 * 8, size, addr, rep, length, count)
        else:
            rax = self.ctx.u64(S.REGS)
            self.ctx.put64(S.REGS, S.merge_register(rax, int.from_bytes(raw, "little"), size))
            self.ctx.put64(S.RIP, self.ctx.u64(S.RIP) + length)
        self.ctx.restore()

    def _store_ins(self, data: memoryview, raw: bytes, size: int, addr: int) -> bool:
        """Write INS data at ES:RDI onwards (downwards when DF is set); False unless all RAM."""
        rdi = self.ctx.u64(S.REGS + 7 * 8) & ((1 << (8 * addr)) - 1)
        es_base = struct.unpack_from("<Q", data, S.SEG_OFFSETS["es"] + 8)[0]
        if self.ctx.u64(S.RFLAGS) & S.RFLAGS_DF:
            items = [raw[i : i + size] for i in range(0, len(raw), size)]
            raw, rdi = b"".join(reversed(items)), rdi - len(raw) + size
        return self._write_linear(es_base + rdi, raw, rom=False)

    def _loop(self, kvm_run: abi.kvm_run) -> None:
        self.ctx.save()
        rflags = self.ctx.u64(S.RFLAGS)
        if rflags & S.RFLAGS_RF:
            # RF only marks an instruction restarted after an exit; entering the guest clears it
            self.ctx.put64(S.RFLAGS, rflags & ~S.RFLAGS_RF)
            self.ctx.restore()
        while True:
            if self._pending_irq is not None:
                vector, self._pending_irq = self._pending_irq, None
                self._deliver(kvm_run, vector, None, soft=False, external=True)
            if self._kicked:
                self._finish(kvm_run, abi.KVM_EXIT_INTR)
            stepping = bool(self._debug & abi.KVM_GUESTDBG_SINGLESTEP)
            self._exit, self._fault = None, None
            error = None
            try:
                self.uc.emu_start(self._rip(), _NEVER, 0, 1 if stepping else 0)
            except unicorn.UcError as exc:
                error = exc.errno
            if self._exit is not None or error is not None:
                self._settle(kvm_run, error)
            elif self._kicked:
                self._finish(kvm_run, abi.KVM_EXIT_INTR)
            elif not stepping:
                self._finish(kvm_run, abi.KVM_EXIT_HLT)
            if stepping:
                self._debug_exit(kvm_run, 1, self._linear_rip(), _DR6_SINGLESTEP)

    def _finish(self, kvm_run: abi.kvm_run, reason: int) -> None:
        kvm_run.exit_reason = reason
        raise _Exit

    def _linear_rip(self, rip: int | None = None) -> int:
        """CS base + RIP: the live RIP, or ``rip`` with the CS in ``ctx.data``."""
        if rip is None:
            rip = self._rip()
        return (self.ctx.u64(S.SEG_OFFSETS["cs"] + 8) + rip) & _MASK64

    def _debug_exit(self, kvm_run: abi.kvm_run, vector: int, pc: int, dr6: int) -> None:
        kvm_run.debug.arch.exception = vector
        kvm_run.debug.arch.pc = pc
        kvm_run.debug.arch.dr6 = dr6
        kvm_run.debug.arch.dr7 = 0
        self._finish(kvm_run, abi.KVM_EXIT_DEBUG)

    def _settle(self, kvm_run: abi.kvm_run, error: int | None) -> None:
        """Act on what stopped the engine: a hook's exit, else a unicorn error."""
        if self._exit is not None:
            self._handle_exit(kvm_run)
        elif error is not None:
            self._handle_error(kvm_run, error)
        else:
            self._clear_exception()

    def _handle_exit(self, kvm_run: abi.kvm_run) -> None:
        exit_ = self._exit
        self._exit = None
        struct.pack_into("<I", self.ctx.data, S.OLD_EXCEPTION, 0xFFFFFFFF)
        self.ctx.restore()
        if exit_[0] == "io":
            _, direction, port, size, count, value = exit_
            kvm_run.io.direction, kvm_run.io.size, kvm_run.io.port = direction, size, port
            kvm_run.io.count, kvm_run.io.data_offset = count, _PIO_DATA
            if direction == abi.KVM_EXIT_IO_OUT:
                self._area[_PIO_DATA : _PIO_DATA + size] = value.to_bytes(size, "little")
            else:
                self._in_rip, self._last_in = self._rip(), (count, size)
            self._finish(kvm_run, abi.KVM_EXIT_IO)
        _, vector, soft, error = exit_
        if vector == 3 and soft and self._debug & abi.KVM_GUESTDBG_USE_SW_BP:
            self.uc.reg_write(X.UC_X86_REG_RIP, self._rip() - 1)
            self._debug_exit(kvm_run, 3, self._linear_rip(), 0)
        self._deliver(kvm_run, vector, error, soft)

    def _handle_error(self, kvm_run: abi.kvm_run, error: int) -> None:
        self._clear_exception()
        if error == unicorn.UC_ERR_INSN_INVALID:
            self._deliver(kvm_run, 6, None, soft=False)
            return
        if self._fault is None:
            self._internal_error(kvm_run)
        # unicorn reports unmapped and write-protect faults by physical address
        _, phys, size, value = self._fault
        if error == unicorn.UC_ERR_READ_UNMAPPED:
            rip = self.ctx.u64(S.RIP)  # ctx.data is current: _clear_exception saved it
            self._mmio_read = (rip, phys, size, self._decode_access(phys, size, store=False))
            self._mmio_exit(kvm_run, phys, size, False, 0)
        if error in (unicorn.UC_ERR_WRITE_UNMAPPED, unicorn.UC_ERR_WRITE_PROT):
            access = self._decode_access(phys, size, store=True)
            if access is not None:  # a plain store: the access is all it does (ROM stays unchanged)
                self._retire(access)
                self._mmio_exit(kvm_run, phys, size, True, value)
            if error == unicorn.UC_ERR_WRITE_UNMAPPED:
                self._mmio_step(kvm_run, phys)
            self._rom_write(kvm_run, phys, size, value)
        self._internal_error(kvm_run)

    def _decode_access(self, phys: int, size: int, store: bool) -> S.MemoryAccess | None:
        """The instruction at RIP (in ``ctx.data``) if the backend can complete it: a known form
        whose access is the faulting one, within one page."""
        data = self.ctx.data
        rip, hflags = self.ctx.u64(S.RIP), struct.unpack_from("<I", data, S.HFLAGS)[0]
        code = self._read_linear(self._linear_rip(rip), 15) or b""
        access = S.decode_memory_access(code, hflags)
        if access is None or access.store != store or access.size != size or (phys & 0xFFF) + size > _PAGE:
            return None
        return access

    def _retire(self, access: S.MemoryAccess, loaded: int = 0) -> None:
        """Complete a decoded instruction whose memory access happened elsewhere: write the
        loaded value to its register, move RDI for stos, advance RIP (in ``ctx.data``, current)."""
        ctx = self.ctx
        if not access.store:
            offset = S.REGS + 8 * access.register
            value = S.loaded_value(access, loaded)
            ctx.put64(offset, S.merge_register(ctx.u64(offset), value, access.register_size, access.high_byte))
        if access.string:
            mask = (1 << (8 * access.address_size)) - 1
            rdi = ctx.u64(S.REGS + 7 * 8)
            step = -access.size if ctx.u64(S.RFLAGS) & S.RFLAGS_DF else access.size
            ctx.put64(S.REGS + 7 * 8, (rdi & ~mask) | ((rdi + step) & mask))
        ctx.put64(S.RIP, ctx.u64(S.RIP) + access.length)
        ctx.restore()

    def _clear_exception(self) -> None:
        """Reset unicorn's "exception in progress" marker (leaves ``ctx.data`` current)."""
        data = self.ctx.save()
        if struct.unpack_from("<I", data, S.OLD_EXCEPTION)[0] != 0xFFFFFFFF:
            struct.pack_into("<I", data, S.OLD_EXCEPTION, 0xFFFFFFFF)
            self.ctx.restore()

    def _internal_error(self, kvm_run: abi.kvm_run) -> None:
        kvm_run.internal.suberror = abi.KVM_INTERNAL_ERROR_EMULATION
        kvm_run.internal.ndata = 0
        self._finish(kvm_run, abi.KVM_EXIT_INTERNAL_ERROR)

    def _mmio_exit(self, kvm_run: abi.kvm_run, phys: int, size: int, write: bool, value: int) -> None:
        kvm_run.mmio.phys_addr, kvm_run.mmio.len, kvm_run.mmio.is_write = phys, size, int(write)
        ctypes.memmove(kvm_run.mmio.data, (value & _MASK64).to_bytes(8, "little"), 8)
        self._finish(kvm_run, abi.KVM_EXIT_MMIO)

    def _step(self) -> int | None:
        """Execute exactly one instruction (or rep iteration); the unicorn error.

        unicorn counts instructions only in code translated while counting: drop the
        cached translation of the code at RIP first (the next uncounted run drops the
        counted translations again).
        """
        linear = self._linear_rip()
        for address in {linear, self._walk(linear)} - {None}:
            self.uc.ctl_remove_cache(address & ~0xFFF, (address & ~0xFFF) + 2 * _PAGE)
        self._exit, self._fault = None, None
        try:
            self.uc.emu_start(self._rip(), _NEVER, 0, 1)
        except unicorn.UcError as exc:
            return exc.errno
        return None

    def _mmio_step(self, kvm_run: abi.kvm_run, phys: int) -> None:
        """Run the instruction that touched MMIO at ``phys`` with a temporary MMIO page there.

        A read returns ``_step_read`` (the client's data); a write is reported as the exit.
        """
        page = phys & ~0xFFF
        writes: list[tuple[int, int, int]] = []

        def read(uc: unicorn.Uc, offset: int, size: int, _: object) -> int:
            value, self._step_read = self._step_read or b"", None
            return int.from_bytes(value[:size], "little")

        def write(uc: unicorn.Uc, offset: int, size: int, value: int, _: object) -> None:
            writes.append((page + offset, size, value))

        rip = self._rip()
        self.uc.mmio_map(page, _PAGE, read, None, write, None)
        try:
            error = self._step()
        finally:
            self.uc.mem_unmap(page, _PAGE)
        if writes and self._exit is None and error is None:
            data = self.ctx.save()
            struct.pack_into("<I", data, S.OLD_EXCEPTION, 0xFFFFFFFF)
            if self.ctx.u64(S.RIP) == rip:  # a rep iteration: KVM marks the restart with RF
                self.ctx.put64(S.RFLAGS, self.ctx.u64(S.RFLAGS) | S.RFLAGS_RF)
            self.ctx.restore()
            self._mmio_exit(kvm_run, writes[0][0], writes[0][1], True, writes[0][2])
        self._settle(kvm_run, error)

    def _rom_write(self, kvm_run: abi.kvm_run, phys: int, size: int, value: int) -> None:
        """A write to a readonly slot: complete the instruction, keep the memory, exit MMIO."""
        slot = self.vm.slot_at(phys)
        if slot is None:
            self._internal_error(kvm_run)
        saved = self._read_phys(phys, size)
        self.uc.mem_protect(slot.gpa, slot.size, unicorn.UC_PROT_ALL)
        try:
            self._step()
        finally:
            self.uc.mem_write(phys, saved)
            self.uc.mem_protect(slot.gpa, slot.size, slot.perms)
        self._clear_exception()
        self._mmio_exit(kvm_run, phys, size, True, value)

    # --- exception delivery --------------------------------------------------------------

    def _deliver(
        self, kvm_run: abi.kvm_run, vector: int, error: int | None, soft: bool, external: bool = False
    ) -> None:
        """Deliver ``vector`` through the IVT/IDT; a failure escalates to #DF, then shutdown."""
        fault = vector in _FAULTS and not soft and not external
        for attempt in range(3):
            result = self._try_deliver(vector, error, soft, external)
            if result is None:
                return
            if attempt == 1 or vector == 8:
                break
            vector, error, soft = 8, 0, False
        if fault:  # KVM sets RF when it injects a fault; delivery would clear it, a triple fault leaves it
            self.ctx.save()
            self.ctx.put64(S.RFLAGS, self.ctx.u64(S.RFLAGS) | S.RFLAGS_RF)
            self.ctx.restore()
        self._finish(kvm_run, abi.KVM_EXIT_SHUTDOWN)

    def _try_deliver(self, vector: int, error: int | None, soft: bool, external: bool) -> int | None:
        data = self.ctx.save()
        ctx = self.ctx
        cr0 = ctx.u64(S.CR)
        idt_base, idt_limit = ctx.u64(S.IDT + 8), struct.unpack_from("<I", data, S.IDT + 16)[0]
        rip, rflags = ctx.u64(S.RIP), ctx.u64(S.RFLAGS)
        cs = S._SEG.unpack_from(data, S.SEG_OFFSETS["cs"])
        ss = S._SEG.unpack_from(data, S.SEG_OFFSETS["ss"])
        rsp = ctx.u64(S.REGS + 4 * 8)
        if not cr0 & S.CR0_PE:
            if vector * 4 + 3 > idt_limit:
                return _TRIPLE_FAULT
            entry = self._read_linear(idt_base + vector * 4, 4)
            if entry is None or len(entry) < 4:
                return _TRIPLE_FAULT
            ip, selector = struct.unpack("<HH", entry)
            sp = rsp & 0xFFFF
            frame = struct.pack("<HHH", rip & 0xFFFF, cs[0] & 0xFFFF, rflags & 0xFFFF)
            sp = (sp - 6) & 0xFFFF
            if not self._write_linear(ss[1] + sp, frame):
                return _TRIPLE_FAULT
            ctx.put64(S.REGS + 4 * 8, (rsp & ~0xFFFF) | sp)
            S._SEG.pack_into(data, S.SEG_OFFSETS["cs"], selector, selector << 4, cs[2], cs[3])
            ctx.put64(S.RIP, ip)
            ctx.put64(S.RFLAGS, rflags & ~(S.RFLAGS_IF | S.RFLAGS_TF | S.RFLAGS_RF | (1 << 18)))
            return self._commit(data)
        long_mode = bool(ctx.u64(S.EFER) & S.EFER_LMA)
        gate_size = 16 if long_mode else 8
        if vector * gate_size + gate_size - 1 > idt_limit:
            return _TRIPLE_FAULT
        gate = self._read_linear(idt_base + vector * gate_size, gate_size)
        if gate is None or len(gate) < gate_size:
            return _TRIPLE_FAULT
        low, high = struct.unpack_from("<II", gate)
        gate_type, gate_dpl, present = (high >> 8) & 0x1F, (high >> 13) & 3, high >> 15 & 1
        offset = (low & 0xFFFF) | (high & 0xFFFF0000)
        if long_mode:
            offset |= struct.unpack_from("<I", gate, 8)[0] << 32
        selector = low >> 16
        cpl = struct.unpack_from("<I", data, S.HFLAGS)[0] & 3
        if not present or gate_type & 0xF not in (0x6, 0x7, 0xE, 0xF) or (soft and gate_dpl < cpl):
            return _TRIPLE_FAULT
        new_cs = self._descriptor(data, selector)
        if new_cs is None or not new_cs.present or not new_cs.s or not new_cs.type & 8:
            return _TRIPLE_FAULT
        new_cpl = cpl if new_cs.type & 4 else new_cs.dpl
        new_cs.selector = (selector & ~3) | new_cpl
        tr_base = struct.unpack_from("<Q", data, S.TR + 8)[0]
        pushed_flags = rflags | (S.RFLAGS_RF if vector in _FAULTS and not soft and not external else 0)
        ist = gate[4] & 7 if long_mode else 0
        frame_values = []
        new_ss = None
        if long_mode:
            if ist or new_cpl < cpl:
                where = 0x24 + 8 * (ist - 1) if ist else 4 + 8 * new_cpl
                stack = self._read_linear(tr_base + where, 8)
                if stack is None:
                    return _TRIPLE_FAULT
                new_rsp = struct.unpack("<Q", stack)[0]
            else:
                new_rsp = rsp
            new_rsp &= ~0xF
            frame_values = [ss[0], rsp, pushed_flags, cs[0], rip]
            width = 8
            if new_cpl < cpl:
                new_ss = abi.kvm_segment(selector=new_cpl, dpl=new_cpl, unusable=1)
        else:
            width = 4 if gate_type & 8 else 2
            new_rsp = rsp & 0xFFFFFFFF
            if new_cpl < cpl:
                stack = self._read_linear(tr_base + 4 + 8 * new_cpl, 6)
                if stack is None:
                    return _TRIPLE_FAULT
                new_rsp, ss_selector = struct.unpack("<IH", stack)
                new_ss = self._descriptor(data, ss_selector)
                if new_ss is None:
                    return _TRIPLE_FAULT
                frame_values = [ss[0], rsp]
            frame_values += [pushed_flags, cs[0], rip]
        if error is not None:
            frame_values.append(error)
        mask = (1 << (8 * width)) - 1
        frame = b"".join((v & mask).to_bytes(width, "little") for v in reversed(frame_values))
        ss_base = 0 if long_mode else (new_ss.base if new_ss else ss[1])
        stack_mask = _MASK64 if long_mode else 0xFFFFFFFF if (new_ss.db if new_ss else ss[3] & S.DESC_B) else 0xFFFF
        top = (new_rsp - len(frame)) & stack_mask
        if not self._write_linear(ss_base + top, frame):
            return _TRIPLE_FAULT
        ctx.put64(S.REGS + 4 * 8, (new_rsp & ~stack_mask) | top)
        if new_ss is not None:
            S.write_segment(data, S.SEG_OFFSETS["ss"], new_ss)
        S.write_segment(data, S.SEG_OFFSETS["cs"], new_cs)
        ctx.put64(S.RIP, offset)
        cleared = S.RFLAGS_TF | S.RFLAGS_VM | S.RFLAGS_RF | (1 << 14)
        if not gate_type & 1:
            cleared |= S.RFLAGS_IF
        ctx.put64(S.RFLAGS, rflags & ~cleared)
        return self._commit(data)

    def _commit(self, data: memoryview) -> None:
        struct.pack_into("<I", data, S.HFLAGS, S.compute_hflags(data))
        struct.pack_into("<I", data, S.OLD_EXCEPTION, 0xFFFFFFFF)
        self.ctx.restore()
        return None

    def _descriptor(self, data: memoryview, selector: int) -> abi.kvm_segment | None:
        """The segment a selector names in the GDT (LDT selectors are not supported)."""
        gdt_base, gdt_limit = self.ctx.u64(S.GDT + 8), struct.unpack_from("<I", data, S.GDT + 16)[0]
        index = selector & ~7
        if selector & 4 or index == 0 or index + 7 > gdt_limit:
            return None
        raw = self._read_linear(gdt_base + index, 8)
        if raw is None or len(raw) < 8:
            return None
        return S.segment_from_descriptor(selector, int.from_bytes(raw, "little"))
