"""Execution backends for kvmfs (installed as kvmfs.backends), by name."""

from __future__ import annotations

import importlib

from kvmfs.backends.base import Backend

# name → "module:class"; imported on demand, so a backend's dependencies load only when chosen.
BACKENDS = {
    "unicorn": "kvmfs.backends.unicorn_x86:UnicornBackend",
    "kvm": "kvmfs.backends.kvm_passthrough:KvmBackend",
}


def load(name: str) -> Backend:
    """A new instance of the backend called ``name``."""
    module, cls = BACKENDS[name].split(":")
    return getattr(importlib.import_module(module), cls)()
