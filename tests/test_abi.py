"""kvmfs.abi against the kernel header: every ioctl number, struct size and field offset."""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest

from kvmfs import abi

IOCTLS = [
    name
    for name in dir(abi)
    if name.startswith("KVM_")
    and name[4:].split("_")[0] in {"GET", "SET", "CREATE", "CHECK", "RUN", "TRANSLATE", "INTERRUPT"}
    and isinstance(getattr(abi, name), int)
]
STRUCTS = {
    "kvm_regs": abi.kvm_regs,
    "kvm_sregs": abi.kvm_sregs,
    "kvm_fpu": abi.kvm_fpu,
    "kvm_run": abi.kvm_run,
    "kvm_userspace_memory_region": abi.kvm_userspace_memory_region,
    "kvm_translation": abi.kvm_translation,
    "kvm_guest_debug": abi.kvm_guest_debug,
    "kvm_cpuid_entry2": abi.kvm_cpuid_entry2,
    "kvm_msr_entry": abi.kvm_msr_entry,
}
RUN_FIELDS = [
    "exit_reason",
    "immediate_exit",
    "cr8",
    "apic_base",
    "io.port",
    "io.data_offset",
    "mmio.phys_addr",
    "mmio.data",
    "mmio.len",
    "mmio.is_write",
    "internal.suberror",
    "internal.data",
    "debug.arch.pc",
    "kvm_valid_regs",
    "s",
]


def kernel_values(tmp_path: Path) -> dict[str, int]:
    if shutil.which("cc") is None or not Path("/usr/include/linux/kvm.h").exists():
        pytest.skip("needs a C compiler and <linux/kvm.h>")
    lines = ["#include <linux/kvm.h>", "#include <stddef.h>", "#include <stdio.h>", "int main(void) {"]
    lines += [f'printf("{name} %lu\\n", (unsigned long){name});' for name in IOCTLS]
    lines += [f'printf("sizeof {name} %lu\\n", (unsigned long)sizeof(struct {name}));' for name in STRUCTS]
    lines += [
        f'printf("offset {field} %lu\\n", (unsigned long)offsetof(struct kvm_run, {field}));' for field in RUN_FIELDS
    ]
    lines += ["return 0; }"]
    source, binary = tmp_path / "kvm_abi.c", tmp_path / "kvm_abi"
    source.write_text("\n".join(lines))
    subprocess.run(["cc", "-o", binary, source], check=True)
    output = subprocess.run([binary], check=True, capture_output=True, text=True).stdout
    return {line.rsplit(" ", 1)[0]: int(line.rsplit(" ", 1)[1]) for line in output.splitlines()}


NESTED = {
    "io": abi.kvm_run_io,
    "mmio": abi.kvm_run_mmio,
    "internal": abi.kvm_run_internal,
    "debug": abi.kvm_run_debug,
    "arch": abi.kvm_debug_exit_arch,
}


def run_offset(path: str) -> int:
    """offsetof(struct kvm_run, path) computed from the ctypes layout, e.g. "debug.arch.pc"."""
    kind: type = abi.kvm_run
    offset = 0
    for part in path.split("."):
        offset += getattr(kind, part).offset
        kind = NESTED.get(part, kind)
    return offset


def test_abi_matches_linux_kvm_h(tmp_path: Path) -> None:
    kernel = kernel_values(tmp_path)
    assert len(IOCTLS) > 20
    for name in IOCTLS:
        assert getattr(abi, name) == kernel[name], name
    for name, struct in STRUCTS.items():
        assert ctypes.sizeof(struct) == kernel[f"sizeof {name}"], name
    for path in RUN_FIELDS:
        assert run_offset(path) == kernel[f"offset {path}"], path
