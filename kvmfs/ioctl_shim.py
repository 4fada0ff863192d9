"""FUSE ioctl requests for pyfuse3, through the C shim in _ioctl.c.

Import this module before pyfuse3 anywhere in the daemon: it loads the shim
with RTLD_GLOBAL so that pyfuse3's fuse_session_new binds to the shim's.
Each request is an ``IoctlRequest`` that must be answered exactly once; this
wrapper enforces that (a second answer would be a use-after-free in libfuse),
and answers EIO for a request whose handler raised.
"""

from __future__ import annotations

import errno
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

if "pyfuse3" in sys.modules:
    raise ImportError("kvmfs.ioctl_shim must be imported before pyfuse3")

_saved_flags = sys.getdlopenflags()
sys.setdlopenflags(_saved_flags | os.RTLD_GLOBAL)
try:
    from kvmfs import _ioctl
finally:
    sys.setdlopenflags(_saved_flags)

log = logging.getLogger(__name__)


@dataclass(eq=False)
class IoctlRequest:
    """One FUSE_IOCTL: the caller's command, argument and (restricted-mode) data."""

    handle: int
    fh: int
    cmd: int
    arg: int
    in_data: bytes | None
    out_size: int
    pid: int  # the calling thread's TID
    uid: int
    answered: bool = False
    on_interrupt: Callable[[], None] | None = field(default=None, repr=False)

    def reply(self, result: int = 0, out: bytes | None = None) -> None:
        """Answer with a return value and, for _IOR/_IOWR commands, ``out_size`` bytes."""
        self._answer()
        if out is not None and len(out) != self.out_size:
            raise AssertionError(f"ioctl {self.cmd:#x} answers {len(out)} bytes, caller expects {self.out_size}")
        _ioctl.reply(self.handle, result, out)

    def fail(self, error: int) -> None:
        """Answer with an errno (the caller's ioctl returns -1)."""
        self._answer()
        _ioctl.reply_error(self.handle, error)

    def watch_interrupt(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` (in the trio thread) if the caller is signalled before the answer.

        The callback may only signal (wake a task, kick a vcpu): it must not answer.
        """
        self.on_interrupt = callback
        _pending[self.handle] = self
        _ioctl.watch_interrupt(self.handle)

    def _answer(self) -> None:
        if self.answered:
            raise AssertionError(f"ioctl {self.cmd:#x} answered twice")
        self.answered = True
        _pending.pop(self.handle, None)


_pending: dict[int, IoctlRequest] = {}  # requests watching for an interrupt, by libfuse handle


def pending_count() -> int:
    """How many requests wait for an answer with an interrupt watch (a leak shows here)."""
    return len(_pending)


def install(handler: Callable[[IoctlRequest], None]) -> None:
    """Route every FUSE ioctl on the mount to ``handler``, called in the trio thread.

    The handler answers at once or keeps the request and answers later.
    """

    def on_ioctl(
        handle: int,
        _inode: int,
        fh: int,
        cmd: int,
        arg: int,
        in_data: bytes | None,
        out_size: int,
        pid: int,
        uid: int,
        _flags: int,
    ) -> None:
        request = IoctlRequest(handle, fh, cmd, arg, in_data, out_size, pid, uid)
        try:
            handler(request)
        except Exception:
            log.exception("ioctl %#x failed", cmd)
            if not request.answered:
                request.fail(errno.EIO)

    def on_interrupt(handle: int) -> None:
        request = _pending.get(handle)
        if request is not None and request.on_interrupt is not None:
            request.on_interrupt()

    _ioctl.install(on_ioctl, on_interrupt)
