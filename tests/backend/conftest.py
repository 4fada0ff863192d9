"""Fixtures for the backend tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .harness import KINDS, Machine


@pytest.fixture(params=KINDS)
def machine(request: pytest.FixtureRequest) -> Iterator[Machine]:
    """An empty VM with one vcpu, on the unicorn backend and on /dev/kvm."""
    m = Machine(request.param)
    yield m
    m.close()
