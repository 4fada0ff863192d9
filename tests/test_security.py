"""A VM belongs to the uid that created it: another user cannot list, open or ioctl it."""

from __future__ import annotations

import fcntl
import json
import os
import stat

from kvmfs import abi
from tests.conftest import Target

OTHER_UID = OTHER_GID = 65534  # nobody


def as_other_user(probe) -> dict:  # type: ignore[no-untyped-def]
    """Run ``probe()`` in a child process that has become another user; return what it reports."""
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(OTHER_GID)
            os.setuid(OTHER_UID)
            report = probe()
            os.write(write_end, json.dumps(report).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as reader:
        data = reader.read()
    os.waitpid(child, 0)
    assert data, "the probe as another user reported nothing"
    return json.loads(data)


def outcome(action) -> str:  # type: ignore[no-untyped-def]
    try:
        action()
        return "ok"
    except OSError as error:
        return os.strerror(error.errno)


def test_another_user_cannot_reach_someone_elses_vm(kvmfs: Target, kvmfs_mount: str) -> None:
    vm = kvmfs.create_vm()
    kvmfs.create_vcpu(vm)
    vm_dir = os.readlink(f"/proc/self/fd/{vm}").rsplit("/", 1)[0]

    def probe() -> dict:
        def own_vm() -> list[object]:
            their_kvm = os.open(f"{kvmfs_mount}/kvm", os.O_RDWR)
            theirs = fcntl.ioctl(their_kvm, abi.KVM_CREATE_VM, 0)
            info = os.stat(f"{kvmfs_mount}/vm{theirs}")
            their_vm = os.open(f"{kvmfs_mount}/vm{theirs}/vm", os.O_RDWR)
            created = fcntl.ioctl(their_vm, abi.KVM_CREATE_VCPU, 0)
            return [info.st_uid, stat.S_IMODE(info.st_mode), created]

        try:
            own = own_vm()
        except OSError as error:
            own = [os.strerror(error.errno)]
        return {
            "list": outcome(lambda: os.listdir(vm_dir)),
            "open vm": outcome(lambda: os.open(f"{vm_dir}/vm", os.O_RDWR)),
            "open vcpu": outcome(lambda: os.open(f"{vm_dir}/vcpu0", os.O_RDWR)),
            "open vm read-only": outcome(lambda: os.open(f"{vm_dir}/vm", os.O_RDONLY)),
            "ioctl inherited vm fd": outcome(lambda: fcntl.ioctl(vm, abi.KVM_CREATE_VCPU, 1)),
            "own vm": own,
        }

    report = as_other_user(probe)
    denied = os.strerror(13)
    assert report["list"] == report["open vm"] == report["open vcpu"] == report["open vm read-only"] == denied
    # An fd that leaked to another process is still not theirs: KVM answers EIO.
    assert report["ioctl inherited vm fd"] == os.strerror(5)
    assert report["own vm"] == [OTHER_UID, 0o700, 0], "the other user can use kvmfs for its own VMs"
    assert sorted(os.listdir(vm_dir)) == ["vcpu0", "vm"], "the owner still sees the VM intact"
