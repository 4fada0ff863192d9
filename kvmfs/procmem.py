"""The calling process's memory, as the daemon reaches it.

FUSE forwards only the fixed-size part of an ioctl's argument, so kvmfs reads
and writes the rest (variable-length structs, guest RAM, the client's view of
kvm_run) directly in the caller: ``process_vm_readv``/``writev`` copy, and
``/proc/<pid>/map_files`` lets the daemon map a client's *shared* mapping
itself (zero copy). The daemon runs as root, so both are allowed.

Call these from a worker thread, never the trio thread: touching a client page
that is backed by a kvmfs file would send a FUSE request to the daemon itself.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
from dataclasses import dataclass

_libc = ctypes.CDLL(None, use_errno=True)


class _iovec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


_libc.process_vm_readv.argtypes = _libc.process_vm_writev.argtypes = [
    ctypes.c_int,
    ctypes.POINTER(_iovec),
    ctypes.c_ulong,
    ctypes.POINTER(_iovec),
    ctypes.c_ulong,
    ctypes.c_ulong,
]
_libc.process_vm_readv.restype = _libc.process_vm_writev.restype = ctypes.c_ssize_t


def _transfer(call, pid: int, local_address: int, remote_address: int, size: int) -> None:
    local = _iovec(local_address, size)
    remote = _iovec(remote_address, size)
    done = call(pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
    if done < 0:
        error = ctypes.get_errno()
        # A bad address in the caller is the caller's EFAULT, as copy_from_user gives.
        raise OSError(errno.EFAULT if error in (errno.EFAULT, errno.ENOMEM) else error, os.strerror(error))
    if done != size:
        raise OSError(errno.EFAULT, "partial copy: caller memory ends early")


def read_into(pid: int, remote_address: int, local_address: int, size: int) -> None:
    """Copy ``size`` bytes of the caller's memory into daemon memory."""
    if size:
        _transfer(_libc.process_vm_readv, pid, local_address, remote_address, size)


def write_from(pid: int, remote_address: int, local_address: int, size: int) -> None:
    """Copy ``size`` bytes of daemon memory into the caller's memory."""
    if size:
        _transfer(_libc.process_vm_writev, pid, local_address, remote_address, size)


def read(pid: int, remote_address: int, size: int) -> bytes:
    buffer = ctypes.create_string_buffer(size)
    read_into(pid, remote_address, ctypes.addressof(buffer), size)
    return buffer.raw


def write(pid: int, remote_address: int, data: bytes) -> None:
    buffer = ctypes.create_string_buffer(data, len(data))
    write_from(pid, remote_address, ctypes.addressof(buffer), len(data))


def thread_group(tid: int) -> int:
    """The process (thread group) a thread belongs to: FUSE reports thread ids."""
    with open(f"/proc/{tid}/status", "rb") as status:
        for line in status:
            if line.startswith(b"Tgid:"):
                return int(line.split()[1])
    raise ProcessLookupError(tid)


@dataclass(frozen=True)
class Mapping:
    """One line of /proc/<pid>/maps."""

    start: int
    end: int
    shared: bool
    offset: int
    inode: int
    path: str

    def covers(self, address: int, size: int) -> bool:
        return self.start <= address and address + size <= self.end


def mappings(pid: int) -> list[Mapping]:
    result = []
    with open(f"/proc/{pid}/maps", "rb") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            start, end = (int(part, 16) for part in fields[0].split(b"-"))
            path = fields[5].strip().decode(errors="replace") if len(fields) > 5 else ""
            shared = fields[1][3:4] == b"s"
            result.append(Mapping(start, end, shared, int(fields[2], 16), int(fields[4]), path))
    return result


def mapping_at(pid: int, address: int, size: int) -> Mapping | None:
    """The single mapping that holds all of [address, address + size), if there is one."""
    return next((m for m in mappings(pid) if m.covers(address, size)), None)


def map_shared(pid: int, mapping: Mapping, address: int, size: int) -> mmap.mmap:
    """Map the same pages as the caller's shared mapping: writes on either side show at once."""
    fd = os.open(f"/proc/{pid}/map_files/{mapping.start:x}-{mapping.end:x}", os.O_RDWR | os.O_CLOEXEC)
    try:
        return mmap.mmap(fd, size, mmap.MAP_SHARED, offset=mapping.offset + address - mapping.start)
    finally:
        os.close(fd)
