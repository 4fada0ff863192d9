"""kvmfs.memory: finding the pages that changed between two copies of guest RAM."""

from __future__ import annotations

import ctypes
import itertools
import mmap
import random

import pytest

from kvmfs.memory import changed_pages

PAGE = 4096


@pytest.mark.parametrize("pages", [1, 3, 64, 513])
def test_changed_pages_finds_exactly_the_pages_that_differ(pages: int) -> None:
    size = pages * PAGE
    new, old = mmap.mmap(-1, size), mmap.mmap(-1, size)
    rng = random.Random(pages)
    touched = sorted(rng.sample(range(pages), min(pages, 5)))
    for page in touched:
        new[page * PAGE + rng.randrange(PAGE)] = 1
    if pages > 2:  # two neighbours merge into one range
        new[PAGE - 1], new[PAGE] = 1, 1
        touched = sorted({*touched, 0, 1})
    address = ctypes.addressof(ctypes.c_char.from_buffer(new))
    ranges = changed_pages(address, ctypes.addressof(ctypes.c_char.from_buffer(old)), size)
    found = sorted(offset // PAGE + i for offset, length in ranges for i in range(length // PAGE))
    assert found == touched
    assert all(a + la < b for (a, la), (b, _) in itertools.pairwise(ranges)), "ranges are merged"


def test_identical_memory_has_no_changes() -> None:
    new, old = mmap.mmap(-1, 8 * PAGE), mmap.mmap(-1, 8 * PAGE)
    new[:] = old[:] = bytes(range(256)) * 128
    addresses = [ctypes.addressof(ctypes.c_char.from_buffer(m)) for m in (new, old)]
    assert changed_pages(*addresses, 8 * PAGE) == []
