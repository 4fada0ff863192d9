"""A backend that hands the guest to a real /dev/kvm: kvmfs's file layer over the kernel's KVM.

It exists to prove the backend interface (the FS and object layers do not know
which backend runs the guest) and to check those layers on their own: with
``kvmfs mount --backend kvm`` every difference from /dev/kvm is kvmfs's own,
not unicorn's. Guest memory is the daemon's (kvmfs.memory keeps it in step
with the client's), registered with the real KVM by its daemon address.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import signal
import threading

from kvmfs import abi
from kvmfs.backends.base import Backend, BackendError, VcpuBackend, VmBackend

DEV_KVM = "/dev/kvm"
KICK_SIGNAL = signal.SIGUSR2  # interrupts a vcpu thread's KVM_RUN (the handler does nothing)
_libc = ctypes.CDLL(None, use_errno=True)
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong]


def _ioctl(fd: int, cmd: int, arg: int | ctypes.Structure | ctypes.Array = 0) -> int:
    """ioctl(2), with errors as BackendError carrying KVM's errno."""
    value = arg if isinstance(arg, int) else ctypes.addressof(arg)
    result = _libc.ioctl(fd, cmd, value)
    if result < 0:
        raise BackendError(ctypes.get_errno())
    return result


def _with_entries(header: type[ctypes.Structure], entry: type, count: int) -> ctypes.Structure:
    kind = type(header.__name__, (ctypes.Structure,), {"_fields_": [*header._fields_, ("entries", entry * count)]})
    return kind()


class KvmBackend(Backend):
    name = "kvm"

    def __init__(self) -> None:
        self.fd = os.open(DEV_KVM, os.O_RDWR | os.O_CLOEXEC)
        self.mmap_size = _ioctl(self.fd, abi.KVM_GET_VCPU_MMAP_SIZE)
        if threading.current_thread() is threading.main_thread():
            signal.signal(KICK_SIGNAL, lambda *_: None)  # without SA_RESTART: KVM_RUN returns EINTR

    def create_vm(self) -> KvmVm:
        return KvmVm(self, _ioctl(self.fd, abi.KVM_CREATE_VM, 0))

    def supported_cpuid(self) -> list[abi.kvm_cpuid_entry2]:
        cpuid = _with_entries(abi.kvm_cpuid2, abi.kvm_cpuid_entry2, 256)
        cpuid.nent = 256
        _ioctl(self.fd, abi.KVM_GET_SUPPORTED_CPUID, cpuid)
        return [abi.kvm_cpuid_entry2.from_buffer_copy(entry) for entry in cpuid.entries[: cpuid.nent]]

    def msr_index_list(self) -> list[int]:
        msrs = _with_entries(abi.kvm_msr_list, ctypes.c_uint32, 1024)
        msrs.nmsrs = 1024
        _ioctl(self.fd, abi.KVM_GET_MSR_INDEX_LIST, msrs)
        return list(msrs.entries[: msrs.nmsrs])


class KvmVm(VmBackend):
    def __init__(self, backend: KvmBackend, fd: int) -> None:
        self.backend, self.fd = backend, fd
        self._slots: dict[int, int] = {}  # guest physical address → KVM slot number

    def create_vcpu(self, vcpu_id: int) -> KvmVcpu:
        return KvmVcpu(self, _ioctl(self.fd, abi.KVM_CREATE_VCPU, vcpu_id))

    def map_memory(self, guest_phys_addr: int, size: int, host_addr: int, readonly: bool) -> None:
        slot = next(number for number in range(len(self._slots) + 1) if number not in self._slots.values())
        flags = abi.KVM_MEM_READONLY if readonly else 0
        _ioctl(
            self.fd,
            abi.KVM_SET_USER_MEMORY_REGION,
            abi.kvm_userspace_memory_region(slot, flags, guest_phys_addr, size, host_addr),
        )
        self._slots[guest_phys_addr] = slot

    def unmap_memory(self, guest_phys_addr: int, size: int) -> None:
        slot = self._slots.pop(guest_phys_addr)
        _ioctl(self.fd, abi.KVM_SET_USER_MEMORY_REGION, abi.kvm_userspace_memory_region(slot, 0, guest_phys_addr, 0, 0))

    def memory_changed(self, guest_phys_addr: int, size: int) -> None:
        """Nothing to do: KVM runs the guest straight from the memory."""

    def close(self) -> None:
        os.close(self.fd)


class KvmVcpu(VcpuBackend):
    def __init__(self, vm: KvmVm, fd: int) -> None:
        self.vm, self.fd = vm, fd
        self._map = mmap.mmap(fd, vm.backend.mmap_size, mmap.MAP_SHARED)
        self._kvm_run = abi.kvm_run.from_buffer(self._map)
        self._lock = threading.Lock()
        self._thread: int | None = None  # the thread in KVM_RUN, for kicks
        self._kick_pending = False

    def _get(self, cmd: int, kind: type[ctypes.Structure]) -> ctypes.Structure:
        value = kind()
        _ioctl(self.fd, cmd, value)
        return value

    def get_regs(self) -> abi.kvm_regs:
        return self._get(abi.KVM_GET_REGS, abi.kvm_regs)

    def set_regs(self, regs: abi.kvm_regs) -> None:
        _ioctl(self.fd, abi.KVM_SET_REGS, regs)

    def get_sregs(self) -> abi.kvm_sregs:
        return self._get(abi.KVM_GET_SREGS, abi.kvm_sregs)

    def set_sregs(self, sregs: abi.kvm_sregs) -> None:
        _ioctl(self.fd, abi.KVM_SET_SREGS, sregs)

    def get_fpu(self) -> abi.kvm_fpu:
        return self._get(abi.KVM_GET_FPU, abi.kvm_fpu)

    def set_fpu(self, fpu: abi.kvm_fpu) -> None:
        _ioctl(self.fd, abi.KVM_SET_FPU, fpu)

    def _msrs(self, cmd: int, index: int, value: int = 0) -> tuple[int, int]:
        msrs = _with_entries(abi.kvm_msrs, abi.kvm_msr_entry, 1)
        msrs.nmsrs, msrs.entries[0].index, msrs.entries[0].data = 1, index, value
        return _ioctl(self.fd, cmd, msrs), msrs.entries[0].data

    def get_msr(self, index: int) -> int | None:
        done, value = self._msrs(abi.KVM_GET_MSRS, index)
        return value if done else None

    def set_msr(self, index: int, value: int) -> bool:
        return self._msrs(abi.KVM_SET_MSRS, index, value)[0] == 1

    def set_cpuid(self, entries: list[abi.kvm_cpuid_entry2]) -> None:
        cpuid = _with_entries(abi.kvm_cpuid2, abi.kvm_cpuid_entry2, len(entries))
        cpuid.nent = len(entries)
        for i, entry in enumerate(entries):
            cpuid.entries[i] = entry
        _ioctl(self.fd, abi.KVM_SET_CPUID2, cpuid)

    def translate(self, linear_address: int) -> abi.kvm_translation:
        translation = abi.kvm_translation(linear_address=linear_address)
        _ioctl(self.fd, abi.KVM_TRANSLATE, translation)
        return translation

    def queue_interrupt(self, vector: int) -> None:
        _ioctl(self.fd, abi.KVM_INTERRUPT, abi.kvm_interrupt(vector))

    def get_mp_state(self) -> int:
        return self._get(abi.KVM_GET_MP_STATE, abi.kvm_mp_state).mp_state

    def set_mp_state(self, state: int) -> None:
        _ioctl(self.fd, abi.KVM_SET_MP_STATE, abi.kvm_mp_state(state))

    def set_guest_debug(self, debug: abi.kvm_guest_debug) -> None:
        _ioctl(self.fd, abi.KVM_SET_GUEST_DEBUG, debug)

    def run(self, run: ctypes.Array) -> None:
        """Copy the client's side of kvm_run in, run, copy the kernel's answer out."""
        size = min(len(run), len(self._map))
        ctypes.memmove(ctypes.addressof(self._kvm_run), run, size)
        client_immediate_exit = self._kvm_run.immediate_exit
        with self._lock:
            self._thread = threading.get_ident()
            if self._kick_pending:  # kicked before this run began: leave at once, as KVM does
                self._kvm_run.immediate_exit, self._kick_pending = 1, False
        try:
            _ioctl(self.fd, abi.KVM_RUN)
        except BackendError as error:
            if error.errno != errno.EINTR:
                raise
            self._kvm_run.exit_reason = abi.KVM_EXIT_INTR
        finally:
            with self._lock:
                self._thread = None
            self._kvm_run.immediate_exit = client_immediate_exit
            ctypes.memmove(run, ctypes.addressof(self._kvm_run), size)

    def kick(self) -> None:
        """KVM's own recipe: immediate_exit so a run about to enter the guest leaves at once, and a
        signal for one in the guest. A kick between runs stops the next one."""
        with self._lock:
            if self._thread is None:
                self._kick_pending = True
                return
            self._kvm_run.immediate_exit = 1
            signal.pthread_kill(self._thread, KICK_SIGNAL)

    def close(self) -> None:
        del self._kvm_run
        self._map.close()
        os.close(self.fd)
