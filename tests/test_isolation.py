"""A guest that crashes or wedges its backend costs only its own VM: never the mount, never another VM."""

from __future__ import annotations

import ctypes
import errno
import os
import signal
import threading
import time

import pytest

from kvmfs import abi
from tests.conftest import Daemon, Target, ioctl_result, wait_until
from tests.test_robustness import looping_vcpu
from tests.test_soak import descendants

_libc = ctypes.CDLL(None, use_errno=True)


def stat_field(pid: int, index: int) -> str:
    """Field ``index`` of /proc/<pid>/stat after the command name (0 is the state)."""
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().rsplit(")", 1)[1].split()[index]


def newest_worker(daemon: Daemon) -> int:
    """The worker forked for the VM created last: the zygote is the daemon's child, workers its children."""
    workers = [pid for pid in descendants(daemon.pid) if stat_field(pid, 1) != str(daemon.pid)]
    return max(workers, key=lambda pid: int(stat_field(pid, 19)))


def gone(pid: int) -> bool:
    try:
        return stat_field(pid, 0) == "Z"
    except FileNotFoundError:
        return True


@pytest.fixture
def process_daemon(kvmfs_daemon: Daemon) -> Daemon:
    if kvmfs_daemon.isolation != "process":
        pytest.skip("only worker processes can crash alone; in thread mode a unicorn crash ends the daemon")
    return kvmfs_daemon


def test_a_crashed_worker_fails_only_its_vm(kvmfs: Target, process_daemon: Daemon) -> None:
    kvmfs_daemon = process_daemon
    doomed_vm = kvmfs.create_vm()
    doomed = kvmfs.create_vcpu(doomed_vm)
    worker = newest_worker(kvmfs_daemon)
    healthy = kvmfs.create_vcpu(kvmfs.create_vm())
    os.kill(worker, signal.SIGKILL)  # what a segfault in unicorn would do
    wait_until(lambda: gone(worker), what="the worker to die")
    assert ioctl_result(doomed, abi.KVM_GET_REGS, abi.kvm_regs()) == "EIO"
    assert ioctl_result(doomed, abi.KVM_RUN) == "EIO"
    assert ioctl_result(doomed_vm, abi.KVM_CREATE_VCPU, 1) == "EIO"
    regs = abi.kvm_regs()
    assert ioctl_result(healthy, abi.KVM_GET_REGS, regs) == 0 and regs.rip == 0xFFF0
    assert ioctl_result(kvmfs.kvm(), abi.KVM_GET_API_VERSION) == 12


def test_a_wedged_worker_is_killed_and_its_run_fails(kvmfs: Target, process_daemon: Daemon) -> None:
    kvmfs_daemon = process_daemon
    vcpu, run_area = looping_vcpu(kvmfs)
    worker = newest_worker(kvmfs_daemon)
    signal.signal(signal.SIGUSR1, lambda *_: None)
    outcome: dict[str, int] = {}

    def run() -> None:
        result = _libc.ioctl(vcpu, ctypes.c_ulong(abi.KVM_RUN), ctypes.c_ulong(0))
        outcome["result"], outcome["errno"] = result, ctypes.get_errno()

    runner = threading.Thread(target=run)
    runner.start()
    time.sleep(0.3)
    os.kill(worker, signal.SIGSTOP)  # wedged: it will never honour a kick
    signal.pthread_kill(runner.ident, signal.SIGUSR1)
    runner.join(timeout=10)
    assert not runner.is_alive(), "KVM_RUN on a wedged VM never returned"
    assert (outcome["result"], outcome["errno"]) == (-1, errno.EIO)
    assert ioctl_result(kvmfs.kvm(), abi.KVM_GET_API_VERSION) == 12
    run_area.close()


def test_a_wedged_worker_cannot_hang_quick_ioctls(kvmfs: Target, process_daemon: Daemon) -> None:
    vcpu = kvmfs.create_vcpu(kvmfs.create_vm())
    worker = newest_worker(process_daemon)
    os.kill(worker, signal.SIGSTOP)
    started = time.monotonic()
    assert ioctl_result(vcpu, abi.KVM_SET_REGS, abi.kvm_regs(rflags=2)) == "EIO"
    assert time.monotonic() - started < 10, "the daemon waited too long on a wedged worker"
    wait_until(lambda: gone(worker), what="the wedged worker to be killed")
    assert ioctl_result(kvmfs.kvm(), abi.KVM_GET_API_VERSION) == 12
