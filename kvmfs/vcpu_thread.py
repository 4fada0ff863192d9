"""One thread per vcpu, for its blocking ioctls and those that wait behind them.

KVM serialises a vcpu's ioctls (``vcpu->mutex``) and KVM_RUN blocks for as long
as the guest runs. kvmfs gives each vcpu a thread of its own: the trio thread
answers a vcpu's quick ioctls itself while the vcpu is idle, and hands
everything else — KVM_RUN, ioctls that touch the caller's memory, and any ioctl
arriving while the vcpu is busy — to the vcpu's thread, which runs them in
arrival order and answers each straight to FUSE (libfuse replies are
thread-safe). Compared with a trio task plus ``trio.to_thread`` per KVM_RUN, this
saves two thread hand-offs on every exit.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable


class VcpuThread:
    """A vcpu's worker thread; started on first use, ended by ``stop``."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._queued = 0
        self._thread: threading.Thread | None = None

    @property
    def busy(self) -> bool:
        """Jobs are queued or running: a new ioctl must wait its turn behind them."""
        with self._lock:
            return self._queued > 0

    def submit(self, job: Callable[[], None]) -> None:
        with self._lock:
            self._queued += 1
        if self._thread is None:
            self._thread = threading.Thread(target=self._serve, name=self._name, daemon=True)
            self._thread.start()
        self._jobs.put(job)

    def stop(self) -> None:
        """End the thread once the jobs already queued are done."""
        if self._thread is not None:
            self._jobs.put(None)

    def _serve(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                job()
            finally:
                with self._lock:
                    self._queued -= 1
