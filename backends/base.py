"""The backend interface: what kvmfs needs from whatever executes the guest.

It plays the role of the kernel's ``kvm_x86_ops`` table: the object layer
(kvmfs.objects) owns KVM semantics (validation, errnos, lifetime), and calls
down into a backend only for architecture state and execution. A backend knows
nothing about FUSE, file handles or client processes.

Guest memory reaches a backend as host memory in the daemon (an address and a
size); the object layer keeps that memory in sync with the client's.
"""

from __future__ import annotations

import abc
import ctypes

from kvmfs import abi


class BackendError(OSError):
    """The backend cannot do what was asked; ``errno`` is what the ioctl returns."""

    def __init__(self, errno: int, message: str = "") -> None:
        super().__init__(errno, message or f"errno {errno}")


class VcpuBackend(abc.ABC):
    """One virtual CPU. All methods except ``kick`` are called with the vcpu idle."""

    @abc.abstractmethod
    def get_regs(self) -> abi.kvm_regs: ...

    @abc.abstractmethod
    def set_regs(self, regs: abi.kvm_regs) -> None: ...

    @abc.abstractmethod
    def get_sregs(self) -> abi.kvm_sregs: ...

    @abc.abstractmethod
    def set_sregs(self, sregs: abi.kvm_sregs) -> None:
        """Raise BackendError(EINVAL) for a state KVM refuses."""

    @abc.abstractmethod
    def get_fpu(self) -> abi.kvm_fpu: ...

    @abc.abstractmethod
    def set_fpu(self, fpu: abi.kvm_fpu) -> None: ...

    @abc.abstractmethod
    def get_msr(self, index: int) -> int | None:
        """The MSR's value, or None if this backend does not know the MSR."""

    @abc.abstractmethod
    def set_msr(self, index: int, value: int) -> bool:
        """Set an MSR; False if the MSR is unknown or the value is refused."""

    @abc.abstractmethod
    def set_cpuid(self, entries: list[abi.kvm_cpuid_entry2]) -> None:
        """What the guest's CPUID instruction returns from now on."""

    @abc.abstractmethod
    def translate(self, linear_address: int) -> abi.kvm_translation: ...

    @abc.abstractmethod
    def queue_interrupt(self, vector: int) -> None:
        """KVM_INTERRUPT: deliver ``vector`` when the guest can take it."""

    @abc.abstractmethod
    def get_mp_state(self) -> int: ...

    @abc.abstractmethod
    def set_mp_state(self, state: int) -> None: ...

    @abc.abstractmethod
    def set_guest_debug(self, debug: abi.kvm_guest_debug) -> None: ...

    @abc.abstractmethod
    def run(self, run: ctypes.Array) -> None:
        """Run until an exit; fill ``run`` (the vcpu's mmap area, kvm_run at offset 0).

        Blocks; called from a worker thread. Input from the client (IN or MMIO-read
        data of the previous exit, ``immediate_exit``) is read from ``run`` first.
        Returning with ``exit_reason == KVM_EXIT_INTR`` means the ioctl fails EINTR.
        """

    @abc.abstractmethod
    def kick(self) -> None:
        """Make a ``run`` in progress return KVM_EXIT_INTR soon. Thread-safe; may be
        called when no run is in progress (then the next run is not affected)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Free the vcpu, keeping no reference to its run area (the fs layer unmaps it next)."""


class VmBackend(abc.ABC):
    """One virtual machine: its guest physical memory and its vcpus."""

    @abc.abstractmethod
    def create_vcpu(self, vcpu_id: int) -> VcpuBackend:
        """A vcpu in KVM's reset state (as /dev/kvm reports right after KVM_CREATE_VCPU)."""

    @abc.abstractmethod
    def map_memory(self, guest_phys_addr: int, size: int, host_addr: int, readonly: bool) -> None:
        """Make ``size`` bytes of daemon memory at ``host_addr`` guest RAM at ``guest_phys_addr``.

        Page-aligned; never overlaps a mapped range. Guest physical addresses that
        no mapping covers are MMIO; writes to a readonly mapping are MMIO writes.
        """

    @abc.abstractmethod
    def unmap_memory(self, guest_phys_addr: int, size: int) -> None: ...

    @abc.abstractmethod
    def memory_changed(self, guest_phys_addr: int, size: int) -> None:
        """Someone other than the guest wrote this range: forget code translated from it.

        Like map_memory and unmap_memory, called only while no vcpu of the VM is in the guest.
        """

    @abc.abstractmethod
    def close(self) -> None: ...


class Backend(abc.ABC):
    """A way of executing guests; one instance serves the whole mount."""

    name: str

    @abc.abstractmethod
    def create_vm(self) -> VmBackend: ...

    @abc.abstractmethod
    def supported_cpuid(self) -> list[abi.kvm_cpuid_entry2]:
        """KVM_GET_SUPPORTED_CPUID: the CPUID leaves this backend can present."""

    @abc.abstractmethod
    def msr_index_list(self) -> list[int]:
        """KVM_GET_MSR_INDEX_LIST: the MSRs get_msr/set_msr know."""
