"""Guest RAM: the daemon-side memory behind one KVM memory slot, kept in step with the client's.

KVM maps the client's own pages into the guest. kvmfs cannot, for memory that
is private to the client (``MAP_PRIVATE|MAP_ANONYMOUS``, what most VMMs use),
so the daemon keeps a copy: before each KVM_RUN it reads the client's pages
and takes the ones that changed, after it writes the guest's view back. Shared
client memory (``MAP_SHARED``, memfd) is mapped by the daemon itself through
``/proc/<pid>/map_files``: the same pages, nothing to copy.

Either way unicorn must forget code it translated from pages the client
changed (it only notices the guest's own writes), so ``refresh`` returns the
changed ranges: found with memcmp, bisecting only where the bytes differ, so
the common case of an untouched slot costs one memcmp.

Everything here runs in a worker thread (see kvmfs.procmem).
"""

from __future__ import annotations

import ctypes
import mmap
import threading

from kvmfs import abi, procmem

_libc = ctypes.CDLL(None, use_errno=True)
_libc.memcmp.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
_libc.memcmp.restype = ctypes.c_int

Range = tuple[int, int]  # (offset, size) within a slot


def _address(memory: mmap.mmap) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(memory))


def changed_pages(new: int, old: int, size: int) -> list[Range]:
    """The page-aligned ranges where ``size`` bytes at ``new`` and ``old`` differ."""
    if _libc.memcmp(new, old, size) == 0:
        return []
    if size <= abi.PAGE_SIZE:
        return [(0, size)]
    half = (size // 2 + abi.PAGE_SIZE - 1) // abi.PAGE_SIZE * abi.PAGE_SIZE
    ranges = changed_pages(new, old, half)
    for offset, length in changed_pages(new + half, old + half, size - half):
        if ranges and ranges[-1][0] + ranges[-1][1] == half + offset:
            ranges[-1] = (ranges[-1][0], ranges[-1][1] + length)
        else:
            ranges.append((half + offset, length))
    return ranges


class GuestRam:
    """One slot's memory in the daemon: ``address`` is what the backend maps as guest RAM."""

    def __init__(self, pid: int, userspace_addr: int, size: int) -> None:
        self.pid, self.userspace_addr, self.size = pid, userspace_addr, size
        mapping = procmem.mapping_at(pid, userspace_addr, size)
        self.shared = False
        if mapping is not None and mapping.shared:
            try:
                self.memory = procmem.map_shared(pid, mapping, userspace_addr, size)
                self.shared = True
            except OSError:
                pass  # not mappable by the daemon (a device, say): keep a copy
        if not self.shared:
            # MAP_SHARED so that a backend in another process can map the same copy.
            self.memory = mmap.mmap(-1, size)
        # The memory as the client last saw it: changes on either side show against it.
        self._reference = mmap.mmap(-1, size)
        self.address = _address(self.memory)
        self._reference_address = _address(self._reference)
        self._lock = threading.Lock()

    def refresh(self) -> list[Range]:
        """Before a run: take in what the client changed since the last one; return the changed ranges."""
        with self._lock:  # vcpus of one VM run, and so refresh and publish, in parallel
            return self._refresh()

    def _refresh(self) -> list[Range]:
        if self.shared:  # the client wrote in place: only remember it
            source, target = self.address, self._reference_address
        else:  # read the client's pages, and copy the changed ones into the guest's view
            procmem.read_into(self.pid, self.userspace_addr, self._reference_address, self.size)
            source, target = self._reference_address, self.address
        changed = changed_pages(source, target, self.size)
        for offset, length in changed:
            ctypes.memmove(target + offset, source + offset, length)
        return changed

    def publish(self) -> None:
        """After a run: give the client the pages the guest wrote (private memory: copy them back)."""
        with self._lock:
            self._publish()

    def _publish(self) -> None:
        for offset, length in changed_pages(self.address, self._reference_address, self.size):
            if not self.shared:
                procmem.write_from(self.pid, self.userspace_addr + offset, self.address + offset, length)
            ctypes.memmove(self._reference_address + offset, self.address + offset, length)

    def close(self) -> None:
        self.memory.close()
        self._reference.close()
