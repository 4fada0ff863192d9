"""A minimal in-process /dev/kvm client: the oracle the unicorn backend is compared with.

It exposes the same calls as kvmfs.backends.base.VcpuBackend where that is useful,
so a test can drive both sides with one function.
"""

from __future__ import annotations

import ctypes
import mmap
import os

from kvmfs import abi

_libc = ctypes.CDLL(None, use_errno=True)
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_libc.ioctl.restype = ctypes.c_int

AVAILABLE = os.access("/dev/kvm", os.R_OK | os.W_OK)


def ioctl(fd: int, cmd: int, arg: ctypes.Structure | ctypes.Array | int | None = None) -> int:
    """ioctl(2) that raises OSError with the errno, like the FUSE client would see."""
    if isinstance(arg, int) or arg is None:
        pointer = ctypes.c_void_p(arg or 0)
    else:
        pointer = ctypes.c_void_p(ctypes.addressof(arg))
    result = _libc.ioctl(fd, cmd, pointer)
    if result < 0:
        error = ctypes.get_errno()
        raise OSError(error, os.strerror(error))
    return result


class KvmVm:
    """A VM on /dev/kvm with anonymous guest memory the test can write."""

    def __init__(self) -> None:
        self.system = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
        self.fd = ioctl(self.system, abi.KVM_CREATE_VM, 0)
        self.memory: list[mmap.mmap] = []
        self.vcpus: list[KvmVcpu] = []

    def map_memory(self, gpa: int, size: int, readonly: bool = False) -> mmap.mmap:
        area = mmap.mmap(-1, size)
        region = abi.kvm_userspace_memory_region(
            slot=len(self.memory),
            flags=abi.KVM_MEM_READONLY if readonly else 0,
            guest_phys_addr=gpa,
            memory_size=size,
            userspace_addr=ctypes.addressof(ctypes.c_char.from_buffer(area)),
        )
        ioctl(self.fd, abi.KVM_SET_USER_MEMORY_REGION, region)
        self.memory.append(area)
        return area

    def create_vcpu(self, vcpu_id: int = 0) -> KvmVcpu:
        vcpu = KvmVcpu(ioctl(self.fd, abi.KVM_CREATE_VCPU, vcpu_id))
        self.vcpus.append(vcpu)
        return vcpu

    def close(self) -> None:
        for vcpu in self.vcpus:
            vcpu.close()
        os.close(self.fd)
        os.close(self.system)


class KvmVcpu:
    """A /dev/kvm vcpu with its kvm_run mapping (``run_area``, as the backend sees it)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._map = mmap.mmap(fd, 3 * abi.PAGE_SIZE)
        self.run_area = (ctypes.c_char * (3 * abi.PAGE_SIZE)).from_buffer(self._map)

    def _get(self, cmd: int, kind: type) -> ctypes.Structure:
        value = kind()
        ioctl(self.fd, cmd, value)
        return value

    def get_regs(self) -> abi.kvm_regs:
        return self._get(abi.KVM_GET_REGS, abi.kvm_regs)

    def set_regs(self, regs: abi.kvm_regs) -> None:
        ioctl(self.fd, abi.KVM_SET_REGS, regs)

    def get_sregs(self) -> abi.kvm_sregs:
        return self._get(abi.KVM_GET_SREGS, abi.kvm_sregs)

    def set_sregs(self, sregs: abi.kvm_sregs) -> None:
        ioctl(self.fd, abi.KVM_SET_SREGS, sregs)

    def get_fpu(self) -> abi.kvm_fpu:
        return self._get(abi.KVM_GET_FPU, abi.kvm_fpu)

    def set_fpu(self, fpu: abi.kvm_fpu) -> None:
        ioctl(self.fd, abi.KVM_SET_FPU, fpu)

    def translate(self, linear_address: int) -> abi.kvm_translation:
        value = abi.kvm_translation(linear_address=linear_address)
        ioctl(self.fd, abi.KVM_TRANSLATE, value)
        return value

    def queue_interrupt(self, vector: int) -> None:
        ioctl(self.fd, abi.KVM_INTERRUPT, abi.kvm_interrupt(vector))

    def set_guest_debug(self, debug: abi.kvm_guest_debug) -> None:
        ioctl(self.fd, abi.KVM_SET_GUEST_DEBUG, debug)

    def get_msr(self, index: int) -> int | None:
        buffer = (ctypes.c_char * (8 + 16))()
        header = abi.kvm_msrs.from_buffer(buffer)
        header.nmsrs = 1
        entry = abi.kvm_msr_entry.from_buffer(buffer, 8)
        entry.index = index
        return entry.data if ioctl(self.fd, abi.KVM_GET_MSRS, buffer) == 1 else None

    def set_msr(self, index: int, value: int) -> bool:
        buffer = (ctypes.c_char * (8 + 16))()
        abi.kvm_msrs.from_buffer(buffer).nmsrs = 1
        entry = abi.kvm_msr_entry.from_buffer(buffer, 8)
        entry.index, entry.data = index, value
        return ioctl(self.fd, abi.KVM_SET_MSRS, buffer) == 1

    def run(self, run_area: ctypes.Array | None = None) -> None:
        """KVM_RUN; EINTR is reported as exit_reason KVM_EXIT_INTR, as the backend does."""
        try:
            ioctl(self.fd, abi.KVM_RUN, 0)
        except InterruptedError:
            abi.kvm_run.from_buffer(self.run_area).exit_reason = abi.KVM_EXIT_INTR

    def close(self) -> None:
        """Close the fd; the mapping goes with the last kvm_run view of it (garbage collection)."""
        os.close(self.fd)
