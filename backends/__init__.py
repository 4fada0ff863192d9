"""Execution backends for kvmfs (installed as kvmfs.backends)."""
