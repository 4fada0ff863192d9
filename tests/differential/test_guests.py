"""Guest programs run on both targets: every exit, the final registers and guest memory must match."""

from __future__ import annotations

import struct

import pytest

from kvmfs import abi, guests
from kvmfs.client import GuestMemory, Kvm
from kvmfs.guests import HELLO, LOAD, SERIAL_PORT, Machine
from tests.differential import programs
from tests.differential.conftest import PVM, Target
from tests.differential.trace import Trace, pattern, plain

HLT, IO, MMIO, DEBUG, SHUTDOWN = "KVM_EXIT_HLT", "KVM_EXIT_IO", "KVM_EXIT_MMIO", "KVM_EXIT_DEBUG", "KVM_EXIT_SHUTDOWN"


def reasons(trace: Trace) -> list[str]:
    return [e["reason"] for e in trace.exits()]


def io_exits(trace: Trace) -> list[tuple[int, int, int, int]]:
    """(direction, size, port, count) of each IO exit."""
    return [(e["direction"], e["size"], e["port"], e["count"]) for e in trace.exits() if e["reason"] == IO]


def hello(kvm: Kvm, t: Trace, mode: str, shared: bool) -> None:
    with Machine(kvm, mode, guests.CODE[mode], shared=shared) as m:
        t.drive(m.vcpu)
        t.state(m.vcpu, m.mem)


@pytest.mark.parametrize("shared", [False, True], ids=["private", "shared"])
@pytest.mark.parametrize("mode", guests.MODES)
def test_hello(target: Target, mode: str, shared: bool) -> None:
    trace = target.trace(hello, mode, shared)
    assert trace.out_bytes(SERIAL_PORT) == HELLO
    assert reasons(trace) == [IO] * len(HELLO) + [HLT]
    assert trace.value("KVM_GET_REGS")["rip"] == LOAD + guests.CODE[mode].index(b"\xf4") + 1


def run_hello_on(kvm: Kvm, t: Trace, mode: str) -> None:
    t.note("run_hello", guests.run_hello(kvm, mode))


@pytest.mark.parametrize("mode", guests.MODES)
def test_run_hello(target: Target, mode: str) -> None:
    assert target.trace(run_hello_on, mode).value("run_hello") == HELLO


def pio(kvm: Kvm, t: Trace) -> None:
    with Machine(kvm, "real", programs.PIO) as m:
        t.drive(m.vcpu)
        t.state(m.vcpu, m.mem)


def test_pio_sizes(target: Target) -> None:
    trace = target.trace(pio)
    outs = [(1, 1, 0x70, 1), (1, 2, 0x70, 1), (1, 4, 0x70, 1), (1, 1, 0x80, 1)]
    ins = [(0, 1, 0x70, 1), (0, 2, 0x70, 1), (0, 4, 0x70, 1), (0, 1, 0x81, 1)]
    assert io_exits(trace) == outs + ins
    assert trace.out_bytes(0x70) == bytes.fromhex("11 3322 77665544")
    at = [i + 1 for i, entry in enumerate(trace) if entry[0] == "KVM_RUN" and entry[2].get("direction") == 0]
    fed = pattern(at[0], 1) + b"\0" + pattern(at[1], 2) + pattern(at[2], 4) + pattern(at[3], 1)
    assert trace.value("memory0")[0x600:0x609] == fed
    assert reasons(trace)[-1] == HLT


def rep_string(kvm: Kvm, t: Trace) -> None:
    with Machine(kvm, "real", programs.REP) as m:
        t.drive(m.vcpu)
        t.state(m.vcpu, m.mem)


def test_rep_outs_ins(target: Target) -> None:
    trace = target.trace(rep_string)
    # KVM emulates OUTS one element per exit but INS all at once (count = cx), from its read-ahead buffer.
    assert io_exits(trace) == [(1, 1, 0x3F8, 1)] * 5 + [(0, 1, 0x3F8, 4), (0, 2, 0x3F8, 2)] + [(1, 4, 0x3F8, 1)] * 3
    assert trace.out_bytes(SERIAL_PORT) == b"Hello" + HELLO[:12]
    regs = trace.value("KVM_GET_REGS")
    assert regs["rcx"] & 0xFFFF == 0 and regs["rdi"] & 0xFFFF == 0x714


def mmio(kvm: Kvm, t: Trace) -> None:
    with Machine(kvm, "real", programs.MMIO, mem_size=0x10000) as m:
        t.drive(m.vcpu)
        t.state(m.vcpu, m.mem)


def test_mmio_unmapped(target: Target) -> None:
    trace = target.trace(mmio)
    exits = [(e["phys_addr"], e["len"], e["is_write"], e.get("data")) for e in trace.exits() if e["reason"] == MMIO]
    assert exits == [
        (0x20010, 1, 0, None),
        (0x20012, 2, 0, None),
        (0x20014, 4, 0, None),
        (0x20020, 1, 1, b"\x5a"),
        (0x20022, 2, 1, b"\x34\x12"),
        (0x20024, 4, 1, b"\xef\xcd\xab\x89"),
    ]
    regs = trace.value("KVM_GET_REGS")
    memory = trace.value("memory0")
    assert memory[0x600] == regs["rbx"] & 0xFF and memory[0x602:0x604] == struct.pack("<H", regs["rcx"] & 0xFFFF)


def long_mmio(kvm: Kvm, t: Trace) -> None:
    with Machine(kvm, "long", programs.LONGMEM) as m:
        t.drive(m.vcpu)
        t.state(m.vcpu, m.mem)


def test_mmio_8_bytes_long_mode(target: Target) -> None:
    trace = target.trace(long_mmio)
    mmio_exits = [(e["phys_addr"], e["len"], e["is_write"]) for e in trace.exits() if e["reason"] == MMIO]
    assert mmio_exits == [(0x300000, 8, 0), (0x300008, 8, 1)]
    assert trace.exits()[1]["data"] == struct.pack("<Q", 0x1122334455667788)
    assert trace.value("memory0")[0x600:0x608] == struct.pack("<Q", 0x1122334455667788)


def readonly_slot(kvm: Kvm, t: Trace) -> None:
    t.call("KVM_CHECK_EXTENSION(READONLY_MEM)", kvm.check_extension, abi.KVM_CAP_READONLY_MEM)
    with Machine(kvm, "real", programs.READONLY, mem_size=0x10000) as m, GuestMemory(0x1000) as rom:
        rom.write(0, pattern(1, 16))
        t.call(
            "set_user_memory_region", m.vm.set_user_memory_region, 1, 0x20000, 0x1000, rom.address, abi.KVM_MEM_READONLY
        )
        t.drive(m.vcpu)
        t.state(m.vcpu, m.mem, rom)


def test_readonly_slot(target: Target) -> None:
    trace = target.trace(readonly_slot)
    assert reasons(trace) == [MMIO, HLT]
    assert trace.exits()[0] | {"phys_addr": 0x20004, "len": 1, "is_write": 1, "data": b"\x99"} == trace.exits()[0]
    regs = trace.value("KVM_GET_REGS")
    assert regs["rbx"] & 0xFF == regs["rcx"] & 0xFF == pattern(1, 16)[4]
    assert trace.value("memory1")[:16] == pattern(1, 16)


def triple_fault(kvm: Kvm, t: Trace, mode: str) -> None:
    """ud2 with an empty IDT: #UD, #GP, #DF cannot be delivered, so the vcpu shuts down.

    Not in real mode: there KVM delivers through the IVT whatever the IDT limit, and the guest runs on.
    """
    with Machine(kvm, mode, programs.UD2) as m:
        sregs = m.vcpu.get_sregs()
        sregs.idt.base, sregs.idt.limit = 0, 0
        m.vcpu.set_sregs(sregs)
        t.drive(m.vcpu)
        t.call("KVM_GET_MP_STATE", m.vcpu.get_mp_state)
        t.state(m.vcpu)


@pytest.mark.parametrize("mode", ["protected", "long"])
def test_triple_fault_shutdown(target: Target, mode: str) -> None:
    trace = target.trace(triple_fault, mode)
    assert reasons(trace) == [SHUTDOWN]
    assert trace.value("KVM_GET_REGS")["rip"] == LOAD


def debug(kvm: Kvm, t: Trace, code: bytes, control: int) -> None:
    """Runs `code` under guest debugging; after an int3 exit the client steps over it, as a debugger does."""
    with Machine(kvm, "real", code) as m:
        t.call("KVM_SET_GUEST_DEBUG", m.vcpu.set_guest_debug, control)
        for _ in range(10):
            reason = t.run(m.vcpu)
            regs = t.call("KVM_GET_REGS", m.vcpu.get_regs)
            if reason not in (abi.KVM_EXIT_DEBUG, abi.KVM_EXIT_IO) or regs.rip >= LOAD + len(code):
                break
            if reason == abi.KVM_EXIT_DEBUG and m.vcpu.run.debug.arch.exception == 3:
                regs = m.vcpu.get_regs()
                regs.rip += 1
                m.vcpu.set_regs(regs)
        t.state(m.vcpu)


def test_int3_sw_breakpoint(target: Target) -> None:
    if PVM and target.on_kvm:
        pytest.xfail("kvm_pvm delivers int3 to the guest (real mode) or fails with an internal error")
    trace = target.trace(debug, programs.DEBUG, abi.KVM_GUESTDBG_ENABLE | abi.KVM_GUESTDBG_USE_SW_BP, compare=not PVM)
    assert reasons(trace) == [DEBUG, HLT]
    assert (trace.exits()[0]["exception"], trace.exits()[0]["pc"]) == (3, LOAD + 3)
    assert trace.value("KVM_GET_REGS")["rax"] == 3


DR6_BS = 0xFFFF4FF0  # DR6 after a single step: BS (bit 14) and the bits that read as 1


def test_single_step(target: Target) -> None:
    trace = target.trace(debug, programs.STEP, abi.KVM_GUESTDBG_ENABLE | abi.KVM_GUESTDBG_SINGLESTEP)
    steps = [(e["reason"], e.get("exception"), e.get("pc"), e.get("dr6")) for e in trace.exits()]
    # The OUT's exit replaces its single-step exit, and a stepped HLT traps instead of exiting as HLT.
    assert steps == [
        (DEBUG, 1, LOAD + 3, DR6_BS),
        (DEBUG, 1, LOAD + 4, DR6_BS),
        (IO, None, None, None),
        (DEBUG, 1, LOAD + 7, DR6_BS),
        (DEBUG, 1, LOAD + 8, DR6_BS),
    ]
    assert trace.value("KVM_GET_REGS")["rax"] == 3


def immediate_exit(kvm: Kvm, t: Trace) -> None:
    with Machine(kvm, "real", guests.REAL_CODE) as m:
        t.call("KVM_CHECK_EXTENSION(IMMEDIATE_EXIT)", kvm.check_extension, abi.KVM_CAP_IMMEDIATE_EXIT)
        t.run(m.vcpu)
        m.vcpu.run.immediate_exit = 1
        t.run(m.vcpu)
        t.call("KVM_GET_REGS", m.vcpu.get_regs)
        m.vcpu.run.immediate_exit = 0
        t.run(m.vcpu)
        t.state(m.vcpu)


def test_immediate_exit(target: Target) -> None:
    """KVM_RUN fails with EINTR before entering the guest and leaves kvm_run as it was (exit_reason too)."""
    trace = target.trace(immediate_exit)
    first, second, third = (entry for entry in trace if entry[0] == "KVM_RUN")
    assert first[1] == 0 and first[2]["data"] == b"H"
    assert second[1] == "EINTR" and second[2] == first[2]
    assert third[1] == 0 and third[2]["data"] == b"e"


VENDOR = b"kvmfs test!!"  # CPUID leaf 0 returns it in ebx, edx, ecx


def fixed_cpuid() -> list[abi.kvm_cpuid_entry2]:
    """A CPUID table independent of the host, so both targets get the same one."""
    ebx, edx, ecx = struct.unpack("<3I", VENDOR)
    return [
        abi.kvm_cpuid_entry2(function=0, eax=1, ebx=ebx, ecx=ecx, edx=edx),
        abi.kvm_cpuid_entry2(function=1, eax=0x000306A9, ebx=0, ecx=0, edx=0x00000001),
    ]


def cpuid(kvm: Kvm, t: Trace) -> None:
    with Machine(kvm, "real", programs.CPUID) as m:
        t.call("KVM_SET_CPUID2", m.vcpu.set_cpuid2, fixed_cpuid())
        # kvm_pvm adds leaves and host features to leaf 1; leaf 0 comes back as set everywhere.
        t.call("KVM_GET_CPUID2 leaf 0", lambda: [e for e in m.vcpu.get_cpuid2() if e.function == 0])
        t.drive(m.vcpu)
        t.state(m.vcpu)


def test_cpuid_from_set_cpuid2(target: Target) -> None:
    trace = target.trace(cpuid)
    assert trace.value("KVM_GET_CPUID2 leaf 0") == [plain(fixed_cpuid()[0])]
    regs = trace.value("KVM_GET_REGS")
    assert struct.pack("<3I", regs["rbx"], regs["rdx"], regs["rcx"]) == VENDOR and regs["rax"] == 1


MSRS = [
    (abi.MSR_IA32_SYSENTER_CS, 0x10),
    (abi.MSR_IA32_SYSENTER_ESP, 0xFFFF800000001000),
    (abi.MSR_IA32_SYSENTER_EIP, 0xFFFF800000002000),
    (abi.MSR_STAR, 0x0023001000000000),
    (abi.MSR_LSTAR, 0xFFFFFFFF81000000),
    (abi.MSR_CSTAR, 0xFFFFFFFF81000100),
    (abi.MSR_SYSCALL_MASK, 0x47700),
    (abi.MSR_KERNEL_GS_BASE, 0x7F0000000000),
    (abi.MSR_IA32_CR_PAT, 0x0007040600070406),
]
UNKNOWN_MSR = 0x4B564DFF  # in KVM's paravirtual range, but not an MSR it implements


def msrs(kvm: Kvm, t: Trace) -> None:
    known = set(kvm.get_msr_index_list())
    t.note("index list has", sorted(index for index, _ in MSRS if index in known))
    with Machine(kvm, "long", guests.LONG_CODE) as m:
        vcpu = m.vcpu
        t.call(
            "KVM_GET_MSRS(reset)", vcpu.get_msrs, [index for index, _ in MSRS] + [abi.MSR_EFER, abi.MSR_IA32_APICBASE]
        )
        t.call("KVM_SET_MSRS", vcpu.set_msrs, MSRS)
        t.call("KVM_GET_MSRS", vcpu.get_msrs, [index for index, _ in MSRS])
        t.call("KVM_SET_MSRS(stops at unknown)", vcpu.set_msrs, [MSRS[3], (UNKNOWN_MSR, 1), MSRS[4]])
        t.call("KVM_GET_MSRS(stops at unknown)", vcpu.get_msrs, [abi.MSR_STAR, UNKNOWN_MSR, abi.MSR_LSTAR])
        t.call("KVM_SET_MSRS(non-canonical)", vcpu.set_msrs, [(abi.MSR_LSTAR, 0x0000800000000000)])
        t.drive(vcpu)
        t.call("KVM_GET_MSRS(after run)", vcpu.get_msrs, [index for index, _ in MSRS] + [abi.MSR_EFER])
        t.state(vcpu)


def test_msrs(target: Target) -> None:
    trace = target.trace(msrs)
    assert trace.value("index list has") == sorted(index for index, _ in MSRS)
    assert trace.value("KVM_SET_MSRS") == len(MSRS)
    assert trace.value("KVM_GET_MSRS") == MSRS
    assert trace.value("KVM_SET_MSRS(stops at unknown)") == 1
    assert trace.value("KVM_GET_MSRS(stops at unknown)") == [(abi.MSR_STAR, MSRS[3][1])]
    assert trace.value("KVM_SET_MSRS(non-canonical)") == 0
    assert trace.value("KVM_GET_MSRS(after run)")[-1] == (abi.MSR_EFER, guests.EFER_LME | guests.EFER_LMA)


TRANSLATED = [0x0, 0x1000, 0x1FFFFF, 0x300123, 0x3FFFFFFF, 0x40000000, 0xFFFF800000000000, 0x7FFFFFFFF000]


def translate(kvm: Kvm, t: Trace, mode: str) -> None:
    with Machine(kvm, mode, guests.CODE[mode]) as m:
        for address in TRANSLATED:
            t.call(f"KVM_TRANSLATE({address:#x})", m.vcpu.translate, address)
        t.drive(m.vcpu)
        for address in TRANSLATED:
            t.call(f"KVM_TRANSLATE({address:#x}) after run", m.vcpu.translate, address)


@pytest.mark.parametrize("mode", ["real", "long", "boot"])
def test_translate(target: Target, mode: str) -> None:
    trace = target.trace(translate, mode)
    after = trace.value("KVM_TRANSLATE(0x1fffff) after run")
    assert (after["physical_address"], after["valid"]) == (0x1FFFFF, 1)
    if mode == "long":
        assert trace.value("KVM_TRANSLATE(0x40000000)")["valid"] == 0
        assert trace.value("KVM_TRANSLATE(0xffff800000000000)")["valid"] == 0


def interrupt(kvm: Kvm, t: Trace) -> None:
    with Machine(kvm, "real", programs.IRQ) as m:
        m.mem.write(0x20 * 4, struct.pack("<HH", programs.IRQ_HANDLER, 0))  # IVT entry of vector 0x20
        t.run(m.vcpu)  # out 0x80: interrupts are on
        t.call("KVM_INTERRUPT", m.vcpu.interrupt, 0x20)
        t.drive(m.vcpu)  # handler's out 0x81, then out 0x82, then hlt
        t.call("KVM_GET_MP_STATE", m.vcpu.get_mp_state)
        t.call("KVM_INTERRUPT(halted)", m.vcpu.interrupt, 0x20)
        t.drive(m.vcpu)
        t.state(m.vcpu, m.mem)


def test_interrupt_through_ivt(target: Target) -> None:
    trace = target.trace(interrupt)
    assert [(e["port"], e["data"]) for e in trace.exits() if e["reason"] == IO] == [
        (0x80, b"\0"),
        (0x81, b"\x42"),
        (0x82, b"\x05"),
        (0x81, b"\x42"),
    ]
    assert reasons(trace)[-1] == HLT and trace.value("KVM_INTERRUPT") is None


def test_program_offsets() -> None:
    """The constants naming places inside the programs point where they claim."""
    assert programs.IRQ[programs.IRQ_HANDLER - LOAD :][:2] == bytes.fromhex("b042")
    assert programs.PATCH[programs.PATCH_IMMEDIATE - LOAD - 1 :][:2] == bytes.fromhex("b301")


def patching(kvm: Kvm, t: Trace, shared: bool) -> None:
    """The guest's stores are visible to the client at once; the client's stores (data and code) are
    visible to the guest at the next KVM_RUN."""
    with Machine(kvm, "real", programs.PATCH, shared=shared) as m:
        t.run(m.vcpu)
        t.note("guest store seen", m.mem.read(0x600, 1))
        m.mem.write(0x601, b"\x99")
        t.run(m.vcpu)
        t.run(m.vcpu)
        m.mem.write(programs.PATCH_IMMEDIATE, b"\x03")
        t.drive(m.vcpu)
        t.state(m.vcpu, m.mem)


@pytest.mark.parametrize("shared", [False, True], ids=["private", "shared"])
def test_client_and_guest_see_each_others_writes(target: Target, shared: bool) -> None:
    trace = target.trace(patching, shared)
    assert trace.value("guest store seen") == b"\x11"
    assert trace.out_bytes(0x80) == bytes([0, 0x01, 0x99, 0x03])
    assert reasons(trace)[-1] == HLT


def slots(kvm: Kvm, t: Trace) -> None:
    """Slot 1 (one page holding 0xab) added at 0x20000, moved to 0x30000, deleted; unmapped reads are MMIO."""
    with Machine(kvm, "real", programs.SLOTS, mem_size=0x10000) as m, GuestMemory(0x1000) as page:
        page.write(0, b"\xab")
        vm, vcpu = m.vm, m.vcpu

        def region(slot: int, gpa: int, size: int, flags: int = 0) -> None:
            name = f"KVM_SET_USER_MEMORY_REGION({slot}, {gpa:#x}, {size:#x}, {flags})"
            t.call(name, vm.set_user_memory_region, slot, gpa, size, page.address, flags)

        region(1, 0x20000, 0x1000)
        region(2, 0x20000, 0x1000)  # overlaps slot 1
        region(1, 0x20000, 0x2000)  # resizing a slot is not allowed
        region(1, 0x20000, 0x1000, abi.KVM_MEM_READONLY)  # nor toggling READONLY
        t.until_out(vcpu, 0x80)  # 0x20000 reads the page
        t.until_out(vcpu, 0x80)  # 0x30000 is MMIO
        region(1, 0x30000, 0x1000)  # move
        t.until_out(vcpu, 0x80)
        t.until_out(vcpu, 0x80)
        region(1, 0x30000, 0)  # delete
        region(1, 0x30000, 0)  # deleting an empty slot is EINVAL
        t.until_out(vcpu, 0x80)
        t.until_out(vcpu, 0x80)
        region(3, 0x20000, 0x1000)  # the same page under a new slot number
        t.until_out(vcpu, 0x80)
        t.until_out(vcpu, 0x80)
        t.state(vcpu, m.mem)


def test_add_move_delete_slots(target: Target) -> None:
    trace = target.trace(slots)
    mapped = [e.get("data") == b"\xab" for e in trace.exits() if e.get("port") == 0x80]
    assert mapped == [True, False, False, True, False, False, True, False]
    results = [entry[1] for entry in trace if entry[0].startswith("KVM_SET_USER_MEMORY_REGION")]
    assert results == [0, "EEXIST", "EINVAL", "EINVAL", 0, 0, "EINVAL", 0]
