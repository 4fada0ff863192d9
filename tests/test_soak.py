"""Soak: thousands of VM lifetimes leave the daemon's tables, threads and memory where they were."""

from __future__ import annotations

import fcntl
import json
import os

import pytest

from kvmfs import abi
from tests.conftest import ISOLATIONS, Daemon, wait_until

CYCLES = 2000
WARM_UP = 200
RSS_SLACK_KIB = 8 * 1024  # allocator noise; a leak of one VM per cycle would be far larger


def one_lifetime(mount: str) -> None:
    """Create a VM with two vcpus, open everything, close everything."""
    kvm = os.open(f"{mount}/kvm", os.O_RDWR)
    number = fcntl.ioctl(kvm, abi.KVM_CREATE_VM, 0)
    vm = os.open(f"{mount}/vm{number}/vm", os.O_RDWR)
    vcpus = []
    for vcpu_id in range(2):
        fcntl.ioctl(vm, abi.KVM_CREATE_VCPU, vcpu_id)
        vcpus.append(os.open(f"{mount}/vm{number}/vcpu{vcpu_id}", os.O_RDWR))
    fcntl.ioctl(vcpus[0], abi.KVM_GET_REGS, abi.kvm_regs())
    for fd in (*vcpus, vm, kvm):
        os.close(fd)


def daemon_figures(daemon: Daemon) -> dict[str, int]:
    figures = json.loads(os.getxattr(daemon.mountpoint, "user.kvmfs.stats"))
    with open(f"/proc/{daemon.pid}/status") as status:
        fields = dict(line.split(":", 1) for line in status)
    figures["threads"] = int(fields["Threads"])
    figures["rss_kib"] = int(fields["VmRSS"].split()[0])
    figures["fds"] = len(os.listdir(f"/proc/{daemon.pid}/fd"))
    figures["processes"] = len(descendants(daemon.pid))  # the zygote and live VM workers
    return figures


def descendants(pid: int) -> list[int]:
    """All processes below ``pid``."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    parent = int(stat.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            children.setdefault(parent, []).append(int(entry))
    found, queue = [], [pid]
    while queue:
        for child in children.get(queue.pop(), []):
            found.append(child)
            queue.append(child)
    return found


@pytest.mark.parametrize("private_daemon", ISOLATIONS, indirect=True)
def test_2000_vm_lifetimes_leak_nothing(private_daemon: Daemon) -> None:
    mount = str(private_daemon.mountpoint)
    for _ in range(WARM_UP):
        one_lifetime(mount)
    wait_until(lambda: daemon_figures(private_daemon)["vms"] == 0, what="warm-up VMs to die")
    before = daemon_figures(private_daemon)
    for _ in range(CYCLES):
        one_lifetime(mount)

    def settled() -> bool:
        now = daemon_figures(private_daemon)
        return all(
            now[key] <= before[key] for key in ("vms", "inodes", "handles", "fds", "pending_ioctls", "processes")
        )

    wait_until(settled, timeout=10, what="the daemon's tables to return to their size before the soak")
    # Idle worker threads retire after trio's 10 s idle timeout.
    wait_until(lambda: daemon_figures(private_daemon)["threads"] <= before["threads"], timeout=15, what="threads")
    after = daemon_figures(private_daemon)
    print(f"\nsoak: {CYCLES} VM lifetimes (2 vcpus each), isolation: {private_daemon.isolation}")
    for key in before:
        print(f"  {key:16} before {before[key]:>8}  after {after[key]:>8}")
    assert after["rss_kib"] - before["rss_kib"] < RSS_SLACK_KIB
