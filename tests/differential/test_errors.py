"""Bad arguments on both targets: every errno (and every result) must match /dev/kvm's.

Each scenario's expected trace is stored here too, so it is checked where /dev/kvm is absent.
"""

from __future__ import annotations

from kvmfs import abi
from kvmfs.client import GuestMemory, Kvm, ioctl
from kvmfs.guests import MEM_SIZE, REAL_CODE, Machine
from tests.differential.conftest import Target
from tests.differential.trace import Trace


def system(kvm: Kvm, t: Trace) -> None:
    t.call("KVM_GET_API_VERSION", kvm.api_version)
    t.call("KVM_CREATE_VM(type 0xdead)", kvm.create_vm, 0xDEAD)
    for name in ("USER_MEMORY", "SET_TSS_ADDR", "EXT_CPUID", "MP_STATE", "SET_GUEST_DEBUG", "READONLY_MEM"):
        cap = vars(abi)[f"KVM_CAP_{name}"]
        t.call(f"KVM_CHECK_EXTENSION({name}) > 0", lambda cap=cap: kvm.check_extension(cap) > 0)
    t.call("KVM_CHECK_EXTENSION(IMMEDIATE_EXIT)", kvm.check_extension, abi.KVM_CAP_IMMEDIATE_EXIT)
    t.call("KVM_CHECK_EXTENSION(0x7fffffff)", kvm.check_extension, 0x7FFFFFFF)
    t.call("KVM_GET_MSR_INDEX_LIST(nmsrs=0)", lambda: ioctl(kvm.fd, abi.KVM_GET_MSR_INDEX_LIST, abi.kvm_msr_list()))
    t.call(
        "KVM_GET_SUPPORTED_CPUID(nent=1)", lambda: ioctl(kvm.fd, abi.KVM_GET_SUPPORTED_CPUID, abi.kvm_cpuid2(nent=1))
    )
    t.call("KVM_RUN on /dev/kvm", kvm.ioctl, abi.KVM_RUN)
    t.call("KVM_GET_REGS on /dev/kvm", kvm.ioctl, abi.KVM_GET_REGS, abi.kvm_regs())


SYSTEM = [
    ("KVM_GET_API_VERSION", 12),
    ("KVM_CREATE_VM(type 0xdead)", "EINVAL"),
    ("KVM_CHECK_EXTENSION(USER_MEMORY) > 0", True),
    ("KVM_CHECK_EXTENSION(SET_TSS_ADDR) > 0", True),
    ("KVM_CHECK_EXTENSION(EXT_CPUID) > 0", True),
    ("KVM_CHECK_EXTENSION(MP_STATE) > 0", True),
    ("KVM_CHECK_EXTENSION(SET_GUEST_DEBUG) > 0", True),
    ("KVM_CHECK_EXTENSION(READONLY_MEM) > 0", True),
    ("KVM_CHECK_EXTENSION(IMMEDIATE_EXIT)", 1),
    ("KVM_CHECK_EXTENSION(0x7fffffff)", 0),
    ("KVM_GET_MSR_INDEX_LIST(nmsrs=0)", "E2BIG"),
    ("KVM_GET_SUPPORTED_CPUID(nent=1)", "E2BIG"),
    ("KVM_RUN on /dev/kvm", "EINVAL"),
    ("KVM_GET_REGS on /dev/kvm", "EINVAL"),
]


def test_system_ioctls(target: Target) -> None:
    assert target.trace(system) == SYSTEM


def memory_regions(kvm: Kvm, t: Trace) -> None:
    with kvm.create_vm() as vm, GuestMemory(MEM_SIZE) as mem:
        a = mem.address

        def region(why: str, slot: int, gpa: int, size: int, address: int, flags: int = 0) -> None:
            t.call(f"KVM_SET_USER_MEMORY_REGION: {why}", vm.set_user_memory_region, slot, gpa, size, address, flags)

        region("ok", 0, 0, 0x10000, a)
        region("gpa not page aligned", 1, 0x20800, 0x1000, a)
        region("size not page aligned", 1, 0x20000, 0x800, a)
        region("address not page aligned", 1, 0x20000, 0x1000, a + 0x10)
        region("slot out of range", 0x7FFF, 0x20000, 0x1000, a)
        region("unknown flag", 1, 0x20000, 0x1000, a, 0x80)
        region("overlaps slot 0", 1, 0x8000, 0x10000, a + 0x10000)
        region("gpa + size wraps", 1, 0xFFFFFFFFFFFFF000, 0x2000, a)
        region("address + size wraps", 1, 0x20000, 0x2000, 0xFFFFFFFFFFFFF000)
        region("kernel address", 1, 0x20000, 0x1000, 0xFFFF800000000000)
        region("unmapped user address (only checked at use)", 1, 0x20000, 0x1000, 0x7F0000000000)
        region("resize slot 1", 1, 0x20000, 0x2000, 0x7F0000000000)
        region("same region again", 1, 0x20000, 0x1000, 0x7F0000000000)
        region("change address of slot 1", 1, 0x20000, 0x1000, a + 0x10000)
        region("delete slot 1", 1, 0x20000, 0, 0)
        region("delete slot 1 again", 1, 0x20000, 0, 0)
        region("read-only slot", 2, 0x40000, 0x1000, a + 0x20000, abi.KVM_MEM_READONLY)
        region("clear READONLY", 2, 0x40000, 0x1000, a + 0x20000)
        region("log dirty pages on", 0, 0, 0x10000, a, abi.KVM_MEM_LOG_DIRTY_PAGES)
        region("log dirty pages off", 0, 0, 0x10000, a)
        region("same memory at two gpas", 3, 0x100000, 0x10000, a)


MEMORY_REGIONS = [
    ("KVM_SET_USER_MEMORY_REGION: ok", 0),
    ("KVM_SET_USER_MEMORY_REGION: gpa not page aligned", "EINVAL"),
    ("KVM_SET_USER_MEMORY_REGION: size not page aligned", "EINVAL"),
    ("KVM_SET_USER_MEMORY_REGION: address not page aligned", "EINVAL"),
    ("KVM_SET_USER_MEMORY_REGION: slot out of range", "EINVAL"),
    ("KVM_SET_USER_MEMORY_REGION: unknown flag", "EINVAL"),
    ("KVM_SET_USER_MEMORY_REGION: overlaps slot 0", "EEXIST"),
    ("KVM_SET_USER_MEMORY_REGION: gpa + size wraps", "EINVAL"),
    ("KVM_SET_USER_MEMORY_REGION: address + size wraps", "EINVAL"),
    ("KVM_SET_USER_MEMORY_REGION: kernel address", "EINVAL"),
    ("KVM_SET_USER_MEMORY_REGION: unmapped user address (only checked at use)", 0),
    ("KVM_SET_USER_MEMORY_REGION: resize slot 1", "EINVAL"),
    ("KVM_SET_USER_MEMORY_REGION: same region again", 0),
    ("KVM_SET_USER_MEMORY_REGION: change address of slot 1", "EINVAL"),
    ("KVM_SET_USER_MEMORY_REGION: delete slot 1", 0),
    ("KVM_SET_USER_MEMORY_REGION: delete slot 1 again", "EINVAL"),
    ("KVM_SET_USER_MEMORY_REGION: read-only slot", 0),
    ("KVM_SET_USER_MEMORY_REGION: clear READONLY", "EINVAL"),
    ("KVM_SET_USER_MEMORY_REGION: log dirty pages on", 0),
    ("KVM_SET_USER_MEMORY_REGION: log dirty pages off", 0),
    ("KVM_SET_USER_MEMORY_REGION: same memory at two gpas", 0),
]


def test_memory_region_errors(target: Target) -> None:
    assert target.trace(memory_regions) == MEMORY_REGIONS


def vcpus(kvm: Kvm, t: Trace) -> None:
    with kvm.create_vm() as vm:
        first = t.call("KVM_CREATE_VCPU(0)", vm.create_vcpu, 0)
        t.call("KVM_CREATE_VCPU(0) again", vm.create_vcpu, 0)
        t.call("KVM_CREATE_VCPU(1 << 20)", vm.create_vcpu, 1 << 20)
        t.call("KVM_CREATE_VCPU(-1)", vm.create_vcpu, 0xFFFFFFFF)
        second = t.call("KVM_CREATE_VCPU(5)", vm.create_vcpu, 5)
        t.call("KVM_GET_REGS on a VM", vm.ioctl, abi.KVM_GET_REGS, abi.kvm_regs())
        t.call("KVM_RUN on a VM", vm.ioctl, abi.KVM_RUN)
        t.call("KVM_SET_TSS_ADDR", vm.set_tss_addr, 0xFFFBD000)
        t.call("KVM_SET_IDENTITY_MAP_ADDR", vm.set_identity_map_addr, 0xFFFBC000)
        for vcpu in (first, second):
            if vcpu is not None:
                vcpu.close()


VCPUS = [
    ("KVM_CREATE_VCPU(0)", "VcpuFd"),
    ("KVM_CREATE_VCPU(0) again", "EEXIST"),
    ("KVM_CREATE_VCPU(1 << 20)", "EINVAL"),
    ("KVM_CREATE_VCPU(-1)", "EINVAL"),
    ("KVM_CREATE_VCPU(5)", "VcpuFd"),
    ("KVM_GET_REGS on a VM", "ENOTTY"),
    ("KVM_RUN on a VM", "ENOTTY"),
    ("KVM_SET_TSS_ADDR", 0),
    ("KVM_SET_IDENTITY_MAP_ADDR", "EINVAL"),
]


def test_vcpu_creation_errors(target: Target) -> None:
    assert target.trace(vcpus) == VCPUS


def vcpu_arguments(kvm: Kvm, t: Trace) -> None:
    with Machine(kvm, "real", REAL_CODE) as m:
        vcpu = m.vcpu
        t.call("KVM_CREATE_VCPU on a vcpu", vcpu.ioctl, abi.KVM_CREATE_VCPU, 1)
        t.call("KVM_CREATE_VM on a vcpu", vcpu.ioctl, abi.KVM_CREATE_VM, 0)
        t.call("KVM_INTERRUPT(256)", vcpu.interrupt, 256)
        t.call("KVM_SET_MP_STATE(99)", vcpu.set_mp_state, 99)
        t.call("KVM_SET_MP_STATE(HALTED)", vcpu.set_mp_state, abi.KVM_MP_STATE_HALTED)
        t.call("KVM_GET_MP_STATE", vcpu.get_mp_state)
        t.call("KVM_SET_MP_STATE(RUNNABLE)", vcpu.set_mp_state, abi.KVM_MP_STATE_RUNNABLE)
        t.call("KVM_SET_GUEST_DEBUG(unknown bits)", vcpu.set_guest_debug, 0x40000000 | abi.KVM_GUESTDBG_ENABLE)
        t.call("KVM_SET_GUEST_DEBUG(0)", vcpu.set_guest_debug, 0)
        sregs = vcpu.get_sregs()
        sregs.cr0 = 0x80000000  # PG without PE
        t.call("KVM_SET_SREGS(CR0.PG without PE)", vcpu.set_sregs, sregs)
        sregs = vcpu.get_sregs()
        sregs.cr4 = 1 << 31  # reserved
        t.call("KVM_SET_SREGS(reserved CR4 bit)", vcpu.set_sregs, sregs)
        t.call("KVM_SET_CPUID2(nent=300)", vcpu.set_cpuid2, [abi.kvm_cpuid_entry2()] * 300)
        t.call("KVM_GET_CPUID2(nent=0)", lambda: ioctl(vcpu.fd, abi.KVM_GET_CPUID2, abi.kvm_cpuid2(nent=0)))
        t.call("KVM_SET_MSRS(nmsrs=300)", vcpu.set_msrs, [(abi.MSR_STAR, 0)] * 300)
        t.call("KVM_GET_MSRS(nmsrs=0)", vcpu.get_msrs, [])
        t.call("KVM_SET_REGS", vcpu.set_regs, vcpu.get_regs())
        t.call("KVM_GET_FPU fcw", lambda: vcpu.get_fpu().fcw)
        t.call("KVM_SET_FPU", vcpu.set_fpu, vcpu.get_fpu())
        t.call("KVM_RUN exit", lambda: vcpu.run())
        t.call("KVM_SET_CPUID2 after KVM_RUN, different", vcpu.set_cpuid2, [abi.kvm_cpuid_entry2()])


VCPU_ARGUMENTS = [
    ("KVM_CREATE_VCPU on a vcpu", "EINVAL"),
    ("KVM_CREATE_VM on a vcpu", "EINVAL"),
    ("KVM_INTERRUPT(256)", "EINVAL"),
    ("KVM_SET_MP_STATE(99)", "EINVAL"),
    ("KVM_SET_MP_STATE(HALTED)", "EINVAL"),
    ("KVM_GET_MP_STATE", 0),
    ("KVM_SET_MP_STATE(RUNNABLE)", None),
    ("KVM_SET_GUEST_DEBUG(unknown bits)", None),
    ("KVM_SET_GUEST_DEBUG(0)", None),
    ("KVM_SET_SREGS(CR0.PG without PE)", "EINVAL"),
    ("KVM_SET_SREGS(reserved CR4 bit)", "EINVAL"),
    ("KVM_SET_CPUID2(nent=300)", "E2BIG"),
    ("KVM_GET_CPUID2(nent=0)", "E2BIG"),
    ("KVM_SET_MSRS(nmsrs=300)", "E2BIG"),
    ("KVM_GET_MSRS(nmsrs=0)", []),
    ("KVM_SET_REGS", None),
    ("KVM_GET_FPU fcw", 895),
    ("KVM_SET_FPU", None),
    ("KVM_RUN exit", 2),
    ("KVM_SET_CPUID2 after KVM_RUN, different", "EINVAL"),
]


def test_vcpu_argument_errors(target: Target) -> None:
    assert target.trace(vcpu_arguments) == VCPU_ARGUMENTS
