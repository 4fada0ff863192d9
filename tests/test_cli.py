"""The kvmfs command as users meet it: mount, umount, --help, stale and busy mounts, signals, mount(8)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvmfs.cli import is_kvmfs_mount
from tests.conftest import wait_until

REPO = Path(__file__).resolve().parent.parent
HELPER_LINK = Path("/sbin/mount.fuse.kvmfs")


def kvmfs(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kvmfs.cli", *args], capture_output=True, text=True, timeout=30)


def daemon_pids(mountpoint: str) -> list[int]:
    """Daemons serving ``mountpoint`` (by their command line)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                command = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"kvmfs.cli" in command and mountpoint.encode() in command:
                pids.append(int(entry))
    return pids


@pytest.fixture
def mountpoint() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="kvmfs-cli-")
    yield path
    if is_kvmfs_mount(path) or os.path.ismount(path):
        subprocess.run(["umount", "-l", path], capture_output=True)
    for pid in daemon_pids(path):
        os.kill(pid, signal.SIGKILL)
    os.rmdir(path)


def test_help_explains_the_layout() -> None:
    result = kvmfs("--help")
    assert result.returncode == 0
    for text in ("MOUNT/kvm", "MOUNT/vm<N>/vm", "MOUNT/vm<N>/vcpu<I>", "KVM_CREATE_VM"):
        assert text in result.stdout


def test_mount_returns_mounted_and_umount_stops_the_daemon(mountpoint: str) -> None:
    result = kvmfs("mount", mountpoint)
    assert result.returncode == 0, result.stderr
    assert is_kvmfs_mount(mountpoint) and os.path.exists(f"{mountpoint}/kvm")
    assert len(daemon_pids(mountpoint)) == 1
    again = kvmfs("mount", mountpoint)
    assert again.returncode == 1 and "already mounted" in again.stderr and "umount" in again.stderr
    assert kvmfs("umount", mountpoint).returncode == 0
    assert not is_kvmfs_mount(mountpoint)
    wait_until(lambda: not daemon_pids(mountpoint), what="the daemon to exit after umount")


def test_clear_messages_for_bad_mountpoints(mountpoint: str) -> None:
    missing = kvmfs("mount", f"{mountpoint}/nope")
    assert missing.returncode == 1 and "does not exist" in missing.stderr and "mkdir" in missing.stderr
    not_mounted = kvmfs("umount", mountpoint)
    assert not_mounted.returncode == 1 and "not a kvmfs mount" in not_mounted.stderr


def test_stale_mount_is_explained_and_umount_clears_it(mountpoint: str) -> None:
    assert kvmfs("mount", mountpoint).returncode == 0
    (pid,) = daemon_pids(mountpoint)
    os.kill(pid, signal.SIGKILL)  # the daemon dies; the kernel keeps a dead mount
    wait_until(lambda: not daemon_pids(mountpoint), what="the daemon to die")
    stale = kvmfs("mount", mountpoint)
    assert stale.returncode == 1 and "stale" in stale.stderr and "kvmfs umount" in stale.stderr
    assert kvmfs("umount", mountpoint).returncode == 0
    assert kvmfs("mount", mountpoint).returncode == 0
    assert kvmfs("umount", mountpoint).returncode == 0


def test_busy_umount_says_who_to_close(mountpoint: str) -> None:
    assert kvmfs("mount", mountpoint).returncode == 0
    fd = os.open(f"{mountpoint}/kvm", os.O_RDWR)
    try:
        busy = kvmfs("umount", mountpoint)
        assert busy.returncode == 1 and "busy" in busy.stderr
    finally:
        os.close(fd)
    wait_until(lambda: kvmfs("umount", mountpoint).returncode == 0, what="umount once the file is closed")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_foreground_daemon_unmounts_on_signal(mountpoint: str, signum: int) -> None:
    daemon = subprocess.Popen([sys.executable, "-m", "kvmfs.cli", "mount", "--foreground", mountpoint])
    wait_until(lambda: os.path.exists(f"{mountpoint}/kvm"), timeout=20, what="the mount")
    daemon.send_signal(signum)
    assert daemon.wait(timeout=20) == 0
    assert not is_kvmfs_mount(mountpoint)


def test_mount_t_fuse_kvmfs_through_the_helper(mountpoint: str) -> None:
    helper = REPO / "mountscripts" / "mount.fuse.kvmfs"
    installed_here = not HELPER_LINK.exists()
    if installed_here:
        HELPER_LINK.symlink_to(helper)
    try:
        result = subprocess.run(["mount", "-t", "fuse.kvmfs", "none", mountpoint], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        assert is_kvmfs_mount(mountpoint)
        assert subprocess.run(["umount", mountpoint]).returncode == 0
    finally:
        if installed_here:
            HELPER_LINK.unlink()


def test_ls_shows_vms_and_the_last_exit_of_each_vcpu(kvmfs_mount: str) -> None:
    from kvmfs.client import Kvm
    from kvmfs.guests import CODE, Machine

    with Kvm.open(f"{kvmfs_mount}/kvm") as kvm, Machine(kvm, "long", CODE["long"]) as machine:
        assert machine.vcpu is not None and machine.vcpu.run() == 2  # KVM_EXIT_IO
        number = os.readlink(f"/proc/self/fd/{machine.vm.fd}").split("/")[-2]  # type: ignore[union-attr]
        listing = kvmfs("ls", kvmfs_mount)
    assert listing.returncode == 0
    block = listing.stdout.split(f"{number}  (owner uid 0, 1 vcpus)\n")[1]
    assert block.startswith("  vcpu0    last exit: IO out port 0x3f8 size 1 count 1")
