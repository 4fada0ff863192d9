"""Differential fixtures: every scenario runs on /dev/kvm and on kvmfs, and kvmfs must match /dev/kvm.

`target` is parametrized over "devkvm" and kvmfs in each isolation mode ("kvmfs-process",
"kvmfs-thread", on the session mounts of tests/conftest.py). The devkvm half skips where /dev/kvm
is absent. A kvmfs half runs the scenario on the mount and, where /dev/kvm exists, also on
/dev/kvm, and asserts the two traces are equal. Each test also
checks facts it states itself, so both halves mean something on a machine without /dev/kvm.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pytest

from kvmfs.client import Kvm
from tests.conftest import ISOLATIONS, Daemon
from tests.differential.trace import Trace, assert_same

DEV_KVM = "/dev/kvm"

Scenario = Callable[..., None]


# kvm_pvm (pagetable-based KVM, used on nested cloud hosts like this one) departs from VMX/SVM KVM in a
# few places; tests that meet them state facts of standard KVM and do not ask kvmfs to copy the quirk.
PVM = os.path.exists("/sys/module/kvm_pvm")


def devkvm_available() -> bool:
    return os.access(DEV_KVM, os.R_OK | os.W_OK)


def record(kvm_path: str, scenario: Scenario, *args: Any) -> Trace:
    """Runs `scenario(kvm, trace, *args)` on the KVM at kvm_path and returns its trace."""
    trace = Trace()
    with Kvm.open(kvm_path) as kvm:
        scenario(kvm, trace, *args)
    return trace


class Target:
    """Where a scenario runs: /dev/kvm, or a kvmfs mount checked against /dev/kvm."""

    def __init__(self, name: str, kvm_path: str, on_kvm: bool) -> None:
        self.name = name
        self.kvm_path = kvm_path
        self.on_kvm = on_kvm  # guests run on this machine's KVM (/dev/kvm, or kvmfs's passthrough backend)

    def __repr__(self) -> str:
        return f"Target({self.name}, {self.kvm_path})"

    def open(self) -> Kvm:
        return Kvm.open(self.kvm_path)

    def trace(self, scenario: Scenario, *args: Any, compare: bool = True) -> Trace:
        """The scenario's trace here; on kvmfs, first asserted equal to /dev/kvm's when that exists
        (and `compare`: False where /dev/kvm is known not to be the standard to copy)."""
        trace = record(self.kvm_path, scenario, *args)
        if compare and self.kvm_path != DEV_KVM and devkvm_available():
            assert_same(trace, record(DEV_KVM, scenario, *args))
        return trace


@pytest.fixture(params=["devkvm", *(f"kvmfs-{isolation}" for isolation in ISOLATIONS), "kvmfs-passthrough"])
def target(request: pytest.FixtureRequest) -> Target:
    """Where to run: /dev/kvm; kvmfs on unicorn in each isolation mode; kvmfs over /dev/kvm itself."""
    if request.param == "devkvm":
        if not devkvm_available():
            pytest.skip("/dev/kvm is not available on this machine")
        return Target("devkvm", DEV_KVM, on_kvm=True)
    mode = request.param.removeprefix("kvmfs-")
    daemon: Daemon = request.getfixturevalue(f"{mode}_daemon_session")
    return Target("kvmfs", os.path.join(daemon.mountpoint, "kvm"), on_kvm=mode == "passthrough")
