"""IN and MMIO instructions the backend completes itself (no single step), against /dev/kvm.

Every form the decoder knows is run in lockstep with /dev/kvm: exit fields, then the
registers at the next exit show what the completion wrote. Forms it does not know take
the single-step path and must give the same result.
"""

from __future__ import annotations

import pytest

from kvmfs import abi

from .guests import CODE, MMIO, MODES, setup
from .harness import Machine, both
from .test_exits import lockstep

SIGNED = bytes(range(0x81, 0xC1))  # high bits set: sign extension shows


@pytest.mark.parametrize("mode", MODES)
def test_in_forms(mode: str) -> None:
    lockstep(
        mode,
        """
        mov eax, 0xffffffff
        in al, 0x60
        in ax, 0x61
        mov eax, 0xffffffff
        in eax, 0x62
        mov dx, 0x3f8
        in ax, dx
        in eax, dx
        hlt
        """,
        answer=SIGNED,
    )


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("direction", ["cld", "std"])
def test_ins_forms(mode: str, direction: str) -> None:
    lockstep(
        mode,
        f"""
        {direction}
        mov edi, 0x4800
        mov dx, 0x10
        insb
        insd
        mov ecx, 3
        rep insw
        mov ecx, 1
        rep insb
        cld
        hlt
        """,
        exits=10,
        answer=SIGNED,
    )


@pytest.mark.parametrize("mode", MODES)
def test_completed_in_state_before_the_next_instruction(mode: str) -> None:
    """immediate_exit right after the data: RIP, RCX, RDI and RF exactly as KVM leaves them."""
    for code in ("in al, 0x60", "mov ecx, 2\nmov edi, 0x4800\nmov dx, 0x10\nrep insb", "mov edi, 0x4800\ninsw"):
        seen = []
        for m in both():
            setup(m, mode, f"{code}\nnop\nhlt")
            assert m.run().exit_reason == abi.KVM_EXIT_IO
            m.set_pio_data(b"\x11\x22\x33\x44")
            m.kvm_run.immediate_exit = 1
            assert m.run().exit_reason == abi.KVM_EXIT_INTR
            seen.append((bytes(m.vcpu.get_regs()), m.read(0x4800, 4)))
            m.close()
        assert seen[0] == seen[-1], code


def _loads(mode: str) -> str:
    wide = "rbx" if mode == "long64" else "ebx"
    base = "bx" if mode == "real" else wide
    lines = [
        f"mov {wide}, {MMIO:#x}",
        "mov eax, 0xffffffff",
        "mov ecx, 0xffffffff",
        f"mov al, [{base}]",
        f"mov ah, [{base} + 1]",
        f"mov cx, [{base} + 2]",
        f"mov edx, [{base} + 4]",
        f"movzx esi, byte ptr [{base} + 8]",
        f"movzx edi, word ptr [{base} + 10]",
        f"movsx eax, byte ptr [{base} + 12]",
        f"movsx ecx, word ptr [{base} + 14]",
        f"movsx dx, byte ptr [{base} + 16]",
        f"mov al, ds:[{MMIO + 20:#x}]",
        f"mov eax, ds:[{MMIO + 24:#x}]",
    ]
    if mode == "long64":
        lines += [
            "mov rax, [rbx + 32]",
            "mov r9, [rbx + 40]",
            "mov r10b, [rbx + 48]",
            "mov sil, [rbx + 49]",
            "movsxd r11, dword ptr [rbx + 52]",
            "movsx r12, word ptr [rbx + 56]",
            "movabs rax, [0xd040]",
        ]
    return "\n".join([*lines, "hlt"])


@pytest.mark.parametrize("mode", MODES)
def test_mmio_loads(mode: str) -> None:
    trace = lockstep(mode, _loads(mode), exits=30, answer=SIGNED)
    assert all(t[0] == abi.KVM_EXIT_MMIO for t in trace[:-2])


def _stores(mode: str) -> str:
    wide = "rbx" if mode == "long64" else "ebx"
    base = "bx" if mode == "real" else wide
    lines = [
        f"mov {wide}, {MMIO:#x}",
        "mov eax, 0x81828384",
        "mov ecx, 0x91929394",
        f"mov [{base}], al",
        f"mov [{base} + 1], ah",
        f"mov [{base} + 2], cx",
        f"mov [{base} + 4], eax",
        f"mov byte ptr [{base} + 8], 0x7f",
        f"mov word ptr [{base} + 10], 0x1234",
        f"mov dword ptr [{base} + 12], 0x89abcdef",
        f"mov ds:[{MMIO + 16:#x}], al",
        f"mov ds:[{MMIO + 20:#x}], eax",
        f"mov edi, {MMIO + 24:#x}",
        "stosb",
        "stosd",
        "std",
        "stosw",
        "cld",
        f"mov es:[{base} + 32], ecx",
    ]
    if mode == "long64":
        lines += [
            "mov r9, 0x1122334455667788",
            "mov [rbx + 40], r9",
            "mov [rbx + 48], r9b",
            "mov qword ptr [rbx + 56], -2",
            "mov rdi, 0xd040",
            "stosq",
            "movabs [0xd048], rax",
        ]
    return "\n".join([*lines, "hlt"])


@pytest.mark.parametrize("mode", MODES)
def test_mmio_stores(mode: str) -> None:
    trace = lockstep(mode, _stores(mode), exits=30)
    assert all((t[0], t[3]) == (abi.KVM_EXIT_MMIO, 1) for t in trace[:-2])


@pytest.mark.parametrize("mode", ["prot32", "long64"])
def test_undecoded_forms_still_exact(mode: str) -> None:
    """Forms the decoder leaves to the single step: read-modify-write, xchg, rep stos, push."""
    wide = "rbx" if mode == "long64" else "ebx"
    lockstep(
        mode,
        f"""
        mov {wide}, {MMIO:#x}
        mov eax, 0x01020304
        add [{wide}], eax
        xchg [{wide} + 8], eax
        mov edi, {MMIO + 16:#x}
        mov ecx, 2
        rep stosb
        or byte ptr [{wide} + 24], 1
        hlt
        """,
        exits=12,
    )


def test_rom_stores_leave_memory(machine: Machine) -> None:
    setup(machine, "prot32", f"mov ebx, {MMIO:#x}\nmov [ebx], ax\nmov byte ptr [ebx + 3], 7\nstosd\nhlt")
    rom = machine.map(MMIO, 0x1000, readonly=True)
    rom[:8] = b"\xaa" * 8
    regs = machine.vcpu.get_regs()
    regs.rax, regs.rdi = 0x1234, MMIO + 4
    machine.vcpu.set_regs(regs)
    exits = []
    for _ in range(4):
        run = machine.run()
        mmio, rip = run.mmio, machine.vcpu.get_regs().rip
        exits.append((run.exit_reason, mmio.phys_addr, mmio.len, bytes(mmio.data[: mmio.len]), rip))
    assert exits == [
        (6, MMIO, 2, b"\x34\x12", CODE + 8),
        (6, MMIO + 3, 1, b"\x07", CODE + 12),
        (6, MMIO + 4, 4, b"\x34\x12\0\0", CODE + 13),
        (abi.KVM_EXIT_HLT, MMIO + 4, 4, b"\x34\x12\0\0", CODE + 14),
    ]
    assert bytes(rom[:8]) == b"\xaa" * 8
    assert machine.vcpu.get_regs().rdi == MMIO + 8


def test_ins_over_code_runs_the_new_code(machine: Machine) -> None:
    """INS data completed by the backend lands on translated code: the guest runs the new bytes."""
    code = "mov edi, offset patch\nmov dx, 0x10\njmp patch\nback: insb\njmp patch\npatch: out 0x20, al\njmp back"
    setup(machine, "prot32", code)
    assert machine.run().io.port == 0x20  # the code at patch is translated now
    assert machine.run().io.port == 0x10
    machine.set_pio_data(b"\xf4")  # hlt over the out
    assert machine.run().exit_reason == abi.KVM_EXIT_HLT
