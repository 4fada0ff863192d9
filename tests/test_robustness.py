"""Nothing a client sends, and no way a client dies, may crash, hang or wedge the mount."""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time

from kvmfs import abi
from tests.conftest import Target, ioctl_result, wait_until

_libc = ctypes.CDLL(None, use_errno=True)
INFINITE_LOOP = b"\xeb\xfe"  # jmp $


def test_garbage_ioctls_get_errnos_and_the_daemon_survives(kvmfs: Target) -> None:
    """Random commands of every direction and size, on every kind of file."""
    vm = kvmfs.create_vm()
    vcpu = kvmfs.create_vcpu(vm)
    files = [kvmfs.kvm(), vm, vcpu]
    rng = random.Random(1234)
    buffer = ctypes.create_string_buffer(1 << 14)
    for _ in range(3000):
        direction = rng.choice([abi.IOC_NONE, abi.IOC_WRITE, abi.IOC_READ, abi.IOC_READ | abi.IOC_WRITE])
        size = 0 if direction == abi.IOC_NONE else rng.choice([1, 4, 8, 16, 144, 312, 1024, (1 << 14) - 1])
        nr = rng.choice([rng.randrange(256), 0x46, 0x80, 0x81, 0x83, 0x88, 0x90, 0x91])
        cmd = abi._ioc(direction, nr, size)
        if cmd == abi.KVM_RUN:
            continue  # runs the guest: not garbage
        for fd in files:
            ctypes.memmove(buffer, rng.randbytes(64), 64)
            arg = ctypes.addressof(buffer) if direction else rng.randrange(1 << 32)
            result = _libc.ioctl(fd, ctypes.c_ulong(cmd), ctypes.c_ulong(arg))
            assert result >= 0 or ctypes.get_errno() != 0
    # Still answering, with the right values.
    assert ioctl_result(files[0], abi.KVM_GET_API_VERSION) == 12
    assert os.path.exists(f"{kvmfs.mount}/kvm")


def test_bad_pointers_are_efault(kvmfs: Target) -> None:
    """Variable-length structs read past the header through the caller's pointer: a bad one is EFAULT."""
    kvm = kvmfs.kvm()
    vcpu = kvmfs.create_vcpu(kvmfs.create_vm())
    # nmsrs = 4 entries claimed, but the header ends its page and the next page is inaccessible
    pages = mmap.mmap(-1, 2 * 4096)
    base = ctypes.addressof(ctypes.c_char.from_buffer(pages))
    assert _libc.mprotect(ctypes.c_void_p(base + 4096), ctypes.c_size_t(4096), 0) == 0  # PROT_NONE
    address = base + 4096 - 8
    ctypes.c_uint32.from_address(address).value = 4
    assert _libc.ioctl(vcpu, ctypes.c_ulong(abi.KVM_GET_MSRS), ctypes.c_ulong(address)) == -1
    assert ctypes.get_errno() == errno.EFAULT
    assert ioctl_result(kvm, abi.KVM_GET_API_VERSION) == 12


def looping_vcpu(target: Target) -> tuple[int, mmap.mmap]:
    """A vcpu whose guest spins forever in real mode at 0:0, and its kvm_run."""
    vm = target.create_vm()
    memory = mmap.mmap(-1, 0x10000)
    memory[0:2] = INFINITE_LOOP
    address = ctypes.addressof(ctypes.c_char.from_buffer(memory))
    region = abi.kvm_userspace_memory_region(0, 0, 0, 0x10000, address)
    assert ioctl_result(vm, abi.KVM_SET_USER_MEMORY_REGION, region) == 0
    vcpu = target.create_vcpu(vm)
    sregs = abi.kvm_sregs()
    assert ioctl_result(vcpu, abi.KVM_GET_SREGS, sregs) == 0
    sregs.cs.base, sregs.cs.selector = 0, 0
    assert ioctl_result(vcpu, abi.KVM_SET_SREGS, sregs) == 0
    assert ioctl_result(vcpu, abi.KVM_SET_REGS, abi.kvm_regs(rip=0, rflags=2)) == 0
    target.keep_alive(memory)
    return vcpu, mmap.mmap(vcpu, 12288, mmap.MAP_SHARED)


def test_signal_during_kvm_run_returns_eintr_promptly(kvmfs: Target) -> None:
    vcpu, run_area = looping_vcpu(kvmfs)
    signal.signal(signal.SIGUSR1, lambda *_: None)
    outcome: dict[str, float | int] = {}

    def run() -> None:
        outcome["tid"] = threading.get_native_id()
        result = _libc.ioctl(vcpu, ctypes.c_ulong(abi.KVM_RUN), ctypes.c_ulong(0))
        outcome["result"], outcome["errno"] = result, ctypes.get_errno()
        outcome["returned"] = time.monotonic()

    runner = threading.Thread(target=run)
    runner.start()
    time.sleep(0.3)  # the guest is spinning now
    assert runner.is_alive(), "KVM_RUN returned although the guest loops forever"
    signalled = time.monotonic()
    signal.pthread_kill(runner.ident, signal.SIGUSR1)
    runner.join(timeout=5)
    assert not runner.is_alive(), "KVM_RUN did not return after a signal"
    assert (outcome["result"], outcome["errno"]) == (-1, errno.EINTR)
    assert outcome["returned"] - signalled < 0.5
    assert abi.kvm_run.from_buffer(run_area).exit_reason == abi.KVM_EXIT_INTR
    run_area.close()


def test_immediate_exit_returns_eintr_without_running(kvmfs: Target) -> None:
    vcpu, run_area = looping_vcpu(kvmfs)
    kvm_run = abi.kvm_run.from_buffer(run_area)
    kvm_run.immediate_exit = 1
    assert ioctl_result(vcpu, abi.KVM_RUN) == "EINTR"
    del kvm_run
    run_area.close()


KILLED_CLIENT = textwrap.dedent(
    """
    import ctypes, fcntl, mmap, os, sys
    from kvmfs import abi
    mount = sys.argv[1]
    kvm = os.open(f"{mount}/kvm", os.O_RDWR)
    number = fcntl.ioctl(kvm, abi.KVM_CREATE_VM, 0)
    vm = os.open(f"{mount}/vm{number}/vm", os.O_RDWR)
    memory = mmap.mmap(-1, 0x10000)
    memory[0:2] = b"\\xeb\\xfe"
    address = ctypes.addressof(ctypes.c_char.from_buffer(memory))
    fcntl.ioctl(vm, abi.KVM_SET_USER_MEMORY_REGION, abi.kvm_userspace_memory_region(0, 0, 0, 0x10000, address))
    fcntl.ioctl(vm, abi.KVM_CREATE_VCPU, 0)
    vcpu = os.open(f"{mount}/vm{number}/vcpu0", os.O_RDWR)
    sregs = abi.kvm_sregs()
    fcntl.ioctl(vcpu, abi.KVM_GET_SREGS, sregs)
    sregs.cs.base = sregs.cs.selector = 0
    fcntl.ioctl(vcpu, abi.KVM_SET_SREGS, sregs)
    fcntl.ioctl(vcpu, abi.KVM_SET_REGS, abi.kvm_regs(rip=0, rflags=2))
    print(number, flush=True)
    fcntl.ioctl(vcpu, abi.KVM_RUN, 0)
    """
)


def test_client_killed_mid_kvm_run_leaves_the_mount_usable(kvmfs: Target) -> None:
    mount = kvmfs.mount
    client = subprocess.Popen([sys.executable, "-c", KILLED_CLIENT, str(mount)], stdout=subprocess.PIPE, text=True)
    assert client.stdout is not None
    number = int(client.stdout.readline())
    time.sleep(0.3)  # inside KVM_RUN, guest spinning
    client.kill()
    assert client.wait(timeout=5) == -signal.SIGKILL
    wait_until(lambda: not os.path.exists(f"{mount}/vm{number}"), what="the killed client's VM to go")
    assert ioctl_result(kvmfs.kvm(), abi.KVM_GET_API_VERSION) == 12


def test_code_at_an_unmapped_address_is_an_internal_error_as_kvm(kvmfs_mount: str) -> None:
    """A state the guest cannot run is KVM_EXIT_INTERNAL_ERROR (emulation failure), never a crash."""
    from kvmfs.client import Kvm
    from kvmfs.guests import Machine

    jump_to_nowhere = bytes.fromhex("48c7c000005000ffe0")  # mov rax, 0x500000 ; jmp rax (no slot there)
    paths = [f"{kvmfs_mount}/kvm"] + (["/dev/kvm"] if os.access("/dev/kvm", os.R_OK | os.W_OK) else [])
    outcomes = []
    for path in paths:
        with Kvm.open(path) as kvm, Machine(kvm, "long", jump_to_nowhere) as machine:
            assert machine.vcpu is not None
            reason = machine.vcpu.run()
            outcomes.append((reason, machine.vcpu.run.internal.suberror, machine.vcpu.get_regs().rip))
    assert outcomes[0] == (abi.KVM_EXIT_INTERNAL_ERROR, abi.KVM_INTERNAL_ERROR_EMULATION, 0x500000)
    assert all(outcome == outcomes[0] for outcome in outcomes), "kvmfs (first) differs from /dev/kvm"
