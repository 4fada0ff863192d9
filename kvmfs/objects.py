"""KVM's objects: the system, VMs and vcpus, with KVM's semantics.

This is kvmfs's counterpart of the kernel's virt/kvm/kvm_main.c: one ioctl
dispatcher per object kind (``SYSTEM_IOCTLS``, ``VM_IOCTLS``, ``VCPU_IOCTLS``),
each case a small function taking the object and the call. Validation and
errnos follow /dev/kvm; architecture state and execution belong to a backend
(kvmfs.backends.base). Nothing here knows about FUSE: the fs layer turns opens,
releases and ioctls into calls on these objects.

Lifetime follows the kernel's reference counting: a VM lives while anything
holds it (an open ``vm`` file, an open vcpu file, or the ``kvm`` handle that
created it until the ``vm`` file is first opened); vcpus live as long as their VM.
"""

from __future__ import annotations

import ctypes
import errno
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TypeVar

from kvmfs import abi, procmem
from kvmfs.backends.base import Backend, BackendError, VcpuBackend, VmBackend
from kvmfs.memory import GuestRam

# Limits, as x86 KVM reports them (KVM_CHECK_EXTENSION).
MAX_VCPUS = 1024  # KVM_CAP_MAX_VCPUS
RECOMMENDED_VCPUS = min(os.cpu_count() or 1, MAX_VCPUS)  # KVM_CAP_NR_VCPUS: the online cpus
MAX_VCPU_ID = 4096  # KVM_CAP_MAX_VCPU_ID: ids are 0 .. MAX_VCPU_ID - 1
USER_MEM_SLOTS = 32764  # KVM_CAP_NR_MEMSLOTS
MAX_IO_MSRS = 256  # KVM_GET_MSRS/KVM_SET_MSRS: larger nmsrs is E2BIG
MAX_CPUID_ENTRIES = 256  # KVM_SET_CPUID2: larger nent is E2BIG
VCPU_MMAP_SIZE = 3 * abi.PAGE_SIZE  # kvm_run page, PIO data page, coalesced MMIO page
USERSPACE_LIMIT = 0x7FFF_FFFF_F000  # x86-64 TASK_SIZE_MAX: access_ok()'s bound
GUEST_PHYS_LIMIT = 1 << 52  # kvm_mmu_max_gfn(): slots must end below MAXPHYADDR
TSS_ADDR_LIMIT = 0x1_0000_0000 - 3 * abi.PAGE_SIZE  # the three TSS pages must fit below 4 GiB

SUPPORTED_MEMORY_FLAGS = abi.KVM_MEM_LOG_DIRTY_PAGES | abi.KVM_MEM_READONLY


class KvmError(Exception):
    """An ioctl failing with ``errno``, as the kernel's ``return -E…``."""

    def __init__(self, error: int, message: str = "") -> None:
        super().__init__(message or errno.errorcode.get(error, str(error)))
        self.errno = error


@dataclass(frozen=True)
class Ioctl:
    """One ioctl call as the object layer sees it: FUSE's restricted-mode view plus the caller."""

    cmd: int
    arg: int  # the raw argument: a value for _IO commands, the caller's pointer otherwise
    data: bytes  # the _IOW/_IOWR struct, exactly _IOC_SIZE(cmd) bytes; empty otherwise
    tid: int  # the calling thread

    def struct(self, kind: type[S]) -> S:
        """The argument struct, copied in (copy_from_user)."""
        return kind.from_buffer_copy(self.data)

    def read_caller(self, offset: int, size: int) -> bytes:
        """Caller memory past the fixed-size struct: the entries of a variable-length struct."""
        return procmem.read(self.tid, self.arg + offset, size)

    def write_caller(self, offset: int, data: bytes) -> None:
        procmem.write(self.tid, self.arg + offset, data)


S = TypeVar("S", bound=ctypes.Structure)
# An ioctl's answer: the return value, plus the struct copied out for _IOR/_IOWR commands.
Reply = int | tuple[int, ctypes.Structure]


@dataclass(frozen=True)
class Handler:
    """One case of a dispatcher. ``threaded`` cases block or touch caller memory:
    the fs layer runs them in a worker thread, never in the trio thread."""

    function: Callable[..., Reply]
    threaded: bool = False


# --- the system (/dev/kvm) ------------------------------------------------------------------


class System:
    """What /dev/kvm stands for: the backend and every live VM of the mount."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.vms: dict[int, Vm] = {}
        self._next_vm_number = 0

    def create_vm(self, creator: SystemHandle, uid: int, tid: int) -> Vm:
        number = self._next_vm_number  # never reused within a mount
        self._next_vm_number += 1
        vm = Vm(self, number, uid, procmem.thread_group(tid), self.backend.create_vm())
        self.vms[number] = vm
        creator.unopened_vms.add(vm)
        vm.creator, vm.holders = creator, 1
        return vm

    def capability(self, cap: int) -> int:
        return CAPABILITIES.get(cap, 0)


@dataclass(eq=False)
class SystemHandle:
    """One open of the ``kvm`` file. It holds the VMs it created until their ``vm`` file is opened."""

    system: System
    unopened_vms: set[Vm] = field(default_factory=set)

    def release(self) -> list[Vm]:
        """Drop the holds; return the VMs that died."""
        unopened, self.unopened_vms = self.unopened_vms, set()
        for vm in unopened:
            vm.creator = None
        return [vm for vm in unopened if vm.put()]


CAPABILITIES: dict[int, int] = {
    abi.KVM_CAP_HLT: 1,
    abi.KVM_CAP_USER_MEMORY: 1,
    abi.KVM_CAP_SET_TSS_ADDR: 1,
    abi.KVM_CAP_EXT_CPUID: 1,
    abi.KVM_CAP_NR_VCPUS: RECOMMENDED_VCPUS,
    abi.KVM_CAP_MAX_VCPUS: MAX_VCPUS,
    abi.KVM_CAP_MAX_VCPU_ID: MAX_VCPU_ID,
    abi.KVM_CAP_NR_MEMSLOTS: USER_MEM_SLOTS,
    abi.KVM_CAP_MP_STATE: 1,
    abi.KVM_CAP_DESTROY_MEMORY_REGION_WORKS: 1,
    abi.KVM_CAP_JOIN_MEMORY_REGIONS_WORKS: 1,
    abi.KVM_CAP_SET_IDENTITY_MAP_ADDR: 1,
    abi.KVM_CAP_SET_GUEST_DEBUG: 1,
    abi.KVM_CAP_READONLY_MEM: 1,
    abi.KVM_CAP_IMMEDIATE_EXIT: 1,
}


def check_extension(holder: System | Vm, call: Ioctl) -> int:
    system = holder if isinstance(holder, System) else holder.system
    return system.capability(call.arg)


def get_api_version(system: System, call: Ioctl) -> int:
    _no_argument(call)
    return abi.KVM_API_VERSION


def get_vcpu_mmap_size(system: System, call: Ioctl) -> int:
    _no_argument(call)
    return VCPU_MMAP_SIZE


def _no_argument(call: Ioctl) -> None:
    if call.arg:
        raise KvmError(errno.EINVAL)


def get_msr_index_list(system: System, call: Ioctl) -> Reply:
    indices = system.backend.msr_index_list()
    header = call.struct(abi.kvm_msr_list)
    room = header.nmsrs
    header.nmsrs = len(indices)
    if room < len(indices):
        call.write_caller(0, bytes(header))  # KVM tells the size needed, then fails
        raise KvmError(errno.E2BIG)
    call.write_caller(ctypes.sizeof(header), bytes((ctypes.c_uint32 * len(indices))(*indices)))
    return 0, header


def get_supported_cpuid(system: System, call: Ioctl) -> Reply:
    entries = system.backend.supported_cpuid()
    header = call.struct(abi.kvm_cpuid2)
    if header.nent < len(entries):
        raise KvmError(errno.E2BIG)
    header.nent = len(entries)
    call.write_caller(ctypes.sizeof(header), b"".join(bytes(entry) for entry in entries))
    return 0, header


# KVM_CREATE_VM lives in the fs layer's system dispatcher: it needs the kvm handle.
SYSTEM_IOCTLS: dict[int, Handler] = {
    abi.KVM_GET_API_VERSION: Handler(get_api_version),
    abi.KVM_CHECK_EXTENSION: Handler(check_extension),
    abi.KVM_GET_VCPU_MMAP_SIZE: Handler(get_vcpu_mmap_size),
    abi.KVM_GET_MSR_INDEX_LIST: Handler(get_msr_index_list, threaded=True),
    abi.KVM_GET_SUPPORTED_CPUID: Handler(get_supported_cpuid, threaded=True),
}


# --- VMs ----------------------------------------------------------------------------------


@dataclass(eq=False)
class MemorySlot:
    """A KVM memory slot; ``ram`` is the daemon memory the backend maps for it (kvmfs.memory)."""

    slot: int
    flags: int
    guest_phys_addr: int
    size: int
    userspace_addr: int
    ram: GuestRam

    @property
    def readonly(self) -> bool:
        return bool(self.flags & abi.KVM_MEM_READONLY)

    def overlaps(self, gpa: int, size: int) -> bool:
        return gpa < self.guest_phys_addr + self.size and self.guest_phys_addr < gpa + size


class Vm:
    """One VM: its memory slots, its vcpus, and the holders that keep it alive."""

    def __init__(self, system: System, number: int, owner_uid: int, pid: int, backend: VmBackend) -> None:
        self.system = system
        self.number = number
        self.owner_uid = owner_uid
        self.pid = pid  # the creating process: KVM ties a VM to its creator's mm
        self.backend = backend
        self.holders = 0
        self.creator: SystemHandle | None = None  # the kvm handle holding the VM until its first open
        self.vcpus: dict[int, Vcpu] = {}
        self.slots: dict[int, MemorySlot] = {}
        self.tss_addr: int | None = None
        self.identity_map_addr: int | None = None
        self.dead = False
        self._creator_threads: set[int] = {pid}
        # Vcpus in KVM_RUN, and the condition they park on while memory changes under them.
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._running: set[Vcpu] = set()
        self._pausing = 0

    def hold(self) -> None:
        self.holders += 1

    def open_vm_file(self) -> None:
        """An open of the ``vm`` file holds the VM; the first one ends the creating handle's hold."""
        self.hold()
        if self.creator is not None:
            self.creator.unopened_vms.discard(self)
            self.creator = None
            self.put()

    def put(self) -> bool:
        """Drop one hold; on the last one destroy the VM and return True."""
        self.holders -= 1
        if self.holders:
            return False
        self.destroy()
        return True

    def destroy(self) -> None:
        self.dead = True
        self.system.vms.pop(self.number, None)
        for vcpu in self.vcpus.values():
            vcpu.backend.close()
        self.vcpus.clear()
        self.backend.close()
        for slot in self.slots.values():
            slot.ram.close()
        self.slots.clear()

    def refresh_memory(self) -> None:
        """Take in what the client wrote to guest memory, and drop code translated from it.

        Called outside ``running``: dropping code pauses the VM's running vcpus (the backend
        must not touch a vcpu inside the guest), which the caller must not be one of.
        """
        changed = [
            (slot.guest_phys_addr + offset, length)
            for slot in list(self.slots.values())
            for offset, length in slot.ram.refresh()
        ]
        if changed:
            with self.paused():
                for gpa, length in changed:
                    self.backend.memory_changed(gpa, length)

    def check_caller(self, call: Ioctl) -> None:
        """KVM refuses VM and vcpu ioctls from any process but the VM's creator (EIO)."""
        if self.dead:
            raise KvmError(errno.EIO)
        if call.tid not in self._creator_threads:  # reading /proc costs more than the ioctl
            if procmem.thread_group(call.tid) != self.pid:
                raise KvmError(errno.EIO)
            self._creator_threads.add(call.tid)

    # Memory changes while vcpus run: KVM kicks them and they pick the change up
    # inside KVM_RUN. Here a change pauses the running vcpus (they park inside
    # KVM_RUN, without returning to the client), applies, and resumes them.

    @contextmanager
    def paused(self) -> Iterator[None]:
        with self._lock:
            self._pausing += 1
        # Kick until every running vcpu has parked (one may enter the backend just after a kick),
        # without the lock: the vcpu needs it to park.
        while True:
            with self._lock:
                waiting = self._unparked()
            if not waiting:
                break
            for vcpu in waiting:
                vcpu.backend.kick()
            with self._lock:
                self._changed.wait_for(lambda: not self._unparked(), timeout=0.01)
        try:
            yield
        finally:
            with self._lock:
                self._pausing -= 1
                self._changed.notify_all()

    def _unparked(self) -> list[Vcpu]:
        """Running vcpus not yet parked (call with the lock held)."""
        return [vcpu for vcpu in self._running if not vcpu.parked]

    @contextmanager
    def running(self, vcpu: Vcpu) -> Iterator[None]:
        with self._lock:
            self._changed.wait_for(lambda: not self._pausing)
            self._running.add(vcpu)
        try:
            yield
        finally:
            with self._lock:
                self._running.discard(vcpu)
                self._changed.notify_all()

    def park_if_paused(self, vcpu: Vcpu) -> bool:
        """Called by a vcpu whose run was kicked: wait out a pause. True if there was one."""
        with self._lock:
            if not self._pausing:
                return False
            vcpu.parked = True
            self._changed.notify_all()
            self._changed.wait_for(lambda: not self._pausing)
            vcpu.parked = False
            return True


def create_vcpu(vm: Vm, call: Ioctl) -> int:
    vcpu_id = call.arg
    if vcpu_id >= MAX_VCPU_ID or len(vm.vcpus) >= MAX_VCPUS:
        raise KvmError(errno.EINVAL)
    if vcpu_id in vm.vcpus:
        raise KvmError(errno.EEXIST)
    vm.vcpus[vcpu_id] = Vcpu(vm, vcpu_id, vm.backend.create_vcpu(vcpu_id))
    return vcpu_id


def set_user_memory_region(vm: Vm, call: Ioctl) -> int:
    region = call.struct(abi.kvm_userspace_memory_region)
    slot_id, size, gpa = region.slot & 0xFFFF, region.memory_size, region.guest_phys_addr
    address_space = region.slot >> 16
    if region.flags & ~SUPPORTED_MEMORY_FLAGS:
        raise KvmError(errno.EINVAL)
    if size % abi.PAGE_SIZE or gpa % abi.PAGE_SIZE or region.userspace_addr % abi.PAGE_SIZE:
        raise KvmError(errno.EINVAL)
    if region.userspace_addr + size > USERSPACE_LIMIT:
        raise KvmError(errno.EINVAL)
    if address_space or slot_id >= USER_MEM_SLOTS or gpa + size > GUEST_PHYS_LIMIT:
        raise KvmError(errno.EINVAL)
    old = vm.slots.get(slot_id)
    if size == 0:
        if old is None:
            raise KvmError(errno.EINVAL)
        with vm.paused():
            _remove_slot(vm, old)
        return 0
    if old is not None:
        # An existing slot may only move (same size and memory) or change dirty logging.
        if size != old.size or region.userspace_addr != old.userspace_addr:
            raise KvmError(errno.EINVAL)
        if (region.flags ^ old.flags) & abi.KVM_MEM_READONLY:
            raise KvmError(errno.EINVAL)
        if gpa == old.guest_phys_addr and region.flags == old.flags:
            return 0
    if any(other.overlaps(gpa, size) for other in vm.slots.values() if other is not old):
        raise KvmError(errno.EEXIST)
    ram = old.ram if old is not None else GuestRam(vm.pid, region.userspace_addr, size)
    new = MemorySlot(slot_id, region.flags, gpa, size, region.userspace_addr, ram)
    with vm.paused():
        if old is not None:  # a move: the same memory at a new guest address
            vm.backend.unmap_memory(old.guest_phys_addr, old.size)
        vm.slots[slot_id] = new
        vm.backend.map_memory(gpa, size, ram.address, new.readonly)
    return 0


def _remove_slot(vm: Vm, slot: MemorySlot) -> None:
    vm.backend.unmap_memory(slot.guest_phys_addr, slot.size)
    del vm.slots[slot.slot]
    slot.ram.close()


def set_tss_addr(vm: Vm, call: Ioctl) -> int:
    if call.arg > TSS_ADDR_LIMIT:
        raise KvmError(errno.EINVAL)
    vm.tss_addr = call.arg
    return 0


def set_identity_map_addr(vm: Vm, call: Ioctl) -> int:
    if vm.vcpus:
        raise KvmError(errno.EINVAL)
    vm.identity_map_addr = call.struct(ctypes.c_uint64).value
    return 0


VM_IOCTLS: dict[int, Handler] = {
    abi.KVM_CREATE_VCPU: Handler(create_vcpu),
    abi.KVM_SET_USER_MEMORY_REGION: Handler(set_user_memory_region, threaded=True),
    abi.KVM_SET_TSS_ADDR: Handler(set_tss_addr),
    abi.KVM_SET_IDENTITY_MAP_ADDR: Handler(set_identity_map_addr),
    abi.KVM_CHECK_EXTENSION: Handler(check_extension),
}


# --- vcpus --------------------------------------------------------------------------------


class Vcpu:
    """One vcpu: its backend state and ``run_area``, the daemon's copy of its mmap area
    (struct kvm_run, then the PIO data page)."""

    def __init__(self, vm: Vm, vcpu_id: int, backend: VcpuBackend) -> None:
        self.vm = vm
        self.vcpu_id = vcpu_id
        self.backend = backend
        self.run_area = (ctypes.c_char * VCPU_MMAP_SIZE)()
        self.parked = False
        self.has_run = False
        self.cpuid: list[abi.kvm_cpuid_entry2] = []

    @property
    def kvm_run(self) -> abi.kvm_run:
        return abi.kvm_run.from_buffer(self.run_area)

    def run(self) -> int:
        """KVM_RUN: sync guest memory, run to an exit, sync back. Blocks (worker thread)."""
        vm = self.vm
        kvm_run = self.kvm_run
        # With immediate_exit KVM completes a pending IN or MMIO read, then returns EINTR
        # leaving exit_reason as it was; the backend reports it as KVM_EXIT_INTR.
        immediate_exit, previous_exit = kvm_run.immediate_exit, kvm_run.exit_reason
        self.has_run = True
        vm.refresh_memory()
        with vm.running(self):
            try:
                self.backend.run(self.run_area)
                while kvm_run.exit_reason == abi.KVM_EXIT_INTR and vm.park_if_paused(self):
                    self.backend.run(self.run_area)
            finally:
                for slot in vm.slots.values():
                    slot.ram.publish()
        if immediate_exit:
            kvm_run.exit_reason = previous_exit
            raise KvmError(errno.EINTR)
        if kvm_run.exit_reason == abi.KVM_EXIT_INTR:
            raise KvmError(errno.EINTR)
        return 0

    def kick(self) -> None:
        """A signal reached the client during KVM_RUN: make the run return EINTR."""
        self.backend.kick()


def _state_ioctls(state: str, kind: type[ctypes.Structure]) -> tuple[Handler, Handler]:
    """KVM_GET_<state> and KVM_SET_<state>: a struct copied out of, or into, the backend."""

    def getter(vcpu: Vcpu, call: Ioctl) -> Reply:
        return 0, getattr(vcpu.backend, f"get_{state}")()

    def setter(vcpu: Vcpu, call: Ioctl) -> int:
        try:
            getattr(vcpu.backend, f"set_{state}")(call.struct(kind))
        except BackendError as error:
            raise KvmError(error.errno) from None
        return 0

    return Handler(getter), Handler(setter)


def run(vcpu: Vcpu, call: Ioctl) -> int:
    return vcpu.run()


def get_msrs(vcpu: Vcpu, call: Ioctl) -> int:
    count = _msr_count(call)
    entries = (abi.kvm_msr_entry * count).from_buffer_copy(
        call.read_caller(ctypes.sizeof(abi.kvm_msrs), count * ctypes.sizeof(abi.kvm_msr_entry))
    )
    done = 0
    for entry in entries:
        value = vcpu.backend.get_msr(entry.index)
        if value is None:
            break
        entry.data = value
        done += 1
    call.write_caller(ctypes.sizeof(abi.kvm_msrs), bytes(entries))
    return done


def set_msrs(vcpu: Vcpu, call: Ioctl) -> int:
    count = _msr_count(call)
    entries = (abi.kvm_msr_entry * count).from_buffer_copy(
        call.read_caller(ctypes.sizeof(abi.kvm_msrs), count * ctypes.sizeof(abi.kvm_msr_entry))
    )
    done = 0
    for entry in entries:
        if not vcpu.backend.set_msr(entry.index, entry.data):
            break
        done += 1
    return done


def _msr_count(call: Ioctl) -> int:
    count = call.struct(abi.kvm_msrs).nmsrs
    if count >= MAX_IO_MSRS:
        raise KvmError(errno.E2BIG)
    return count


def set_cpuid2(vcpu: Vcpu, call: Ioctl) -> int:
    count = call.struct(abi.kvm_cpuid2).nent
    if count > MAX_CPUID_ENTRIES:
        raise KvmError(errno.E2BIG)
    size = ctypes.sizeof(abi.kvm_cpuid_entry2)
    raw = call.read_caller(ctypes.sizeof(abi.kvm_cpuid2), count * size)
    if vcpu.has_run and raw != b"".join(bytes(entry) for entry in vcpu.cpuid):
        raise KvmError(errno.EINVAL)  # KVM freezes CPUID once the vcpu has run: only the same table again
    vcpu.cpuid = list((abi.kvm_cpuid_entry2 * count).from_buffer_copy(raw))
    vcpu.backend.set_cpuid(vcpu.cpuid)
    return 0


def get_cpuid2(vcpu: Vcpu, call: Ioctl) -> Reply:
    header = call.struct(abi.kvm_cpuid2)
    if header.nent < len(vcpu.cpuid):
        raise KvmError(errno.E2BIG)
    header.nent = len(vcpu.cpuid)
    call.write_caller(ctypes.sizeof(header), b"".join(bytes(entry) for entry in vcpu.cpuid))
    return 0, header


def translate(vcpu: Vcpu, call: Ioctl) -> Reply:
    vcpu.vm.refresh_memory()  # the page tables are the client's, maybe written since the last run
    return 0, vcpu.backend.translate(call.struct(abi.kvm_translation).linear_address)


def interrupt(vcpu: Vcpu, call: Ioctl) -> int:
    vector = call.struct(abi.kvm_interrupt).irq
    if vector >= abi.KVM_NR_INTERRUPTS:
        raise KvmError(errno.EINVAL)
    vcpu.backend.queue_interrupt(vector)
    return 0


def get_mp_state(vcpu: Vcpu, call: Ioctl) -> Reply:
    return 0, abi.kvm_mp_state(vcpu.backend.get_mp_state())


def set_mp_state(vcpu: Vcpu, call: Ioctl) -> int:
    state = call.struct(abi.kvm_mp_state).mp_state
    if state != abi.KVM_MP_STATE_RUNNABLE:  # without an in-kernel local APIC, KVM takes nothing else
        raise KvmError(errno.EINVAL)
    vcpu.backend.set_mp_state(state)
    return 0


def set_guest_debug(vcpu: Vcpu, call: Ioctl) -> int:
    vcpu.backend.set_guest_debug(call.struct(abi.kvm_guest_debug))
    return 0


_get_regs, _set_regs = _state_ioctls("regs", abi.kvm_regs)
_get_sregs, _set_sregs = _state_ioctls("sregs", abi.kvm_sregs)
_get_fpu, _set_fpu = _state_ioctls("fpu", abi.kvm_fpu)

VCPU_IOCTLS: dict[int, Handler] = {
    abi.KVM_RUN: Handler(run, threaded=True),
    abi.KVM_GET_REGS: _get_regs,
    abi.KVM_SET_REGS: _set_regs,
    abi.KVM_GET_SREGS: _get_sregs,
    abi.KVM_SET_SREGS: _set_sregs,
    abi.KVM_GET_FPU: _get_fpu,
    abi.KVM_SET_FPU: _set_fpu,
    abi.KVM_GET_MSRS: Handler(get_msrs, threaded=True),
    abi.KVM_SET_MSRS: Handler(set_msrs, threaded=True),
    abi.KVM_SET_CPUID2: Handler(set_cpuid2, threaded=True),
    abi.KVM_GET_CPUID2: Handler(get_cpuid2, threaded=True),
    abi.KVM_TRANSLATE: Handler(translate, threaded=True),
    abi.KVM_INTERRUPT: Handler(interrupt),
    abi.KVM_GET_MP_STATE: Handler(get_mp_state),
    abi.KVM_SET_MP_STATE: Handler(set_mp_state),
    abi.KVM_SET_GUEST_DEBUG: Handler(set_guest_debug),
}
