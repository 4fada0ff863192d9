"""Typed KVM client wrappers (after rust-vmm's kvm-ioctls), for /dev/kvm and for a kvmfs mount alike.

`Kvm` -> `VmFd` -> `VcpuFd`, each owning one fd. The only difference between the two targets is how a
new VM or vcpu is reached: /dev/kvm's KVM_CREATE_VM / KVM_CREATE_VCPU return a new fd, kvmfs's return a
number N (or the vcpu id) and the object appears as MOUNT/vm<N>/vm (MOUNT/vm<N>/vcpu<id>), which we
open. Everything else is the same ioctl with the same struct, so tests can run one script on both.
Errors surface as OSError carrying the errno.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import os
import stat
from collections.abc import Iterable
from functools import cache
from typing import Self

from kvmfs import abi

_libc = ctypes.CDLL(None, use_errno=True)
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong]
_libc.ioctl.restype = ctypes.c_int

_Arg = int | ctypes.Structure | ctypes.Array


def ioctl(fd: int, cmd: int, arg: _Arg = 0) -> int:
    """ioctl(2) passing an unsigned long or a struct's address (fcntl.ioctl only takes a C int or a copy).

    ctypes drops the GIL for the call, so a blocking KVM_RUN does not stall other threads.
    """
    value = arg if isinstance(arg, int) else ctypes.addressof(arg)
    result = _libc.ioctl(fd, cmd, value)
    if result < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    return result


@cache
def _varlen(header: type[ctypes.Structure], entry: type, count: int) -> type[ctypes.Structure]:
    """A struct type for a variable-length KVM struct: its fixed header followed by `count` entries."""
    return type(
        f"{header.__name__}_{count}",
        (ctypes.Structure,),
        {"_fields_": [*header._fields_, ("entries", entry * count)]},
    )


class _Fd:
    """An owned fd: closeable once, usable as a context manager."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def ioctl(self, cmd: int, arg: _Arg = 0) -> int:
        return ioctl(self.fd, cmd, arg)

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Kvm(_Fd):
    """The system fd: /dev/kvm, or MOUNT/kvm on a kvmfs mount (told apart by being a character device)."""

    def __init__(self, fd: int, mount: str | None) -> None:
        super().__init__(fd)
        self.mount = mount

    @classmethod
    def open(cls, path: str = "/dev/kvm") -> Kvm:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            mount = None if stat.S_ISCHR(os.fstat(fd).st_mode) else os.path.dirname(os.path.abspath(path))
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, mount)

    @property
    def is_kvmfs(self) -> bool:
        return self.mount is not None

    def api_version(self) -> int:
        return self.ioctl(abi.KVM_GET_API_VERSION)

    def check_extension(self, cap: int) -> int:
        return self.ioctl(abi.KVM_CHECK_EXTENSION, cap)

    def vcpu_mmap_size(self) -> int:
        return self.ioctl(abi.KVM_GET_VCPU_MMAP_SIZE)

    def create_vm(self, vm_type: int = 0) -> VmFd:
        result = self.ioctl(abi.KVM_CREATE_VM, vm_type)
        if self.mount is None:
            return VmFd(result, self.vcpu_mmap_size(), None)
        vm_dir = f"{self.mount}/vm{result}"
        return VmFd(os.open(f"{vm_dir}/vm", os.O_RDWR | os.O_CLOEXEC), self.vcpu_mmap_size(), vm_dir)

    def get_msr_index_list(self) -> list[int]:
        """MSR indices; KVM answers E2BIG with the needed count in nmsrs, so ask again with that room."""
        count = 64
        while True:
            buf = _varlen(abi.kvm_msr_list, ctypes.c_uint32, count)(nmsrs=count)
            try:
                self.ioctl(abi.KVM_GET_MSR_INDEX_LIST, buf)
            except OSError as error:
                if error.errno != errno.E2BIG:
                    raise
                count = max(buf.nmsrs, count * 2)
                continue
            return list(buf.entries[: buf.nmsrs])

    def get_supported_cpuid(self, max_entries: int = 64) -> list[abi.kvm_cpuid_entry2]:
        """Supported CPUID leaves, doubling the buffer on E2BIG (the kernel does not report the need)."""
        return _cpuid_entries(self, abi.KVM_GET_SUPPORTED_CPUID, max_entries)


def _cpuid_entries(fd: _Fd, cmd: int, count: int) -> list[abi.kvm_cpuid_entry2]:
    """A kvm_cpuid2-returning ioctl, asked again with twice the room while it answers E2BIG."""
    while True:
        buf = _varlen(abi.kvm_cpuid2, abi.kvm_cpuid_entry2, count)(nent=count)
        try:
            fd.ioctl(cmd, buf)
        except OSError as error:
            if error.errno != errno.E2BIG:
                raise
            count *= 2
            continue
        return [abi.kvm_cpuid_entry2.from_buffer_copy(e) for e in buf.entries[: buf.nent]]


class VmFd(_Fd):
    """A VM; `vm_dir` is its kvmfs directory (None on /dev/kvm), where its vcpu files appear."""

    def __init__(self, fd: int, vcpu_mmap_size: int, vm_dir: str | None) -> None:
        super().__init__(fd)
        self.vcpu_mmap_size = vcpu_mmap_size
        self.vm_dir = vm_dir

    def check_extension(self, cap: int) -> int:
        return self.ioctl(abi.KVM_CHECK_EXTENSION, cap)

    def create_vcpu(self, vcpu_id: int = 0) -> VcpuFd:
        result = self.ioctl(abi.KVM_CREATE_VCPU, vcpu_id)
        fd = result if self.vm_dir is None else os.open(f"{self.vm_dir}/vcpu{result}", os.O_RDWR | os.O_CLOEXEC)
        try:
            return VcpuFd(fd, self.vcpu_mmap_size)
        except BaseException:
            os.close(fd)
            raise

    def set_user_memory_region(self, slot: int, gpa: int, size: int, userspace_addr: int, flags: int = 0) -> int:
        region = abi.kvm_userspace_memory_region(
            slot=slot, flags=flags, guest_phys_addr=gpa, memory_size=size, userspace_addr=userspace_addr
        )
        return self.ioctl(abi.KVM_SET_USER_MEMORY_REGION, region)

    def set_tss_addr(self, address: int) -> int:
        return self.ioctl(abi.KVM_SET_TSS_ADDR, address)

    def set_identity_map_addr(self, address: int) -> int:
        return self.ioctl(abi.KVM_SET_IDENTITY_MAP_ADDR, ctypes.c_uint64(address))


class KvmRun(abi.kvm_run):
    """struct kvm_run as a live view of the vcpu's shared page; calling it issues KVM_RUN.

    This lets `vcpu.run()` run the vcpu (kvm-ioctls' spelling) while `vcpu.run.exit_reason` reads the
    page, with one name for both.
    """

    vcpu_fd: int

    def __call__(self) -> int:
        """KVM_RUN; returns exit_reason (OSError on failure, e.g. EINTR with immediate_exit)."""
        ioctl(self.vcpu_fd, abi.KVM_RUN)
        return self.exit_reason


class VcpuFd(_Fd):
    """A vcpu with its kvm_run page mapped (page 0: struct kvm_run; page KVM_PIO_PAGE_OFFSET: PIO data)."""

    def __init__(self, fd: int, mmap_size: int) -> None:
        super().__init__(fd)
        self._map = mmap.mmap(fd, mmap_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self._run = KvmRun.from_buffer(self._map)
        self._run.vcpu_fd = fd

    def close(self) -> None:
        if self.fd >= 0:
            del self._run
            with contextlib.suppress(BufferError):  # a caller still holds a view: unmapped when it dies
                self._map.close()
        super().close()

    @property
    def run_map(self) -> mmap.mmap:
        """The whole shared mapping, for tests that look past struct kvm_run."""
        return self._map

    @property
    def run(self) -> KvmRun:
        """struct kvm_run, a live view of the shared page; `vcpu.run()` issues KVM_RUN."""
        return self._run

    def io_data(self) -> bytes:
        """The data of the current KVM_EXIT_IO (size * count bytes at data_offset)."""
        io = self._run.io
        return self._map[io.data_offset : io.data_offset + io.size * io.count]

    def set_io_data(self, data: bytes) -> None:
        """Supply an IN's data, read by the guest on the next KVM_RUN."""
        offset = self._run.io.data_offset
        self._map[offset : offset + len(data)] = data

    def mmio_data(self) -> bytes:
        mmio = self._run.mmio
        return bytes(mmio.data[: mmio.len])

    def set_mmio_data(self, data: bytes) -> None:
        """Supply an MMIO read's data, seen by the guest on the next KVM_RUN."""
        ctypes.memmove(self._run.mmio.data, data, len(data))

    def _get(self, cmd: int, kind: type[ctypes.Structure]) -> ctypes.Structure:
        value = kind()
        self.ioctl(cmd, value)
        return value

    def get_regs(self) -> abi.kvm_regs:
        return self._get(abi.KVM_GET_REGS, abi.kvm_regs)

    def set_regs(self, regs: abi.kvm_regs) -> None:
        self.ioctl(abi.KVM_SET_REGS, regs)

    def get_sregs(self) -> abi.kvm_sregs:
        return self._get(abi.KVM_GET_SREGS, abi.kvm_sregs)

    def set_sregs(self, sregs: abi.kvm_sregs) -> None:
        self.ioctl(abi.KVM_SET_SREGS, sregs)

    def get_fpu(self) -> abi.kvm_fpu:
        return self._get(abi.KVM_GET_FPU, abi.kvm_fpu)

    def set_fpu(self, fpu: abi.kvm_fpu) -> None:
        self.ioctl(abi.KVM_SET_FPU, fpu)

    def get_msrs(self, indices: Iterable[int]) -> list[tuple[int, int]]:
        """Reads MSRs; KVM stops at the first it does not know and returns how many it read."""
        indices = list(indices)
        buf = _varlen(abi.kvm_msrs, abi.kvm_msr_entry, len(indices))(nmsrs=len(indices))
        for entry, index in zip(buf.entries, indices, strict=True):
            entry.index = index
        done = self.ioctl(abi.KVM_GET_MSRS, buf)
        return [(e.index, e.data) for e in buf.entries[:done]]

    def set_msrs(self, msrs: Iterable[tuple[int, int]]) -> int:
        """Writes MSRs; returns how many KVM accepted (it stops at the first refused)."""
        msrs = list(msrs)
        buf = _varlen(abi.kvm_msrs, abi.kvm_msr_entry, len(msrs))(nmsrs=len(msrs))
        for entry, (index, data) in zip(buf.entries, msrs, strict=True):
            entry.index, entry.data = index, data
        return self.ioctl(abi.KVM_SET_MSRS, buf)

    def set_cpuid2(self, entries: Iterable[abi.kvm_cpuid_entry2]) -> None:
        entries = list(entries)
        buf = _varlen(abi.kvm_cpuid2, abi.kvm_cpuid_entry2, len(entries))(nent=len(entries))
        for i, entry in enumerate(entries):
            buf.entries[i] = entry
        self.ioctl(abi.KVM_SET_CPUID2, buf)

    def get_cpuid2(self, max_entries: int = 64) -> list[abi.kvm_cpuid_entry2]:
        return _cpuid_entries(self, abi.KVM_GET_CPUID2, max_entries)

    def translate(self, linear_address: int) -> abi.kvm_translation:
        value = abi.kvm_translation(linear_address=linear_address)
        self.ioctl(abi.KVM_TRANSLATE, value)
        return value

    def interrupt(self, irq: int) -> None:
        self.ioctl(abi.KVM_INTERRUPT, abi.kvm_interrupt(irq=irq))

    def get_mp_state(self) -> int:
        return self._get(abi.KVM_GET_MP_STATE, abi.kvm_mp_state).mp_state

    def set_mp_state(self, state: int) -> None:
        self.ioctl(abi.KVM_SET_MP_STATE, abi.kvm_mp_state(mp_state=state))

    def set_guest_debug(self, control: int, debugreg: Iterable[int] = ()) -> None:
        value = abi.kvm_guest_debug(control=control)
        for i, reg in enumerate(debugreg):
            value.arch.debugreg[i] = reg
        self.ioctl(abi.KVM_SET_GUEST_DEBUG, value)


class GuestMemory:
    """Anonymous memory to hand KVM as a slot; private by default, MAP_SHARED when `shared`."""

    def __init__(self, size: int, shared: bool = False) -> None:
        flags = (mmap.MAP_SHARED if shared else mmap.MAP_PRIVATE) | mmap.MAP_ANONYMOUS
        self.size = size
        self.shared = shared
        self.map = mmap.mmap(-1, size, flags, mmap.PROT_READ | mmap.PROT_WRITE)
        view = (ctypes.c_char * size).from_buffer(self.map)
        self.address = ctypes.addressof(view)
        del view  # keep no export, so close() can unmap

    def read(self, offset: int, size: int) -> bytes:
        return self.map[offset : offset + size]

    def write(self, offset: int, data: bytes) -> None:
        self.map[offset : offset + len(data)] = data

    def close(self) -> None:
        self.map.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
