"""Run one tiny guest on the unicorn backend and on /dev/kvm, side by side.

A ``Machine`` is either side: guest memory the test writes, one vcpu with the
VcpuBackend methods, and its run area. Tests build both from one description and
compare exits and registers.
"""

from __future__ import annotations

import ctypes
import mmap
import subprocess
import tempfile
from pathlib import Path

import pytest

from kvmfs import abi
from kvmfs.backends.unicorn_x86 import UnicornBackend

from . import devkvm

BACKEND = UnicornBackend()


class Machine:
    """A VM with one vcpu and RAM slots; ``memory[gpa]`` gives the mmap of the slot at gpa."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.memory: dict[int, mmap.mmap] = {}
        if kind == "kvm":
            self._kvm = devkvm.KvmVm()
            self.vcpu = self._kvm.create_vcpu(0)
            self.run_area = self.vcpu.run_area
        else:
            self._vm = BACKEND.create_vm()
            self.vcpu = self._vm.create_vcpu(0)
            self.run_area = (ctypes.c_char * (3 * abi.PAGE_SIZE))()

    def map(self, gpa: int, size: int, readonly: bool = False) -> mmap.mmap:
        if self.kind == "kvm":
            area = self._kvm.map_memory(gpa, size, readonly)
        else:
            area = mmap.mmap(-1, size)
            address = ctypes.addressof(ctypes.c_char.from_buffer(area))
            self._vm.map_memory(gpa, size, address, readonly)
        self.memory[gpa] = area
        return area

    def write(self, gpa: int, data: bytes) -> None:
        for base, area in self.memory.items():
            if base <= gpa < base + len(area):
                area[gpa - base : gpa - base + len(data)] = data
                if self.kind != "kvm":
                    self._vm.memory_changed(base, len(area))
                return
        raise ValueError(f"no slot at {gpa:#x}")

    def read(self, gpa: int, size: int) -> bytes:
        for base, area in self.memory.items():
            if base <= gpa < base + len(area):
                return bytes(area[gpa - base : gpa - base + size])
        raise ValueError(f"no slot at {gpa:#x}")

    @property
    def kvm_run(self) -> abi.kvm_run:
        return abi.kvm_run.from_buffer(self.run_area)

    def run(self) -> abi.kvm_run:
        self.vcpu.run(self.run_area)
        return self.kvm_run

    def pio_data(self, size: int) -> bytes:
        return bytes(self.run_area[4096 : 4096 + size])

    def set_pio_data(self, data: bytes) -> None:
        self.run_area[4096 : 4096 + len(data)] = data

    def close(self) -> None:
        if self.kind == "kvm":
            self._kvm.close()
        else:
            self._vm.close()


KINDS = ["unicorn", pytest.param("kvm", marks=pytest.mark.skipif(not devkvm.AVAILABLE, reason="no /dev/kvm"))]


def both() -> list[Machine]:
    """A unicorn machine, and a /dev/kvm one when the device is there."""
    machines = [Machine("unicorn")]
    if devkvm.AVAILABLE:
        machines.append(Machine("kvm"))
    return machines


_CACHE: dict[tuple[str, str], bytes] = {}


def assemble(source: str, bits: int = 16, origin: int = 0) -> bytes:
    """Assemble GNU as source (Intel syntax) to flat bytes; cached per test session."""
    key = (source, f"{bits}:{origin}")
    if key not in _CACHE:
        with tempfile.TemporaryDirectory() as tmp:
            src, obj, out = Path(tmp, "g.s"), Path(tmp, "g.o"), Path(tmp, "g.bin")
            src.write_text(f".intel_syntax noprefix\n.code{bits}\n{source}\n")
            subprocess.run(["as", "--64", "-o", obj, src], check=True, capture_output=True)
            subprocess.run(
                ["ld", "-m", "elf_x86_64", f"-Ttext={origin:#x}", "--oformat", "binary", "-o", out, obj],
                check=True,
                capture_output=True,
            )
            _CACHE[key] = out.read_bytes()
    return _CACHE[key]
