"""Recording what a scenario sees from KVM, as plain data that compares equal across targets.

A trace is a list of entries: (ioctl name, result or errno name), one per KVM_RUN with the exit's fields,
and final register and memory state. Two targets behave the same when their traces are equal; the
first differing entry says where they part.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from kvmfs import abi
from kvmfs.client import GuestMemory, VcpuFd, VmFd

T = TypeVar("T")

EXIT_NAMES = {
    value: name
    for name, value in vars(abi).items()
    if name.startswith("KVM_EXIT_") and not name.startswith(("KVM_EXIT_IO_", "KVM_EXIT_INTERNAL_ERROR_"))
}


def plain(value: object) -> Any:
    """ctypes structs as dicts and arrays as lists (readable diffs); fds as a marker (their numbers differ)."""
    if isinstance(value, ctypes.Structure):
        return {name: plain(getattr(value, name)) for name, *_ in value._fields_ if not name.startswith("pad")}
    if isinstance(value, ctypes.Array):
        return [plain(item) for item in value]
    if isinstance(value, list | tuple):
        return type(value)(plain(item) for item in value)
    if isinstance(value, VmFd | VcpuFd):
        return type(value).__name__
    return value


def exit_fields(vcpu: VcpuFd) -> dict[str, Any]:
    """kvm_run after an exit: the common header and the fields the exit reason defines."""
    run = vcpu.run
    fields: dict[str, Any] = {
        "reason": EXIT_NAMES.get(run.exit_reason, run.exit_reason),
        "if_flag": run.if_flag,
        "ready_for_interrupt_injection": run.ready_for_interrupt_injection,
        "flags": run.flags,
        "cr8": run.cr8,
        "apic_base": run.apic_base,
    }
    if run.exit_reason == abi.KVM_EXIT_IO:
        io = run.io
        fields.update(direction=io.direction, size=io.size, port=io.port, count=io.count, data_offset=io.data_offset)
        if io.direction == abi.KVM_EXIT_IO_OUT:
            fields["data"] = vcpu.io_data()
    elif run.exit_reason == abi.KVM_EXIT_MMIO:
        mmio = run.mmio
        fields.update(phys_addr=mmio.phys_addr, len=mmio.len, is_write=mmio.is_write)
        if mmio.is_write:
            fields["data"] = vcpu.mmio_data()
    elif run.exit_reason == abi.KVM_EXIT_DEBUG:
        fields.update(plain(run.debug.arch))
    elif run.exit_reason == abi.KVM_EXIT_INTERNAL_ERROR:
        fields["suberror"] = run.internal.suberror
    elif run.exit_reason == abi.KVM_EXIT_FAIL_ENTRY:
        fields["hardware_entry_failure_reason"] = run.fail_entry.hardware_entry_failure_reason
    return fields


def pattern(seed: int, size: int) -> bytes:
    """Deterministic input data, different for every IN / MMIO read so mix-ups show."""
    return bytes((0xA0 + 7 * seed + i) & 0xFF for i in range(size))


RUN_TIMEOUT = 5.0  # no scenario's KVM_RUN takes a fraction of this


def _ignore(signum: int, frame: object) -> None:
    """SIGALRM only has to interrupt a KVM_RUN (it then fails with EINTR); nothing else to do."""


@contextlib.contextmanager
def _watchdog() -> Iterator[None]:
    """Turns a KVM_RUN that never returns into EINTR (a failing trace) instead of a hung test run."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGALRM, _ignore)
    signal.setitimer(signal.ITIMER_REAL, RUN_TIMEOUT)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class Trace(list):
    """The entries of one scenario's run on one target."""

    def call(self, name: str, fn: Callable[..., T], *args: Any) -> T | None:
        """Calls fn, recording its result or its errno; returns the result (None on error)."""
        try:
            result = fn(*args)
        except OSError as error:
            self.append((name, errno.errorcode[error.errno]))
            return None
        self.append((name, plain(result)))
        return result

    def note(self, name: str, value: object) -> None:
        """Records a value the client observed (guest memory, a computed fact)."""
        self.append((name, plain(value)))

    def run(self, vcpu: VcpuFd) -> int | None:
        """KVM_RUN once; records the outcome and the exit; returns the exit reason (None on error)."""
        try:
            with _watchdog():
                vcpu.run()
        except OSError as error:
            self.append(("KVM_RUN", errno.errorcode[error.errno], exit_fields(vcpu)))
            return None
        self.append(("KVM_RUN", 0, exit_fields(vcpu)))
        return vcpu.run.exit_reason

    def _feed(self, vcpu: VcpuFd, reason: int | None) -> bool:
        """Supplies pattern() data to an IN or MMIO read; False when the exit is neither IO nor MMIO."""
        run = vcpu.run
        if reason == abi.KVM_EXIT_IO:
            if run.io.direction == abi.KVM_EXIT_IO_IN:
                vcpu.set_io_data(pattern(len(self), run.io.size * run.io.count))
        elif reason == abi.KVM_EXIT_MMIO:
            if not run.mmio.is_write:
                vcpu.set_mmio_data(pattern(len(self), run.mmio.len))
        else:
            return False
        return True

    def drive(self, vcpu: VcpuFd, limit: int = 100) -> int | None:
        """Runs until an exit other than IO or MMIO, feeding every IN and MMIO read; returns its reason."""
        for _ in range(limit):
            reason = self.run(vcpu)
            if not self._feed(vcpu, reason):
                return reason
        raise AssertionError(f"no final exit within {limit} runs")

    def until_out(self, vcpu: VcpuFd, port: int, limit: int = 10) -> None:
        """Runs, feeding INs and MMIO reads, up to and including the next OUT to `port`."""
        for _ in range(limit):
            reason = self.run(vcpu)
            if not self._feed(vcpu, reason):
                raise AssertionError(f"unexpected exit {reason} waiting for an OUT to {port:#x}")
            io = vcpu.run.io
            if reason == abi.KVM_EXIT_IO and io.direction == abi.KVM_EXIT_IO_OUT and io.port == port:
                return
        raise AssertionError(f"no OUT to {port:#x} within {limit} runs")

    def state(self, vcpu: VcpuFd, *memories: GuestMemory) -> None:
        """Records the final registers and every byte of guest memory."""
        self.call("KVM_GET_REGS", vcpu.get_regs)
        self.call("KVM_GET_SREGS", vcpu.get_sregs)
        for i, mem in enumerate(memories):
            self.append((f"memory{i}", mem.read(0, mem.size)))

    def exits(self) -> list[dict[str, Any]]:
        return [entry[2] for entry in self if entry[0] == "KVM_RUN"]

    def out_bytes(self, port: int) -> bytes:
        """Everything the guest wrote to `port`, in order."""
        return b"".join(e["data"] for e in self.exits() if e.get("port") == port and "data" in e)

    def value(self, name: str) -> Any:
        """The recorded value of the last entry called `name`."""
        return next(entry[1] for entry in reversed(self) if entry[0] == name)


def _first_difference(a: bytes, b: bytes) -> str:
    at = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
    here, there = a[at : at + 16].hex(), b[at : at + 16].hex()
    return f"sizes {len(a)} vs {len(b)}; first difference at {at:#x}: {here} vs {there}"


def assert_same(actual: Trace, expected: Trace, actual_name: str = "kvmfs", expected_name: str = "devkvm") -> None:
    """Fails at the first entry where the traces differ, showing it and the entry before it."""
    for i, (got, want) in enumerate(zip(actual, expected, strict=False)):
        if got != want:
            before = f"after {expected[i - 1]!r}\n" if i else ""
            if isinstance(got[-1], bytes) and isinstance(want[-1], bytes) and got[0] == want[0]:
                detail = f"{got[0]}: {_first_difference(got[-1], want[-1])}"
            else:
                detail = f"{actual_name}: {got!r}\n{expected_name}: {want!r}"
            raise AssertionError(f"traces differ at entry {i}\n{before}{detail}")
    if len(actual) != len(expected):
        longer, name = (actual, actual_name) if len(actual) > len(expected) else (expected, expected_name)
        extra = longer[min(len(actual), len(expected))]
        raise AssertionError(f"{name} has more entries: {len(actual)} vs {len(expected)}; next is {extra!r}")
