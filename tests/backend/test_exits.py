"""Each exit kind in each CPU mode, run on the unicorn backend and on /dev/kvm side by side."""

from __future__ import annotations

import struct

import pytest

from kvmfs import abi
from kvmfs.backends import x86_state as S

from .guests import MMIO, MODES, setup
from .harness import Machine, both


def _exit_fields(m: Machine) -> tuple:
    """What a KVM client can observe at an exit: the exit's own fields and the registers."""
    run = m.kvm_run
    fields: tuple = (run.exit_reason,)
    if run.exit_reason == abi.KVM_EXIT_IO:
        io = run.io
        fields += (io.direction, io.size, io.port, io.count, io.data_offset)
        if io.direction == abi.KVM_EXIT_IO_OUT:
            fields += (m.pio_data(io.size * io.count),)
    elif run.exit_reason == abi.KVM_EXIT_MMIO:
        mmio = run.mmio
        fields += (mmio.phys_addr, mmio.len, mmio.is_write)
        if mmio.is_write:
            fields += (bytes(mmio.data)[: mmio.len],)
    elif run.exit_reason == abi.KVM_EXIT_DEBUG:
        arch = run.debug.arch
        fields += (arch.exception, arch.pc, arch.dr6 if arch.exception == 1 else None)
    return (*fields, run.if_flag, bytes(m.vcpu.get_regs()))


def lockstep(mode: str, code: str, handler: str = "hlt", exits: int = 8, answer: bytes = b"\x5a" * 64) -> list:
    """Run the guest on every machine until HLT/SHUTDOWN; all must see the same exits."""
    traces = []
    for m in both():
        try:
            setup(m, mode, code, handler)
            trace = []
            for _ in range(exits):
                run = m.run()
                trace.append(_exit_fields(m))
                if run.exit_reason == abi.KVM_EXIT_IO and run.io.direction == abi.KVM_EXIT_IO_IN:
                    m.set_pio_data(answer[: run.io.size * run.io.count])
                if run.exit_reason == abi.KVM_EXIT_MMIO and not run.mmio.is_write:
                    run.mmio.data[:] = list(answer[:8])
                if run.exit_reason in (abi.KVM_EXIT_HLT, abi.KVM_EXIT_SHUTDOWN):
                    break
            trace.append(m.read(0x6F00, 0x100))  # the stack: exception frames
            traces.append(trace)
        finally:
            m.close()
    if len(traces) == 2:
        assert traces[0] == traces[1]
    return traces[0]


@pytest.mark.parametrize("mode", MODES)
def test_port_io(mode: str) -> None:
    trace = lockstep(
        mode,
        """
        mov eax, 0x11223344
        out 0x10, al
        out 0x12, ax
        mov dx, 0x3f8
        out dx, eax
        in al, 0x60
        in ax, dx
        in eax, dx
        hlt
        """,
    )
    assert [t[0] for t in trace[:-1]] == [abi.KVM_EXIT_IO] * 6 + [abi.KVM_EXIT_HLT]


@pytest.mark.parametrize("mode", MODES)
def test_mmio(mode: str) -> None:
    trace = lockstep(
        mode,
        f"""
        mov eax, 0x11223344
        mov ebx, {MMIO:#x}
        mov [ebx], al
        mov [ebx + 4], eax
        mov cl, [ebx + 8]
        mov edx, [ebx + 12]
        add [ebx + 16], eax
        inc esi
        hlt
        """,
    )
    kinds = [(t[0], t[3]) for t in trace[:5]]
    assert kinds == [(abi.KVM_EXIT_MMIO, w) for w in (1, 1, 0, 0, 0)]


@pytest.mark.parametrize("mode", MODES)
def test_string_io(mode: str) -> None:
    lockstep(
        mode,
        """
        mov esi, 0x1000
        mov edi, 0x4000
        mov ecx, 3
        mov dx, 0x10
        rep outsb
        mov ecx, 4
        rep insw
        outsw
        hlt
        """,
        exits=12,
    )


@pytest.mark.parametrize("mode", MODES)
def test_exception_reaches_guest_handler(mode: str) -> None:
    trace = lockstep(mode, "mov eax, 7\nxor ecx, ecx\ndiv ecx\nhlt", handler="out 0x20, al\nhlt")
    assert trace[0][0] == abi.KVM_EXIT_IO


@pytest.mark.parametrize("mode", ["prot32", "long64"])
def test_page_fault_error_code(mode: str) -> None:
    register = "rbx" if mode == "long64" else "ebx"
    lockstep(mode, "mov eax, [0x40000000]\nhlt", handler=f"mov {register}, cr2\nout 0x20, al\nhlt")


@pytest.mark.parametrize("mode", ["prot32", "long64"])
def test_software_breakpoint(mode: str) -> None:
    """Unicorn only: /dev/kvm here (kvm_pvm) fails int3 under USE_SW_BP with an emulation error;
    the expected values are mainline KVM's (exception 3, pc and RIP at the int3)."""
    for m in [Machine("unicorn")]:
        setup(m, mode, "nop\nint3\nnop\nhlt")
        m.vcpu.set_guest_debug(abi.kvm_guest_debug(control=abi.KVM_GUESTDBG_ENABLE | abi.KVM_GUESTDBG_USE_SW_BP))
        run = m.run()
        assert (run.exit_reason, run.debug.arch.exception, run.debug.arch.pc) == (abi.KVM_EXIT_DEBUG, 3, 0x1001)
        assert m.vcpu.get_regs().rip == 0x1001
        m.close()


def test_single_step_exits() -> None:
    for m in both():
        setup(m, "prot32", "nop\ninc eax\nout 0x10, al\ninc eax\nhlt")
        m.vcpu.set_guest_debug(abi.kvm_guest_debug(control=abi.KVM_GUESTDBG_ENABLE | abi.KVM_GUESTDBG_SINGLESTEP))
        seen = []
        for _ in range(5):
            run = m.run()
            seen.append((run.exit_reason, run.debug.arch.pc if run.exit_reason == abi.KVM_EXIT_DEBUG else None))
        assert seen == [(4, 0x1001), (4, 0x1002), (2, None), (4, 0x1005), (4, 0x1006)], m.kind
        assert m.kvm_run.debug.arch.dr6 == 0xFFFF4FF0
        m.close()


@pytest.mark.parametrize("mode", ["prot32", "long64"])
def test_triple_fault_is_shutdown(mode: str) -> None:
    for m in both():
        setup(m, mode, "xor ecx, ecx\ndiv ecx\nhlt")
        sregs = m.vcpu.get_sregs()
        sregs.idt.limit = 0
        m.vcpu.set_sregs(sregs)
        assert m.run().exit_reason == abi.KVM_EXIT_SHUTDOWN, m.kind
        regs = m.vcpu.get_regs()
        assert (regs.rip, regs.rflags & S.RFLAGS_RF) == (0x1002, S.RFLAGS_RF), m.kind  # at the div, RF set
        m.close()


@pytest.mark.parametrize("mode", MODES)
def test_interrupt_injection(mode: str) -> None:
    for m in both():
        setup(m, mode, "sti\nnop\nhlt", handler="out 0x20, al\nhlt")
        m.vcpu.queue_interrupt(0x1F)
        assert m.vcpu.get_sregs().interrupt_bitmap[0] == 1 << 0x1F
        run = m.run()
        assert (run.exit_reason, run.io.port) == (abi.KVM_EXIT_IO, 0x20), m.kind
        m.vcpu.get_regs()
        assert not any(m.vcpu.get_sregs().interrupt_bitmap)
        m.close()


def test_mmio_behind_page_tables() -> None:
    """Linear 0x400000 maps to the MMIO page: exits carry the guest-physical address."""
    traces = []
    for m in both():
        setup(m, "long64", "mov rbx, 0x400010\nmov [rbx], eax\nmov ecx, [rbx + 4]\nhlt")
        m.write(0xA000 + 16, struct.pack("<Q", 0xB003))  # PD[2] -> PT at 0xB000
        m.write(0xB000, struct.pack("<Q", MMIO | 3))  # 0x400000 -> MMIO
        trace = []
        for _ in range(3):
            run = m.run()
            trace.append((run.exit_reason, run.mmio.phys_addr, run.mmio.is_write, m.vcpu.get_regs().rip))
        traces.append(trace)
        m.close()
    assert traces[0][:2] == [(6, MMIO + 0x10, 1, 0x1009), (6, MMIO + 0x14, 0, 0x1009)]
    assert traces[0] == traces[-1]
