"""The KVM ABI of <linux/kvm.h> and <asm/kvm.h> (x86-64): ioctl numbers, structs, constants.

This is the only module that spells an ioctl number or a struct layout. Everything
else imports names from here, so a reader can check kvmfs against the kernel
header in one place. Layouts are checked against the header by tests/test_abi.py.
"""

from __future__ import annotations

import ctypes
from ctypes import c_char, c_uint8, c_uint16, c_uint32, c_uint64

# --- ioctl number encoding (asm-generic/ioctl.h) --------------------------------

_IOC_NRBITS, _IOC_TYPEBITS, _IOC_SIZEBITS = 8, 8, 14
_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = _IOC_NRSHIFT + _IOC_NRBITS
_IOC_SIZESHIFT = _IOC_TYPESHIFT + _IOC_TYPEBITS
_IOC_DIRSHIFT = _IOC_SIZESHIFT + _IOC_SIZEBITS
IOC_NONE, IOC_WRITE, IOC_READ = 0, 1, 2


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << _IOC_DIRSHIFT) | (KVMIO << _IOC_TYPESHIFT) | (nr << _IOC_NRSHIFT) | (size << _IOC_SIZESHIFT)


def _io(nr: int) -> int:
    return _ioc(IOC_NONE, nr, 0)


def _ior(nr: int, struct: type) -> int:
    return _ioc(IOC_READ, nr, ctypes.sizeof(struct))


def _iow(nr: int, struct: type) -> int:
    return _ioc(IOC_WRITE, nr, ctypes.sizeof(struct))


def _iowr(nr: int, struct: type) -> int:
    return _ioc(IOC_READ | IOC_WRITE, nr, ctypes.sizeof(struct))


KVMIO = 0xAE
KVM_API_VERSION = 12
PAGE_SIZE = 4096


class _Struct(ctypes.Structure):
    """A C struct with field-by-field equality and a readable repr, for tests and debugging."""

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and bytes(self) == bytes(other)  # type: ignore[call-overload]

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name, *_ in self._fields_)
        return f"{type(self).__name__}({fields})"


# --- structs ---------------------------------------------------------------------


class kvm_regs(_Struct):
    _fields_ = [
        (name, c_uint64) for name in "rax rbx rcx rdx rsi rdi rsp rbp r8 r9 r10 r11 r12 r13 r14 r15 rip rflags".split()
    ]


class kvm_segment(_Struct):
    _fields_ = [
        ("base", c_uint64),
        ("limit", c_uint32),
        ("selector", c_uint16),
        ("type", c_uint8),
        ("present", c_uint8),
        ("dpl", c_uint8),
        ("db", c_uint8),
        ("s", c_uint8),
        ("l", c_uint8),
        ("g", c_uint8),
        ("avl", c_uint8),
        ("unusable", c_uint8),
        ("padding", c_uint8),
    ]


class kvm_dtable(_Struct):
    _fields_ = [("base", c_uint64), ("limit", c_uint16), ("padding", c_uint16 * 3)]


KVM_NR_INTERRUPTS = 256
SEGMENT_NAMES = ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")


class kvm_sregs(_Struct):
    _fields_ = [
        *((name, kvm_segment) for name in SEGMENT_NAMES),
        ("gdt", kvm_dtable),
        ("idt", kvm_dtable),
        *((name, c_uint64) for name in ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base")),
        ("interrupt_bitmap", c_uint64 * ((KVM_NR_INTERRUPTS + 63) // 64)),
    ]


class kvm_fpu(_Struct):
    _fields_ = [
        ("fpr", (c_uint8 * 16) * 8),
        ("fcw", c_uint16),
        ("fsw", c_uint16),
        ("ftwx", c_uint8),
        ("pad1", c_uint8),
        ("last_opcode", c_uint16),
        ("last_ip", c_uint64),
        ("last_dp", c_uint64),
        ("xmm", (c_uint8 * 16) * 16),
        ("mxcsr", c_uint32),
        ("pad2", c_uint32),
    ]


class kvm_userspace_memory_region(_Struct):
    _fields_ = [
        ("slot", c_uint32),
        ("flags", c_uint32),
        ("guest_phys_addr", c_uint64),
        ("memory_size", c_uint64),
        ("userspace_addr", c_uint64),
    ]


class kvm_msr_entry(_Struct):
    _fields_ = [("index", c_uint32), ("reserved", c_uint32), ("data", c_uint64)]


class kvm_msrs(_Struct):
    """Header of the variable-length struct kvm_msrs; entries follow in the caller's memory."""

    _fields_ = [("nmsrs", c_uint32), ("pad", c_uint32)]


class kvm_msr_list(_Struct):
    """Header of the variable-length struct kvm_msr_list; u32 indices follow."""

    _fields_ = [("nmsrs", c_uint32)]


class kvm_cpuid_entry2(_Struct):
    _fields_ = [
        *((name, c_uint32) for name in ("function", "index", "flags", "eax", "ebx", "ecx", "edx")),
        ("padding", c_uint32 * 3),
    ]


class kvm_cpuid2(_Struct):
    """Header of the variable-length struct kvm_cpuid2; entries follow."""

    _fields_ = [("nent", c_uint32), ("padding", c_uint32)]


class kvm_translation(_Struct):
    _fields_ = [
        ("linear_address", c_uint64),
        ("physical_address", c_uint64),
        ("valid", c_uint8),
        ("writeable", c_uint8),
        ("usermode", c_uint8),
        ("pad", c_uint8 * 5),
    ]


class kvm_interrupt(_Struct):
    _fields_ = [("irq", c_uint32)]


class kvm_mp_state(_Struct):
    _fields_ = [("mp_state", c_uint32)]


class kvm_guest_debug_arch(_Struct):
    _fields_ = [("debugreg", c_uint64 * 8)]


class kvm_guest_debug(_Struct):
    _fields_ = [("control", c_uint32), ("pad", c_uint32), ("arch", kvm_guest_debug_arch)]


class kvm_debug_exit_arch(_Struct):
    _fields_ = [
        ("exception", c_uint32),
        ("pad", c_uint32),
        ("pc", c_uint64),
        ("dr6", c_uint64),
        ("dr7", c_uint64),
    ]


class kvm_run_io(_Struct):
    _fields_ = [
        ("direction", c_uint8),
        ("size", c_uint8),
        ("port", c_uint16),
        ("count", c_uint32),
        ("data_offset", c_uint64),
    ]


class kvm_run_mmio(_Struct):
    _fields_ = [("phys_addr", c_uint64), ("data", c_uint8 * 8), ("len", c_uint32), ("is_write", c_uint8)]


class kvm_run_fail_entry(_Struct):
    _fields_ = [("hardware_entry_failure_reason", c_uint64), ("cpu", c_uint32)]


class kvm_run_internal(_Struct):
    _fields_ = [("suberror", c_uint32), ("ndata", c_uint32), ("data", c_uint64 * 16)]


class kvm_run_debug(_Struct):
    _fields_ = [("arch", kvm_debug_exit_arch)]


class kvm_run_hw(_Struct):
    _fields_ = [("hardware_exit_reason", c_uint64)]


class kvm_run_exit(ctypes.Union):
    _fields_ = [
        ("hw", kvm_run_hw),
        ("fail_entry", kvm_run_fail_entry),
        ("io", kvm_run_io),
        ("debug", kvm_run_debug),
        ("mmio", kvm_run_mmio),
        ("internal", kvm_run_internal),
        ("padding", c_char * 256),
    ]


class kvm_run(_Struct):
    """The head of the vcpu's shared page; the PIO data page follows at KVM_PIO_PAGE_OFFSET."""

    _anonymous_ = ("exit",)
    _fields_ = [
        ("request_interrupt_window", c_uint8),
        ("immediate_exit", c_uint8),
        ("padding1", c_uint8 * 6),
        ("exit_reason", c_uint32),
        ("ready_for_interrupt_injection", c_uint8),
        ("if_flag", c_uint8),
        ("flags", c_uint16),
        ("cr8", c_uint64),
        ("apic_base", c_uint64),
        ("exit", kvm_run_exit),
        ("kvm_valid_regs", c_uint64),
        ("kvm_dirty_regs", c_uint64),
        ("s", c_char * 2048),
    ]


KVM_PIO_PAGE_OFFSET = 1
KVM_COALESCED_MMIO_PAGE_OFFSET = 2

# --- ioctl numbers ---------------------------------------------------------------

# system ioctls (/dev/kvm)
KVM_GET_API_VERSION = _io(0x00)
KVM_CREATE_VM = _io(0x01)
KVM_GET_MSR_INDEX_LIST = _iowr(0x02, kvm_msr_list)
KVM_CHECK_EXTENSION = _io(0x03)
KVM_GET_VCPU_MMAP_SIZE = _io(0x04)
KVM_GET_SUPPORTED_CPUID = _iowr(0x05, kvm_cpuid2)

# VM ioctls
KVM_CREATE_VCPU = _io(0x41)
KVM_SET_USER_MEMORY_REGION = _iow(0x46, kvm_userspace_memory_region)
KVM_SET_TSS_ADDR = _io(0x47)
KVM_SET_IDENTITY_MAP_ADDR = _iow(0x48, c_uint64)

# vcpu ioctls
KVM_RUN = _io(0x80)
KVM_GET_REGS = _ior(0x81, kvm_regs)
KVM_SET_REGS = _iow(0x82, kvm_regs)
KVM_GET_SREGS = _ior(0x83, kvm_sregs)
KVM_SET_SREGS = _iow(0x84, kvm_sregs)
KVM_TRANSLATE = _iowr(0x85, kvm_translation)
KVM_INTERRUPT = _iow(0x86, kvm_interrupt)
KVM_GET_MSRS = _iowr(0x88, kvm_msrs)
KVM_SET_MSRS = _iow(0x89, kvm_msrs)
KVM_GET_FPU = _ior(0x8C, kvm_fpu)
KVM_SET_FPU = _iow(0x8D, kvm_fpu)
KVM_SET_CPUID2 = _iow(0x90, kvm_cpuid2)
KVM_GET_CPUID2 = _iowr(0x91, kvm_cpuid2)
KVM_GET_MP_STATE = _ior(0x98, kvm_mp_state)
KVM_SET_MP_STATE = _iow(0x99, kvm_mp_state)
KVM_SET_GUEST_DEBUG = _iow(0x9B, kvm_guest_debug)

# --- constants -------------------------------------------------------------------

# exit reasons (kvm_run.exit_reason)
KVM_EXIT_UNKNOWN = 0
KVM_EXIT_EXCEPTION = 1
KVM_EXIT_IO = 2
KVM_EXIT_HYPERCALL = 3
KVM_EXIT_DEBUG = 4
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_IRQ_WINDOW_OPEN = 7
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTR = 10
KVM_EXIT_INTERNAL_ERROR = 17

KVM_EXIT_IO_IN = 0
KVM_EXIT_IO_OUT = 1

KVM_INTERNAL_ERROR_EMULATION = 1
KVM_INTERNAL_ERROR_SIMUL_EX = 2
KVM_INTERNAL_ERROR_DELIVERY_EV = 3

# memory region flags
KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
KVM_MEM_READONLY = 1 << 1

# guest debug
KVM_GUESTDBG_ENABLE = 0x00000001
KVM_GUESTDBG_SINGLESTEP = 0x00000002
KVM_GUESTDBG_USE_SW_BP = 0x00010000
KVM_GUESTDBG_USE_HW_BP = 0x00020000

# multiprocessing states
KVM_MP_STATE_RUNNABLE = 0
KVM_MP_STATE_UNINITIALIZED = 1
KVM_MP_STATE_INIT_RECEIVED = 2
KVM_MP_STATE_HALTED = 3
KVM_MP_STATE_SIPI_RECEIVED = 4

# capabilities (KVM_CHECK_EXTENSION)
KVM_CAP_IRQCHIP = 0
KVM_CAP_HLT = 1
KVM_CAP_USER_MEMORY = 3
KVM_CAP_SET_TSS_ADDR = 4
KVM_CAP_EXT_CPUID = 7
KVM_CAP_NR_VCPUS = 9
KVM_CAP_NR_MEMSLOTS = 10
KVM_CAP_MP_STATE = 14
KVM_CAP_SYNC_MMU = 16
KVM_CAP_DESTROY_MEMORY_REGION_WORKS = 21
KVM_CAP_SET_GUEST_DEBUG = 23
KVM_CAP_JOIN_MEMORY_REGIONS_WORKS = 30
KVM_CAP_SET_IDENTITY_MAP_ADDR = 37
KVM_CAP_MAX_VCPUS = 66
KVM_CAP_READONLY_MEM = 81
KVM_CAP_IMMEDIATE_EXIT = 136
KVM_CAP_MAX_VCPU_ID = 128

# MSR numbers kvmfs keeps (arch/x86/include/asm/msr-index.h)
MSR_IA32_TSC = 0x10
MSR_IA32_APICBASE = 0x1B
MSR_IA32_SYSENTER_CS = 0x174
MSR_IA32_SYSENTER_ESP = 0x175
MSR_IA32_SYSENTER_EIP = 0x176
MSR_IA32_CR_PAT = 0x277
MSR_EFER = 0xC0000080
MSR_STAR = 0xC0000081
MSR_LSTAR = 0xC0000082
MSR_CSTAR = 0xC0000083
MSR_SYSCALL_MASK = 0xC0000084
MSR_FS_BASE = 0xC0000100
MSR_GS_BASE = 0xC0000101
MSR_KERNEL_GS_BASE = 0xC0000102
