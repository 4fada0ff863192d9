"""A backend that hands the guest to a real /dev/kvm: kvmfs's file layer over the kernel's KVM.

It exists to prove the backend interface (the FS and object layers do not know
which backend runs the guest) and to check those layers on their own: with
``kvmfs mount --backend kvm`` every difference from /dev/kvm is kvmfs's own,
not unicorn's. Guest memory is the daemon's (kvmfs.memory keeps it in step
with the client's), registered with the real KVM by its daemon address. The
ioctls themselves are kvmfs.client's, the same wrappers the tests drive.
"""

from __future__ import annotations

import ctypes
import errno
import signal
import threading

from kvmfs import abi
from kvmfs.backends.base import Backend, VcpuBackend, VmBackend
from kvmfs.client import Kvm, VcpuFd, VmFd

KICK_SIGNAL = signal.SIGUSR2  # interrupts a vcpu thread's KVM_RUN (the handler does nothing)


class KvmBackend(Backend):
    name = "kvm"

    def __init__(self) -> None:
        self.kvm = Kvm.open("/dev/kvm")
        if threading.current_thread() is threading.main_thread():
            signal.signal(KICK_SIGNAL, lambda *_: None)  # without SA_RESTART: KVM_RUN returns EINTR

    def create_vm(self) -> KvmVm:
        return KvmVm(self.kvm.create_vm())

    def supported_cpuid(self) -> list[abi.kvm_cpuid_entry2]:
        return self.kvm.get_supported_cpuid()

    def msr_index_list(self) -> list[int]:
        return self.kvm.get_msr_index_list()


class KvmVm(VmBackend):
    def __init__(self, vm: VmFd) -> None:
        self.vm = vm
        self._slots: dict[int, int] = {}  # guest physical address → KVM slot number

    def create_vcpu(self, vcpu_id: int) -> KvmVcpu:
        return KvmVcpu(self.vm.create_vcpu(vcpu_id))

    def map_memory(self, guest_phys_addr: int, size: int, host_addr: int, readonly: bool) -> None:
        slot = next(number for number in range(len(self._slots) + 1) if number not in self._slots.values())
        flags = abi.KVM_MEM_READONLY if readonly else 0
        self.vm.set_user_memory_region(slot, guest_phys_addr, size, host_addr, flags)
        self._slots[guest_phys_addr] = slot

    def unmap_memory(self, guest_phys_addr: int, size: int) -> None:
        self.vm.set_user_memory_region(self._slots.pop(guest_phys_addr), guest_phys_addr, 0, 0)

    def memory_changed(self, guest_phys_addr: int, size: int) -> None:
        """Nothing to do: KVM runs the guest straight from the memory."""

    def close(self) -> None:
        self.vm.close()


class KvmVcpu(VcpuBackend):
    def __init__(self, vcpu: VcpuFd) -> None:
        self.vcpu = vcpu
        self._lock = threading.Lock()
        self._thread: int | None = None  # the thread in KVM_RUN, for kicks
        self._kick_pending = False

    def get_regs(self) -> abi.kvm_regs:
        return self.vcpu.get_regs()

    def set_regs(self, regs: abi.kvm_regs) -> None:
        self.vcpu.set_regs(regs)

    def get_sregs(self) -> abi.kvm_sregs:
        return self.vcpu.get_sregs()

    def set_sregs(self, sregs: abi.kvm_sregs) -> None:
        self.vcpu.set_sregs(sregs)

    def get_fpu(self) -> abi.kvm_fpu:
        return self.vcpu.get_fpu()

    def set_fpu(self, fpu: abi.kvm_fpu) -> None:
        self.vcpu.set_fpu(fpu)

    def get_msr(self, index: int) -> int | None:
        found = self.vcpu.get_msrs([index])
        return found[0][1] if found else None

    def set_msr(self, index: int, value: int) -> bool:
        return self.vcpu.set_msrs([(index, value)]) == 1

    def set_cpuid(self, entries: list[abi.kvm_cpuid_entry2]) -> None:
        self.vcpu.set_cpuid2(entries)

    def translate(self, linear_address: int) -> abi.kvm_translation:
        return self.vcpu.translate(linear_address)

    def queue_interrupt(self, vector: int) -> None:
        self.vcpu.interrupt(vector)

    def get_mp_state(self) -> int:
        return self.vcpu.get_mp_state()

    def set_mp_state(self, state: int) -> None:
        self.vcpu.set_mp_state(state)

    def set_guest_debug(self, debug: abi.kvm_guest_debug) -> None:
        self.vcpu.set_guest_debug(debug.control, debug.arch.debugreg)

    def run(self, run: ctypes.Array) -> None:
        """Copy the client's side of kvm_run in, run, copy the kernel's answer out."""
        kernel = self.vcpu.run_map
        size = min(len(run), len(kernel))
        kernel[:size] = run[:size]
        kvm_run = self.vcpu.run
        client_immediate_exit = kvm_run.immediate_exit
        with self._lock:
            self._thread = threading.get_ident()
            if self._kick_pending:  # kicked before this run began: leave at once, as KVM does
                kvm_run.immediate_exit, self._kick_pending = 1, False
        try:
            kvm_run()
        except OSError as error:
            if error.errno != errno.EINTR:
                raise
            kvm_run.exit_reason = abi.KVM_EXIT_INTR
        finally:
            with self._lock:
                self._thread = None
            kvm_run.immediate_exit = client_immediate_exit
            ctypes.memmove(run, kernel[:size], size)

    def kick(self) -> None:
        """KVM's own recipe: immediate_exit so a run about to enter the guest leaves at once, and a
        signal for one in the guest. A kick between runs stops the next one."""
        with self._lock:
            if self._thread is None:
                self._kick_pending = True
                return
            self.vcpu.run.immediate_exit = 1
            signal.pthread_kill(self._thread, KICK_SIGNAL)

    def close(self) -> None:
        self.vcpu.close()
