"""Shared fixtures: a real kvmfs mount served by a real daemon process, and /dev/kvm.

The daemon runs in its own process (a client calling into the mount from the
daemon's trio thread would deadlock), started exactly as users start it. At
teardown it must unmount cleanly and must not have logged a traceback: a test
that makes the daemon crash or log an exception fails, even if its own
assertions passed.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from kvmfs import abi

DEV_KVM = "/dev/kvm"
_libc = ctypes.CDLL(None, use_errno=True)


def ioctl_result(fd: int, cmd: int, arg: int | ctypes.Structure | ctypes.Array = 0) -> int | str:
    """An ioctl's return value, or the name of its errno: one value to compare across devices."""
    try:
        return fcntl.ioctl(fd, cmd, arg)
    except OSError as error:
        return errno.errorcode[error.errno]


def raw_ioctl(fd: int, cmd: int, value: int) -> int | str:
    """ioctl(2) with an unsigned long argument, which fcntl.ioctl cannot pass (it takes a C int)."""
    result = _libc.ioctl(fd, ctypes.c_ulong(cmd), ctypes.c_ulong(value))
    return result if result >= 0 else errno.errorcode[ctypes.get_errno()]


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0, what: str = "condition") -> None:
    """Poll ``predicate``: lifecycle effects of close() reach the daemon asynchronously."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.005)


class Daemon:
    """A kvmfs daemon serving ``mountpoint`` in a child process."""

    def __init__(self, mountpoint: Path, log_path: Path, isolation: str = "process", backend: str = "unicorn") -> None:
        self.mountpoint = mountpoint
        self.isolation = isolation
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - lives as long as the daemon
        command = [sys.executable, "-m", "kvmfs.cli", "mount", "--foreground", str(mountpoint)]
        self.process = subprocess.Popen(
            [*command, "--isolation", isolation, "--backend", backend],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        wait_until(self._mounted, timeout=20, what=f"kvmfs to mount at {mountpoint}")

    def _mounted(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"kvmfs daemon exited early:\n{self.log()}")
        return (self.mountpoint / "kvm").exists()

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def holders(self) -> list[str]:
        """Processes with a file or a mapping under the mount: who keeps it busy."""
        found = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                fds = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
                maps = Path(f"/proc/{pid}/maps").read_text().split()
            except OSError:
                continue
            paths = {path for path in [*fds, *maps] if path.startswith(str(self.mountpoint))}
            if paths:
                found.append(f"{pid} {Path(f'/proc/{pid}/cmdline').read_bytes()[:80]!r}: {sorted(paths)}")
        return found

    def stop(self) -> None:
        """Unmount and wait for the daemon to exit; kill it if it does not. Never leaves a mount."""
        try:
            if self.process.poll() is None:
                # A VM worker that was just killed may still be releasing its mappings: retry a while.
                deadline = time.monotonic() + 5
                while True:
                    unmount = subprocess.run(
                        ["fusermount3", "-u", str(self.mountpoint)], capture_output=True, text=True
                    )
                    if unmount.returncode == 0 or time.monotonic() > deadline:
                        break
                    time.sleep(0.05)
                if unmount.returncode != 0:
                    raise AssertionError(f"unmount failed: {unmount.stderr}; holders: {self.holders()}")
                try:
                    self.process.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    raise AssertionError(f"kvmfs daemon did not exit after unmount:\n{self.log()}") from None
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()
            subprocess.run(["umount", "-l", str(self.mountpoint)], capture_output=True)
            self.mountpoint.rmdir()
            self._log.close()


def _start(tmp_path_factory: pytest.TempPathFactory, isolation: str = "process", backend: str = "unicorn") -> Daemon:
    # Under /tmp itself: tests acting as a second user must be able to reach the mount.
    mountpoint = Path(tempfile.mkdtemp(prefix="kvmfs-test-"))
    os.chmod(mountpoint, 0o755)
    return Daemon(mountpoint, tmp_path_factory.mktemp("kvmfs") / "daemon.log", isolation, backend)


def _assert_clean(daemon: Daemon) -> None:
    log = daemon.log()
    assert "Traceback" not in log, f"the daemon logged an exception:\n{log}"
    assert daemon.process.returncode == 0, f"daemon exit status {daemon.process.returncode}:\n{log}"


def _session_daemon(
    tmp_path_factory: pytest.TempPathFactory, isolation: str, backend: str = "unicorn"
) -> Iterator[Daemon]:
    daemon = _start(tmp_path_factory, isolation, backend)
    try:
        yield daemon
    finally:
        daemon.stop()
    _assert_clean(daemon)


@pytest.fixture(scope="session")
def process_daemon_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    yield from _session_daemon(tmp_path_factory, "process")


@pytest.fixture(scope="session")
def thread_daemon_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    yield from _session_daemon(tmp_path_factory, "thread")


@pytest.fixture(scope="session")
def passthrough_daemon_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """kvmfs over this machine's /dev/kvm (--backend kvm): what differs from /dev/kvm is kvmfs's own."""
    if not os.access(DEV_KVM, os.R_OK | os.W_OK):
        pytest.skip("/dev/kvm is not available on this machine")
    yield from _session_daemon(tmp_path_factory, "process", "kvm")


ISOLATIONS = ["process", "thread"]


@pytest.fixture(params=ISOLATIONS)
def kvmfs_daemon(request: pytest.FixtureRequest) -> Daemon:
    """A mount shared by the session's tests (each test makes its own VMs), once per isolation mode:
    every test against a mount runs with guests in worker processes and in daemon threads."""
    return request.getfixturevalue(f"{request.param}_daemon_session")


@pytest.fixture
def kvmfs_mount(kvmfs_daemon: Daemon) -> str:
    """The path of a live kvmfs mount."""
    return str(kvmfs_daemon.mountpoint)


@pytest.fixture
def private_daemon(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[Daemon]:
    """A mount of the test's own, for tests that measure or stop the daemon (indirect parameter:
    the isolation mode, process by default)."""
    daemon = _start(tmp_path_factory, getattr(request, "param", "process"))
    try:
        yield daemon
    finally:
        daemon.stop()
    _assert_clean(daemon)


class Target:
    """KVM's hierarchy on /dev/kvm or on a kvmfs mount, reached the same way by a test."""

    def __init__(self, kvm_path: str) -> None:
        self.kvm_path = kvm_path
        self.mount = None if kvm_path == "/dev/kvm" else os.path.dirname(kvm_path)
        self._fds: list[int] = []
        self._memory: list[mmap.mmap] = []

    def _keep(self, fd: int) -> int:
        self._fds.append(fd)
        return fd

    def kvm(self) -> int:
        return self._keep(os.open(self.kvm_path, os.O_RDWR | os.O_CLOEXEC))

    def create_vm(self) -> int:
        kvm = self.kvm()
        result = fcntl.ioctl(kvm, abi.KVM_CREATE_VM, 0)
        if self.mount is None:
            return self._keep(result)
        return self._keep(os.open(f"{self.mount}/vm{result}/vm", os.O_RDWR | os.O_CLOEXEC))

    def create_vcpu(self, vm: int, vcpu_id: int = 0) -> int:
        result = fcntl.ioctl(vm, abi.KVM_CREATE_VCPU, vcpu_id)
        if self.mount is None:
            return self._keep(result)
        vm_dir = os.readlink(f"/proc/self/fd/{vm}").rsplit("/", 1)[0]
        return self._keep(os.open(f"{vm_dir}/vcpu{result}", os.O_RDWR | os.O_CLOEXEC))

    def keep_alive(self, memory: mmap.mmap) -> None:
        """Guest memory that must live as long as the test's VMs."""
        self._memory.append(memory)

    def close(self) -> None:
        for fd in reversed(self._fds):
            os.close(fd)
        self._fds.clear()
        self._memory.clear()


@pytest.fixture
def kvmfs(kvmfs_mount: str) -> Iterator[Target]:
    """kvmfs's KVM hierarchy; every fd a test opens through it is closed at teardown."""
    target = Target(f"{kvmfs_mount}/kvm")
    yield target
    target.close()


@pytest.fixture
def devkvm(dev_kvm: str) -> Iterator[Target]:
    target = Target(dev_kvm)
    yield target
    target.close()


@pytest.fixture
def dev_kvm() -> str:
    """/dev/kvm, the oracle; tests (or their halves) that need it skip where it is absent."""
    if not os.access(DEV_KVM, os.R_OK | os.W_OK):
        pytest.skip("/dev/kvm is not available on this machine")
    return DEV_KVM
