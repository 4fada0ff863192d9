"""Release reference counting: a VM lives exactly as long as something holds it."""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from kvmfs import abi
from tests.conftest import wait_until


def create_vm(mount: str) -> tuple[int, int]:
    """A kvm handle and the number of the VM it created (not opened yet)."""
    kvm = os.open(f"{mount}/kvm", os.O_RDWR | os.O_CLOEXEC)
    return kvm, fcntl.ioctl(kvm, abi.KVM_CREATE_VM, 0)


def open_vm(mount: str, number: int) -> int:
    return os.open(f"{mount}/vm{number}/vm", os.O_RDWR | os.O_CLOEXEC)


def open_vcpu(mount: str, number: int, vm: int, vcpu_id: int) -> int:
    assert fcntl.ioctl(vm, abi.KVM_CREATE_VCPU, vcpu_id) == vcpu_id
    return os.open(f"{mount}/vm{number}/vcpu{vcpu_id}", os.O_RDWR | os.O_CLOEXEC)


def alive(mount: str, number: int) -> bool:
    return os.path.exists(f"{mount}/vm{number}")


def wait_dead(mount: str, number: int) -> None:
    wait_until(lambda: not alive(mount, number), what=f"vm{number} to disappear")
    assert f"vm{number}" not in os.listdir(mount)


def test_vm_outlives_its_vm_file_while_a_vcpu_is_open(kvmfs_mount: str) -> None:
    kvm, number = create_vm(kvmfs_mount)
    os.close(kvm)  # the vm file is not open yet: the kvm handle was its only holder
    wait_dead(kvmfs_mount, number)

    kvm, number = create_vm(kvmfs_mount)
    vm = open_vm(kvmfs_mount, number)
    os.close(kvm)
    vcpus = [open_vcpu(kvmfs_mount, number, vm, i) for i in range(2)]
    os.close(vm)
    assert alive(kvmfs_mount, number)
    regs = abi.kvm_regs()
    fcntl.ioctl(vcpus[0], abi.KVM_GET_REGS, regs)  # the VM still works through its vcpus
    os.close(vcpus[0])
    assert alive(kvmfs_mount, number)
    os.close(vcpus[1])
    wait_dead(kvmfs_mount, number)


def test_vm_dies_when_vcpus_close_before_the_vm_file(kvmfs_mount: str) -> None:
    kvm, number = create_vm(kvmfs_mount)
    vm = open_vm(kvmfs_mount, number)
    vcpu = open_vcpu(kvmfs_mount, number, vm, 0)
    os.close(vcpu)
    os.close(kvm)
    assert alive(kvmfs_mount, number)
    assert sorted(os.listdir(f"{kvmfs_mount}/vm{number}")) == ["vcpu0", "vm"], "vcpus live as long as their VM"
    os.close(vm)
    wait_dead(kvmfs_mount, number)


def test_creating_handle_holds_the_vm_only_until_the_first_open(kvmfs_mount: str) -> None:
    kvm, number = create_vm(kvmfs_mount)
    assert alive(kvmfs_mount, number)
    vm = open_vm(kvmfs_mount, number)
    os.close(vm)
    wait_dead(kvmfs_mount, number)  # although the kvm handle is still open
    os.close(kvm)


def test_vm_numbers_are_never_reused_and_stale_paths_fail(kvmfs_mount: str) -> None:
    kvm, first = create_vm(kvmfs_mount)
    os.close(kvm)
    wait_dead(kvmfs_mount, first)
    with pytest.raises(FileNotFoundError):
        open_vm(kvmfs_mount, first)
    kvm, second = create_vm(kvmfs_mount)
    assert second > first
    os.close(kvm)


CLIENT = textwrap.dedent(
    """
    import fcntl, os, sys, time
    from kvmfs import abi
    mount = sys.argv[1]
    kvm = os.open(f"{mount}/kvm", os.O_RDWR)
    number = fcntl.ioctl(kvm, abi.KVM_CREATE_VM, 0)
    vm = os.open(f"{mount}/vm{number}/vm", os.O_RDWR)
    fcntl.ioctl(vm, abi.KVM_CREATE_VCPU, 0)
    vcpu = os.open(f"{mount}/vm{number}/vcpu0", os.O_RDWR)
    print(number, flush=True)
    time.sleep(60)
    """
)


def test_sigkilled_client_releases_everything(kvmfs_mount: str) -> None:
    client = subprocess.Popen([sys.executable, "-c", CLIENT, kvmfs_mount], stdout=subprocess.PIPE, text=True)
    assert client.stdout is not None
    number = int(client.stdout.readline())
    assert alive(kvmfs_mount, number)
    client.send_signal(signal.SIGKILL)
    client.wait()
    wait_dead(kvmfs_mount, number)


def test_fds_inherited_across_fork_hold_the_vm(kvmfs_mount: str) -> None:
    kvm, number = create_vm(kvmfs_mount)
    vm = open_vm(kvmfs_mount, number)
    os.close(kvm)
    vcpu = open_vcpu(kvmfs_mount, number, vm, 0)
    go_read, go_write = os.pipe()
    result_read, result_write = os.pipe()
    child = os.fork()
    if child == 0:  # the child keeps the inherited fds until told to go
        os.close(go_write)
        code = 0
        try:
            try:  # KVM ties a VM to the creator's address space: other processes get EIO
                fcntl.ioctl(vcpu, abi.KVM_GET_REGS, abi.kvm_regs())
            except OSError as error:
                code = error.errno
            os.write(result_write, bytes([code]))
            os.read(go_read, 1)
        finally:
            os._exit(0)
    os.close(result_write)
    assert os.read(result_read, 1) == bytes([errno.EIO])
    os.close(vcpu)
    os.close(vm)
    assert alive(kvmfs_mount, number), "the child still holds the VM"
    os.write(go_write, b"x")
    os.waitpid(child, 0)
    wait_dead(kvmfs_mount, number)
    for fd in (go_read, go_write, result_read):
        os.close(fd)
