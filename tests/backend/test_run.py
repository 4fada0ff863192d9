"""KVM_RUN behaviour beyond single exits: interruption, memory, CPUID, guest-made mode changes, speed."""

from __future__ import annotations

import ctypes
import gc
import mmap
import struct
import threading
import time

import pytest
import unicorn
from unicorn import x86_const

from kvmfs import abi

from .guests import CODE, GDT, MMIO, setup
from .harness import BACKEND, Machine, assemble


def test_immediate_exit(machine: Machine) -> None:
    setup(machine, "real", "out 0x10, al\nhlt")
    machine.kvm_run.immediate_exit = 1
    assert machine.run().exit_reason == abi.KVM_EXIT_INTR
    assert machine.vcpu.get_regs().rip == CODE
    machine.kvm_run.immediate_exit = 0
    assert machine.run().exit_reason == abi.KVM_EXIT_IO


def test_immediate_exit_completes_pending_in(machine: Machine) -> None:
    setup(machine, "real", "in al, 0x60\nhlt")
    assert machine.run().exit_reason == abi.KVM_EXIT_IO
    machine.set_pio_data(b"\x99")
    machine.kvm_run.immediate_exit = 1
    assert machine.run().exit_reason == abi.KVM_EXIT_INTR
    regs = machine.vcpu.get_regs()
    assert (regs.rax & 0xFF, regs.rip) == (0x99, CODE + 2)


def test_kick_stops_an_endless_loop() -> None:
    m = Machine("unicorn")
    setup(m, "prot32", "l: inc eax\njmp l")
    threading.Timer(0.05, m.vcpu.kick).start()
    started = time.monotonic()
    assert m.run().exit_reason == abi.KVM_EXIT_INTR
    assert time.monotonic() - started < 1
    assert m.vcpu.get_regs().rax > 0
    m.vcpu.kick()  # no run in progress: the next run is not affected
    m.write(CODE, assemble("hlt", 32))
    assert m.run().exit_reason == abi.KVM_EXIT_HLT


def _no_threads(self: threading.Thread) -> None:
    raise AssertionError("the backend started a thread")


def test_kick_just_as_a_run_begins_is_not_lost(monkeypatch: pytest.MonkeyPatch) -> None:
    """One kick, as early as the run is marked running (often before emu_start): never lost,
    and no timer thread."""
    m = Machine("unicorn")
    setup(m, "prot32", "l: inc eax\njmp l")
    for _ in range(50):
        runner = threading.Thread(target=m.run)
        runner.start()
        while not m.vcpu._running:  # white box: the run has begun, the engine may not have
            pass
        with monkeypatch.context() as patch:
            patch.setattr(threading.Thread, "start", _no_threads)
            m.vcpu.kick()
        runner.join(1)
        assert not runner.is_alive()
        assert m.kvm_run.exit_reason == abi.KVM_EXIT_INTR
    m.close()


def test_close_frees_the_engine_and_the_run_area_at_once() -> None:
    """Without the cyclic GC: the unicorn engine is closed and the run area can be unmapped.

    (The binding's Python wrapper object may linger in a ctypes.cast cycle of its own; the
    engine's memory, megabytes, is what matters.)"""
    gc.disable()
    try:
        vm = BACKEND.create_vm()
        ram = (ctypes.c_char * 0x2000)()
        vm.map_memory(0, 0x2000, ctypes.addressof(ram), False)
        ram[0x1000 : 0x1000 + 5] = b"\x88\x07\xe6\x10\xf4"  # mov [bx], al (MMIO); out 0x10, al; hlt
        vcpu = vm.create_vcpu(0)
        regs = vcpu.get_regs()
        regs.rip, regs.rbx = 0x1000, 0xD000
        vcpu.set_regs(regs)
        sregs = vcpu.get_sregs()
        sregs.cs.base, sregs.cs.selector = 0, 0
        vcpu.set_sregs(sregs)
        area = mmap.mmap(-1, 3 * abi.PAGE_SIZE)
        run_area = (ctypes.c_char * len(area)).from_buffer(area)
        for reason in (abi.KVM_EXIT_MMIO, abi.KVM_EXIT_IO, abi.KVM_EXIT_HLT):
            vcpu.run(run_area)
            assert abi.kvm_run.from_buffer(run_area).exit_reason == reason
        engine = vcpu.uc
        del run_area
        vcpu.close()
        vm.close()
        assert not engine._Uc__finalizer.alive  # white box: the binding's uc_close has run
        area.close()  # BufferError if the backend kept a view of it
    finally:
        gc.enable()


def test_readonly_memory_write_is_mmio(machine: Machine) -> None:
    setup(machine, "prot32", f"mov dword ptr [{MMIO:#x}], 0x12345678\nmov eax, [{MMIO:#x}]\nhlt")
    rom = machine.map(MMIO, 0x1000, readonly=True)
    rom[:4] = b"\xaa\xbb\xcc\xdd"
    run = machine.run()
    assert (run.exit_reason, run.mmio.phys_addr, run.mmio.len, run.mmio.is_write) == (6, MMIO, 4, 1)
    assert bytes(run.mmio.data[:4]) == struct.pack("<I", 0x12345678)
    assert machine.run().exit_reason == abi.KVM_EXIT_HLT
    assert machine.vcpu.get_regs().rax == 0xDDCCBBAA


def test_code_changed_by_the_client_runs_new(machine: Machine) -> None:
    setup(machine, "real", "out 0x10, al\njmp 0x1000")
    assert machine.run().io.port == 0x10
    machine.write(CODE, assemble("out 0x11, al", 16))
    assert machine.run().io.port == 0x11


def test_memory_mapped_before_a_vcpu_exists() -> None:
    vm = BACKEND.create_vm()
    area = (ctypes.c_char * 0x10000)()
    vm.map_memory(0xFFFF0000, 0x10000, ctypes.addressof(area), False)
    area[0xFFF0] = 0xF4  # hlt at the reset vector
    vcpu = vm.create_vcpu(0)
    run_area = (ctypes.c_char * 0x3000)()
    vcpu.run(run_area)
    assert abi.kvm_run.from_buffer(run_area).exit_reason == abi.KVM_EXIT_HLT
    assert vcpu.get_regs().rip == 0xFFF1
    vm.close()


def test_cpuid_returns_what_was_set() -> None:
    m = Machine("unicorn")
    setup(m, "prot32", "mov eax, 0x80000008\ncpuid\nhlt")
    m.vcpu.set_cpuid(BACKEND.supported_cpuid())
    assert m.run().exit_reason == abi.KVM_EXIT_HLT
    assert m.vcpu.get_regs().rax == 0x3030


GDT_LOAD = f"""
    lgdt [gdtr]
    mov eax, cr0
    or al, 1
    mov cr0, eax
    ljmp 0x18, offset prot
gdtr: .word 31
    .long {GDT}
.code32
prot:
    mov ax, 0x10
    mov ds, ax
    mov ss, ax
    mov esp, 0x7000
    out 0x32, al
    mov eax, 0x8000
    mov cr3, eax
    mov eax, cr4
    or eax, 0x20
    mov cr4, eax
    mov ecx, 0xc0000080
    rdmsr
    or eax, 0x100
    wrmsr
    mov eax, cr0
    or eax, 0x80000000
    mov cr0, eax
    ljmp 0x08, offset long
.code64
long:
    mov rax, 0x123456789
    out 0x64, al
    hlt
"""


def test_guest_enters_protected_and_long_mode() -> None:
    """Unicorn only: kvm_pvm here cannot turn on paging from 32-bit protected mode (it shuts the
    guest down at mov cr0); the expected state is the architectural one."""
    results = []
    for m in [Machine("unicorn")]:
        setup(m, "real", GDT_LOAD)
        m.write(0x8000, struct.pack("<Q", 0x9003))  # identity-map 2 MiB for long mode
        m.write(0x9000, struct.pack("<Q", 0xA003))
        m.write(0xA000, struct.pack("<Q", 0x83))
        ports = []
        for _ in range(3):
            run = m.run()
            ports.append(run.io.port if run.exit_reason == abi.KVM_EXIT_IO else run.exit_reason)
        sregs = m.vcpu.get_sregs()
        results.append((ports, sregs.cr0, sregs.efer, sregs.cs.selector, sregs.cs.l, m.vcpu.get_regs().rax))
        m.close()
    assert results[0] == ([0x32, 0x64, abi.KVM_EXIT_HLT], 0xE0000011, 0x500, 8, 1, 0x123456789)


def _loop_seconds(run) -> float:
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - started)
    return best


def test_no_per_instruction_work_on_compute() -> None:
    """10^7 dec/jnz iterations run at bare unicorn's pace, give or take this host's drift.

    Not a speed measurement (``kvmfs bench`` is): a guard against per-instruction or
    per-block hooks, which make such a loop several times slower, hence the wide margin.
    """
    source = "mov ecx, 5000000\nl: dec ecx\njnz l\nhlt"
    code = assemble(source, 16, CODE)
    bare = unicorn.Uc(unicorn.UC_ARCH_X86, unicorn.UC_MODE_16)
    bare.mem_map(0, 0x10000)
    bare.mem_write(CODE, code)
    m = Machine("unicorn")
    setup(m, "real", source)

    def ours() -> None:
        m.vcpu.set_regs(abi.kvm_regs(rip=CODE, rflags=2))
        assert m.run().exit_reason == abi.KVM_EXIT_HLT

    ratio = _loop_seconds(lambda: bare.emu_start(CODE, CODE + len(code))) / _loop_seconds(ours)
    assert bare.reg_read(x86_const.UC_X86_REG_ECX) == 0
    assert ratio >= 0.5, f"backend runs at {ratio:.2f}x bare unicorn"


@pytest.mark.parametrize("mode", ["prot32", "long64"])
def test_two_vcpus_share_memory(mode: str) -> None:
    m = Machine("unicorn")
    setup(m, mode, f"mov dword ptr [{0x6000:#x}], 0x11\nhlt")
    second = m._vm.create_vcpu(1)
    assert second.get_sregs().apic_base == 0xFEE00800
    sregs = m.vcpu.get_sregs()
    sregs.apic_base = 0xFEE00800
    second.set_sregs(sregs)
    second.set_regs(m.vcpu.get_regs())
    second.run((ctypes.c_char * 0x3000)())
    assert m.read(0x6000, 4) == b"\x11\0\0\0"
