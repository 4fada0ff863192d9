"""The core filesystem: layout, ioctls outside KVM_RUN, and their errnos against /dev/kvm."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import stat
from collections.abc import Callable

import pytest

from kvmfs import abi
from tests.conftest import Target, ioctl_result, raw_ioctl

libc_mmap = ctypes.CDLL(None, use_errno=True).mmap
libc_mmap.restype = ctypes.c_void_p
libc_mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
MAP_FAILED = 2**64 - 1


def both(kvmfs: Target, request: pytest.FixtureRequest) -> list[Target]:
    """kvmfs, and /dev/kvm where the machine has it: the /dev/kvm half skips alone."""
    targets = [kvmfs]
    if os.access("/dev/kvm", os.R_OK | os.W_OK):
        targets.append(request.getfixturevalue("devkvm"))
    return targets


def same_on_both(kvmfs: Target, request: pytest.FixtureRequest, scenario: Callable[[Target], object]) -> object:
    """Run ``scenario`` on kvmfs and on /dev/kvm; they must agree. Returns kvmfs's result."""
    results = [scenario(target) for target in both(kvmfs, request)]
    if len(results) == 2:
        assert results[0] == results[1], "kvmfs (left) differs from /dev/kvm (right)"
    return results[0]


# --- system ioctls ---------------------------------------------------------------------------


def test_system_ioctls_match_dev_kvm(kvmfs: Target, request: pytest.FixtureRequest) -> None:
    def scenario(target: Target) -> list[object]:
        kvm = target.kvm()
        return [
            ioctl_result(kvm, abi.KVM_GET_API_VERSION),
            ioctl_result(kvm, abi.KVM_GET_API_VERSION, 1),
            ioctl_result(kvm, abi.KVM_GET_VCPU_MMAP_SIZE),
            ioctl_result(kvm, abi.KVM_GET_VCPU_MMAP_SIZE, 1),
            ioctl_result(kvm, abi.KVM_CREATE_VM, 1),
            ioctl_result(kvm, abi.KVM_CREATE_VM, -1),
            ioctl_result(kvm, abi.KVM_CREATE_VCPU, 0),  # a VM ioctl on /dev/kvm
            ioctl_result(kvm, abi.KVM_GET_REGS, abi.kvm_regs()),  # a vcpu ioctl on /dev/kvm
            ioctl_result(kvm, abi._io(0xFF)),
            ioctl_result(kvm, 0x5401, 0),  # TCGETS: not KVM's at all
            ioctl_result(kvm, abi.KVM_CHECK_EXTENSION, 100000),
        ]

    assert same_on_both(kvmfs, request, scenario)[0] == 12


def test_create_vm_returns_fresh_numbers(kvmfs: Target) -> None:
    kvm = kvmfs.kvm()
    first = fcntl.ioctl(kvm, abi.KVM_CREATE_VM, 0)
    second = fcntl.ioctl(kvm, abi.KVM_CREATE_VM, 0)
    assert first >= 0 and second > first
    assert {f"vm{first}", f"vm{second}"} <= set(os.listdir(kvmfs.mount))


def test_capabilities_report_only_what_kvmfs_implements(kvmfs: Target, request: pytest.FixtureRequest) -> None:
    """Every capability kvmfs reports, /dev/kvm reports with the same value (on system and VM fds)."""
    caps = [value for name, value in vars(abi).items() if name.startswith("KVM_CAP_")]
    kvm, vm = kvmfs.kvm(), kvmfs.create_vm()
    reported = {cap: fcntl.ioctl(kvm, abi.KVM_CHECK_EXTENSION, cap) for cap in caps}
    assert reported == {cap: fcntl.ioctl(vm, abi.KVM_CHECK_EXTENSION, cap) for cap in caps}
    assert reported[abi.KVM_CAP_USER_MEMORY] == 1 and reported[abi.KVM_CAP_IRQCHIP] == 0
    if len(both(kvmfs, request)) == 2:
        dev = request.getfixturevalue("devkvm").kvm()
        for cap, value in reported.items():
            if value:
                assert fcntl.ioctl(dev, abi.KVM_CHECK_EXTENSION, cap) == value, f"capability {cap}"


# --- VM ioctls -------------------------------------------------------------------------------


def test_create_vcpu_ids_and_errors_match_dev_kvm(kvmfs: Target, request: pytest.FixtureRequest) -> None:
    def scenario(target: Target) -> list[object]:
        vm = target.create_vm()
        results = [ioctl_result(vm, abi.KVM_CREATE_VCPU, vcpu_id) for vcpu_id in (0, 1, 4095)]
        results = [isinstance(result, int) for result in results]  # /dev/kvm returns fds
        results += [ioctl_result(vm, abi.KVM_CREATE_VCPU, vcpu_id) for vcpu_id in (0, 4096, 0x7FFFFFFF)]
        results += [ioctl_result(vm, abi.KVM_GET_REGS, abi.kvm_regs()), ioctl_result(vm, abi._io(0xFF))]
        results += [ioctl_result(vm, abi.KVM_GET_API_VERSION), ioctl_result(vm, abi.KVM_CREATE_VM, 0)]
        return results

    assert same_on_both(kvmfs, request, scenario)[:3] == [True, True, True]


def test_create_vcpu_returns_its_id_and_a_file(kvmfs: Target) -> None:
    vm = kvmfs.create_vm()
    assert fcntl.ioctl(vm, abi.KVM_CREATE_VCPU, 7) == 7
    vm_dir = os.readlink(f"/proc/self/fd/{vm}").rsplit("/", 1)[0]
    assert sorted(os.listdir(vm_dir)) == ["vcpu7", "vm"]


def memory_region(slot: int, gpa: int, size: int, address: int, flags: int = 0) -> abi.kvm_userspace_memory_region:
    return abi.kvm_userspace_memory_region(slot, flags, gpa, size, address)


def test_set_user_memory_region_validation_matches_dev_kvm(kvmfs: Target, request: pytest.FixtureRequest) -> None:
    memory = mmap.mmap(-1, 0x40000)
    address = ctypes.addressof(ctypes.c_char.from_buffer(memory))

    def scenario(target: Target) -> list[object]:
        vm = target.create_vm()
        cases = [
            memory_region(0, 0, 0x10000, address),
            memory_region(0, 0, 0x10000, address),  # the same again
            memory_region(1, 0x10800, 0x1000, address),  # gpa not page aligned
            memory_region(1, 0x20000, 0x1800, address),  # size not page aligned
            memory_region(1, 0x20000, 0x1000, address + 8),  # address not page aligned
            memory_region(1, 0x8000, 0x10000, address + 0x10000),  # overlaps slot 0
            memory_region(0, 0, 0x20000, address),  # resize
            memory_region(0, 0, 0x10000, address + 0x10000),  # other memory
            memory_region(0, 0, 0x10000, address, abi.KVM_MEM_READONLY),  # readonly on an existing slot
            memory_region(0, 0x100000, 0x10000, address),  # move
            memory_region(0, 0x100000, 0x10000, address, abi.KVM_MEM_LOG_DIRTY_PAGES),  # dirty logging on
            memory_region(5, 0, 0, address),  # delete a slot that does not exist
            memory_region(32763, 0x200000, 0x1000, address),
            memory_region(32764, 0x300000, 0x1000, address),  # past KVM_CAP_NR_MEMSLOTS
            memory_region(0x10000, 0x400000, 0x1000, address),  # address space 1
            memory_region(2, 0x500000, 0x1000, address, 0x4),  # unknown flag
            memory_region(2, 0xFFFF_FFFF_FFFF_F000, 0x2000, address),  # gpa + size wraps
            memory_region(2, 0x600000, 0x1000, 0xFFFF_8000_0000_0000),  # kernel address
            memory_region(2, 0x700000, 0x1000, 0x1000),  # unmapped: only the range is checked
            memory_region(3, 0x800000, 0x1000, address, abi.KVM_MEM_READONLY),
            memory_region(0, 0x100000, 0, address),  # delete
            memory_region(0, 0x100000, 0, address),  # delete again
            memory_region(4, 0x900000, 0, address),  # size 0 on a new slot
        ]
        return [ioctl_result(vm, abi.KVM_SET_USER_MEMORY_REGION, case) for case in cases]

    results = same_on_both(kvmfs, request, scenario)
    assert results[:3] == [0, 0, "EINVAL"] and results[5] == "EEXIST"


def test_tss_and_identity_map_addresses_match_dev_kvm(kvmfs: Target, request: pytest.FixtureRequest) -> None:
    def scenario(target: Target) -> list[object]:
        vm = target.create_vm()
        results = [raw_ioctl(vm, abi.KVM_SET_TSS_ADDR, value) for value in (0xFFFBD000, 0xFFFFD000, 0xFFFFD001)]
        results.append(ioctl_result(vm, abi.KVM_SET_IDENTITY_MAP_ADDR, ctypes.c_uint64(0xFFFBC000)))
        target.create_vcpu(vm)
        results.append(ioctl_result(vm, abi.KVM_SET_IDENTITY_MAP_ADDR, ctypes.c_uint64(0xFFFBC000)))
        results.append(raw_ioctl(vm, abi.KVM_SET_TSS_ADDR, 0xFFFBD000))
        return results

    assert same_on_both(kvmfs, request, scenario) == [0, 0, "EINVAL", 0, "EINVAL", 0]


# --- vcpu ioctls -----------------------------------------------------------------------------

STATE_STRUCTS = [
    (abi.KVM_GET_REGS, abi.KVM_SET_REGS, abi.kvm_regs),
    (abi.KVM_GET_SREGS, abi.KVM_SET_SREGS, abi.kvm_sregs),
    (abi.KVM_GET_FPU, abi.KVM_SET_FPU, abi.kvm_fpu),
]


def reset_state(target: Target, vcpu_id: int) -> list[bytes]:
    vm = target.create_vm()
    vcpu = target.create_vcpu(vm, vcpu_id)
    state = []
    for get, _, kind in STATE_STRUCTS:
        value = kind()
        fcntl.ioctl(vcpu, get, value)
        state.append(value)
    mp_state = abi.kvm_mp_state()
    fcntl.ioctl(vcpu, abi.KVM_GET_MP_STATE, mp_state)
    return [*state, mp_state]


def comparable_reset_state(target: Target, vcpu_id: int) -> list[bytes]:
    """The reset state, less MXCSR: this machine's KVM (kvm_pvm, nested) always reports MXCSR 0,
    even right after KVM_SET_FPU wrote 0x1f80; kvmfs keeps the architectural 0x1f80."""
    state = reset_state(target, vcpu_id)
    fpu = state[2]
    assert target.mount is None or fpu.mxcsr == 0x1F80
    fpu.mxcsr = 0
    return state


@pytest.mark.parametrize("vcpu_id", [0, 1])
def test_reset_state_equals_dev_kvm(kvmfs: Target, request: pytest.FixtureRequest, vcpu_id: int) -> None:
    state = same_on_both(kvmfs, request, lambda target: comparable_reset_state(target, vcpu_id))
    regs, sregs = state[0], state[1]
    assert (regs.rip, regs.rflags, sregs.cs.selector, sregs.cs.base) == (0xFFF0, 2, 0xF000, 0xFFFF0000)
    assert sregs.apic_base == (0xFEE00900 if vcpu_id == 0 else 0xFEE00800)


def test_state_is_kept_per_vcpu(kvmfs: Target) -> None:
    vm = kvmfs.create_vm()
    first, second = kvmfs.create_vcpu(vm, 0), kvmfs.create_vcpu(vm, 1)
    regs = abi.kvm_regs(rax=0x1234, rbx=0x5678, rip=0x1000, rflags=0x202)
    fcntl.ioctl(first, abi.KVM_SET_REGS, regs)
    sregs = abi.kvm_sregs()
    fcntl.ioctl(first, abi.KVM_GET_SREGS, sregs)
    sregs.cs.base, sregs.cs.selector = 0x10000, 0x1000
    fcntl.ioctl(first, abi.KVM_SET_SREGS, sregs)
    back, other = abi.kvm_regs(), abi.kvm_regs()
    fcntl.ioctl(first, abi.KVM_GET_REGS, back)
    fcntl.ioctl(second, abi.KVM_GET_REGS, other)
    assert back == regs and other.rax == 0 and other.rip == 0xFFF0
    sregs_back = abi.kvm_sregs()
    fcntl.ioctl(first, abi.KVM_GET_SREGS, sregs_back)
    assert (sregs_back.cs.base, sregs_back.cs.selector) == (0x10000, 0x1000)


def test_wrong_kind_and_unknown_vcpu_ioctls_match_dev_kvm(kvmfs: Target, request: pytest.FixtureRequest) -> None:
    def scenario(target: Target) -> list[object]:
        vcpu = target.create_vcpu(target.create_vm())
        return [
            ioctl_result(vcpu, abi._io(0xFF)),
            ioctl_result(vcpu, abi.KVM_CREATE_VCPU, 1),
            ioctl_result(vcpu, abi.KVM_GET_API_VERSION),
            ioctl_result(vcpu, abi.KVM_CHECK_EXTENSION, abi.KVM_CAP_USER_MEMORY),
            ioctl_result(vcpu, abi.KVM_SET_USER_MEMORY_REGION, abi.kvm_userspace_memory_region()),
        ]

    same_on_both(kvmfs, request, scenario)


def test_set_regs_keeps_rflags_reserved_bit(kvmfs: Target, request: pytest.FixtureRequest) -> None:
    def scenario(target: Target) -> int:
        vcpu = target.create_vcpu(target.create_vm())
        fcntl.ioctl(vcpu, abi.KVM_SET_REGS, abi.kvm_regs(rflags=0))
        regs = abi.kvm_regs()
        fcntl.ioctl(vcpu, abi.KVM_GET_REGS, regs)
        return regs.rflags

    assert same_on_both(kvmfs, request, scenario) == 2


def test_msr_index_list_e2big_tells_the_size(kvmfs: Target, request: pytest.FixtureRequest) -> None:
    kvm = kvmfs.kvm()
    header = abi.kvm_msr_list(0)
    assert ioctl_result(kvm, abi.KVM_GET_MSR_INDEX_LIST, header) == "E2BIG"
    needed = header.nmsrs
    assert needed > 0
    buffer = (ctypes.c_uint32 * (1 + needed))(needed)
    assert fcntl.ioctl(kvm, abi.KVM_GET_MSR_INDEX_LIST, buffer) == 0
    indices = set(buffer[1:])
    assert {abi.MSR_EFER, abi.MSR_LSTAR, abi.MSR_IA32_TSC} <= indices


# --- layout ----------------------------------------------------------------------------------


def test_layout_modes_and_owners(kvmfs: Target) -> None:
    mount = kvmfs.mount
    assert mount is not None
    assert stat.S_IMODE(os.stat(f"{mount}/kvm").st_mode) == 0o666
    vm = kvmfs.create_vm()
    vcpu_a, vcpu_b = kvmfs.create_vcpu(vm, 0), kvmfs.create_vcpu(vm, 1)
    vm_dir = os.readlink(f"/proc/self/fd/{vm}").rsplit("/", 1)[0]
    assert stat.S_IMODE(os.stat(vm_dir).st_mode) == 0o700 and stat.S_ISDIR(os.stat(vm_dir).st_mode)
    for name in ("vm", "vcpu0", "vcpu1"):
        info = os.stat(f"{vm_dir}/{name}")
        assert stat.S_IMODE(info.st_mode) == 0o600 and info.st_uid == os.getuid()
    inodes = {os.fstat(fd).st_ino for fd in (vm, vcpu_a, vcpu_b)}
    assert len(inodes) == 3, "each vcpu is its own inode"
    assert os.fstat(vcpu_a).st_size == fcntl.ioctl(kvmfs.kvm(), abi.KVM_GET_VCPU_MMAP_SIZE)


def test_vcpu_mmap_is_kvm_run_and_others_refuse_mmap(kvmfs: Target, request: pytest.FixtureRequest) -> None:
    def scenario(target: Target) -> list[object]:
        kvm = target.kvm()
        vm = target.create_vm()
        vcpu = target.create_vcpu(vm)
        results: list[object] = []
        size = fcntl.ioctl(kvm, abi.KVM_GET_VCPU_MMAP_SIZE)
        run_area = mmap.mmap(vcpu, size, mmap.MAP_SHARED)
        results.append(len(run_area))
        run_area.close()
        for fd in (kvm, vm):  # through libc: Python's mmap refuses files of size 0 itself
            address = libc_mmap(None, 4096, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
            results.append(errno.errorcode[ctypes.get_errno()] if address == MAP_FAILED else "mapped")
        return results

    assert same_on_both(kvmfs, request, scenario) == [12288, "ENODEV", "ENODEV"]
