"""Process isolation: each VM's backend runs in a worker process of its own.

``ProcessBackend`` wraps another backend (unicorn by default) and implements
the same interface by forwarding every call to a per-VM worker process, the
way QEMU and Firecracker run one process per VM:

- a guest that crashes unicorn kills only its worker: that VM's calls then
  fail with EIO (``BackendError``), every other VM and the mount carry on;
- a guest that wedges unicorn (a kick is not honoured within ``WEDGED_AFTER``
  seconds, or another call not answered within ``CALL_TIMEOUT``) gets its worker
  killed, with the same effect — the daemon never waits on a worker for ever;
- exit-heavy vcpus of different VMs do not contend for one GIL.

Workers are forked from a *zygote*, a process started once with the backend
already imported, so a new VM costs a fork (milliseconds), not a Python start.
Memory is shared, not copied: guest RAM and each vcpu's kvm_run are daemon
mappings whose file the worker maps too (found through /proc/self/map_files
and passed over the socket with SCM_RIGHTS).

Each VM has one channel (a SOCK_SEQPACKET socket pair) for VM-level calls and
kicks, and each vcpu one of its own, so a long KVM_RUN on one vcpu never holds
up the others. Every channel is strict request/reply, served by its own
thread in the worker.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import pickle
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from typing import Any

from kvmfs import abi, procmem
from kvmfs.backends import load
from kvmfs.backends.base import Backend, BackendError, VcpuBackend, VmBackend

WEDGED_AFTER = 2.0  # seconds a kicked vcpu may take to stop before its worker is killed
CALL_TIMEOUT = 5.0  # seconds any other call may take before its worker is killed
_MESSAGE = 1 << 16  # largest message (a full CPUID table is ~10 KiB)
# Vcpu calls that change no state: their replies carry no fresh registers.
_READ_ONLY = frozenset({"get_regs", "get_sregs", "get_fpu", "get_msr", "translate", "get_mp_state"})


class _Channel:
    """One end of a request/reply socket to a worker. Thread-safe; a dead peer is EIO."""

    def __init__(self, sock: socket.socket, on_death: Any) -> None:
        self.sock = sock
        self._lock = threading.Lock()
        self._on_death = on_death

    def call(self, *request: object, fds: tuple[int, ...] = (), watchdog: Any = None) -> Any:
        with self._lock:
            try:
                socket.send_fds(self.sock, [pickle.dumps(request)], list(fds))
                if watchdog is not None:  # a KVM_RUN: may take forever, unless it is kicked
                    while not select.select([self.sock], [], [], 0.1)[0]:
                        watchdog()
                elif not select.select([self.sock], [], [], CALL_TIMEOUT)[0]:
                    raise TimeoutError  # a worker that cannot answer a register read is wedged
                reply = self.sock.recv(_MESSAGE)
            except OSError:
                reply = b""
            if not reply:
                self._on_death()
                raise BackendError(errno.EIO, "the VM's worker process is gone")
            error, result = pickle.loads(reply)
            if error is not None:
                raise BackendError(error)
            return result

    def post(self, *request: object) -> None:
        """Send without waiting for a reply (kicks: they must not queue behind a call)."""
        with contextlib.suppress(OSError):  # the worker is gone: the waiting call reports it
            self.sock.send(pickle.dumps(request))


class ProcessBackend(Backend):
    """Runs the backend called ``inner`` (see kvmfs.backends.BACKENDS) in one worker process per VM."""

    name = "process"

    def __init__(self, inner: str = "unicorn") -> None:
        self._local = load(inner)  # answers the static questions; never runs a guest
        self.name = f"{self._local.name} (one process per VM)"
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        # The zygote exits when the daemon does (its channel closes); so do the workers.
        self._zygote = subprocess.Popen(
            [sys.executable, "-m", "kvmfs.backends.process", inner, str(theirs.fileno())],
            pass_fds=[theirs.fileno()],
            stdin=subprocess.DEVNULL,
        )
        theirs.close()
        self._zygote_channel = ours
        self._spawn_lock = threading.Lock()

    def create_vm(self) -> ProcessVm:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with self._spawn_lock:
            try:
                socket.send_fds(self._zygote_channel, [b"spawn"], [theirs.fileno()])
                pid = int(ours.recv(64))
            except (OSError, ValueError):
                raise BackendError(errno.EAGAIN, "the zygote process is gone") from None
            finally:
                theirs.close()
        return ProcessVm(ours, pid)

    def supported_cpuid(self) -> list[abi.kvm_cpuid_entry2]:
        return self._local.supported_cpuid()

    def msr_index_list(self) -> list[int]:
        return self._local.msr_index_list()


def _memory_fd(address: int, size: int) -> tuple[int, int]:
    """An fd for the file behind daemon memory at ``address``, and the offset of ``address`` in it."""
    mapping = procmem.mapping_at(os.getpid(), address, size)
    if mapping is None or not mapping.shared:
        raise BackendError(errno.EFAULT, "guest memory must be a shared mapping to reach a worker")
    fd = os.open(f"/proc/self/map_files/{mapping.start:x}-{mapping.end:x}", os.O_RDWR | os.O_CLOEXEC)
    return fd, mapping.offset + address - mapping.start


class ProcessVm(VmBackend):
    def __init__(self, sock: socket.socket, pid: int) -> None:
        self.pid = pid
        self.dead = False
        self.channel = _Channel(sock, self._died)

    def _died(self) -> None:
        """The worker crashed or was killed: from now on every call of this VM is EIO."""
        self.dead = True
        self.kill()

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)

    def create_vcpu(self, vcpu_id: int) -> ProcessVcpu:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.channel.call("create_vcpu", vcpu_id, fds=(theirs.fileno(),))
        finally:
            theirs.close()
        return ProcessVcpu(self, vcpu_id, _Channel(ours, self._died))

    def map_memory(self, guest_phys_addr: int, size: int, host_addr: int, readonly: bool) -> None:
        fd, offset = _memory_fd(host_addr, size)
        try:
            self.channel.call("map_memory", guest_phys_addr, size, offset, readonly, fds=(fd,))
        finally:
            os.close(fd)

    def unmap_memory(self, guest_phys_addr: int, size: int) -> None:
        self.channel.call("unmap_memory", guest_phys_addr, size)

    def memory_changed(self, guest_phys_addr: int, size: int) -> None:
        self.channel.call("memory_changed", guest_phys_addr, size)

    def close(self) -> None:
        self.channel.sock.close()  # the worker exits when its VM channel closes


class ProcessVcpu(VcpuBackend):
    """A vcpu in a worker. Its register state is mirrored here, so GET_REGS/SREGS/FPU between runs
    cost no round trip: every call that may change state (a run included) brings fresh registers
    back with its reply, and forgets the mirrored sregs and FPU state until they are asked for."""

    def __init__(self, vm: ProcessVm, vcpu_id: int, channel: _Channel) -> None:
        self.vm, self.vcpu_id, self.channel = vm, vcpu_id, channel
        self._shared_area: int | None = None  # the address of the run area the worker maps
        self._kicked_at: float | None = None
        self._mirror: dict[str, ctypes.Structure] = {}

    def _call(self, method: str, *args: object, watchdog: Any = None) -> Any:
        result, regs = self.channel.call(method, *args, watchdog=watchdog)
        if regs is not None:  # the call may have changed state: only the registers are known now
            self._mirror = {"regs": abi.kvm_regs.from_buffer_copy(regs)}
        return result

    def _get(self, state: str) -> Any:
        if state not in self._mirror:
            self._mirror[state] = self._call(f"get_{state}")
        return type(self._mirror[state]).from_buffer_copy(self._mirror[state])

    def get_regs(self) -> abi.kvm_regs:
        return self._get("regs")

    def set_regs(self, regs: abi.kvm_regs) -> None:
        self._call("set_regs", regs)

    def get_sregs(self) -> abi.kvm_sregs:
        return self._get("sregs")

    def set_sregs(self, sregs: abi.kvm_sregs) -> None:
        self._call("set_sregs", sregs)

    def get_fpu(self) -> abi.kvm_fpu:
        return self._get("fpu")

    def set_fpu(self, fpu: abi.kvm_fpu) -> None:
        self._call("set_fpu", fpu)

    def get_msr(self, index: int) -> int | None:
        return self._call("get_msr", index)

    def set_msr(self, index: int, value: int) -> bool:
        return self._call("set_msr", index, value)

    def set_cpuid(self, entries: list[abi.kvm_cpuid_entry2]) -> None:
        self._call("set_cpuid", entries)

    def translate(self, linear_address: int) -> abi.kvm_translation:
        return self._call("translate", linear_address)

    def queue_interrupt(self, vector: int) -> None:
        self._call("queue_interrupt", vector)

    def get_mp_state(self) -> int:
        return self._call("get_mp_state")

    def set_mp_state(self, state: int) -> None:
        self._call("set_mp_state", state)

    def set_guest_debug(self, debug: abi.kvm_guest_debug) -> None:
        self._call("set_guest_debug", debug)

    def run(self, run: ctypes.Array) -> None:
        address = ctypes.addressof(run)
        if self._shared_area != address:  # first run, or a new run area: let the worker map it
            fd, offset = _memory_fd(address, ctypes.sizeof(run))
            try:
                self.channel.call("share_run_area", offset, ctypes.sizeof(run), fds=(fd,))
            finally:
                os.close(fd)
            self._shared_area = address
        self._kicked_at = None
        self._call("run", watchdog=self._watchdog)

    def _watchdog(self) -> None:
        kicked_at = self._kicked_at
        if kicked_at is not None and time.monotonic() - kicked_at > WEDGED_AFTER:
            self.vm.kill()  # the guest wedged unicorn: give up the VM, keep the mount

    def kick(self) -> None:
        if self._kicked_at is None:
            self._kicked_at = time.monotonic()
        self.vm.channel.post("kick", self.vcpu_id)

    def close(self) -> None:
        self.channel.sock.close()


# --- the worker side ----------------------------------------------------------------------------


def _errno_of(error: Exception) -> int:
    """The errno a call that raised answers with: its own for OSError (BackendError included),
    EIO (and a traceback on the worker's stderr, the daemon's log) for a bug."""
    if isinstance(error, OSError) and error.errno:
        return error.errno
    traceback.print_exception(error)
    return errno.EIO


def _serve_vcpu(sock: socket.socket, vcpu: VcpuBackend) -> None:
    """Answer one vcpu's calls, in a thread of its own, until its channel closes."""
    run_area: tuple[Any, ctypes.Array] | None = None
    while True:
        message, fds, _, _ = socket.recv_fds(sock, _MESSAGE, 1)
        if not message:
            return
        method, *args = pickle.loads(message)
        try:
            if method == "share_run_area":
                import mmap

                offset, size = args
                view = mmap.mmap(fds[0], size, mmap.MAP_SHARED, offset=offset)
                os.close(fds[0])
                run_area = (view, (ctypes.c_char * size).from_buffer(view))
                result = None
            elif method == "run":
                assert run_area is not None
                result = vcpu.run(run_area[1])
            else:
                result = getattr(vcpu, method)(*args)
            if method != "share_run_area":  # send the daemon's mirror fresh registers after a change
                # raw bytes: pickling the ctypes struct costs more than the rest of the reply
                result = (result, None if method in _READ_ONLY else bytes(vcpu.get_regs()))
            reply: tuple[int | None, object] = (None, result)
        except Exception as error:  # every call gets its answer: a silent worker hangs the daemon's caller
            reply = (_errno_of(error), None)
        sock.send(pickle.dumps(reply))


def _serve_vm(sock: socket.socket, backend: Backend) -> None:
    """A worker: one VM of ``backend``, its VM calls here and each vcpu in a thread."""
    import mmap

    vm = backend.create_vm()
    vcpus: dict[int, VcpuBackend] = {}
    memory: dict[int, mmap.mmap] = {}
    while True:
        message, fds, _, _ = socket.recv_fds(sock, _MESSAGE, 1)
        if not message:
            os._exit(0)  # the daemon closed the VM (or died): nothing to clean up in a dying process
        method, *args = pickle.loads(message)
        if method == "kick":
            vcpus[args[0]].kick()
            continue
        try:
            result = None
            if method == "create_vcpu":
                vcpu = vcpus[args[0]] = vm.create_vcpu(args[0])
                channel = socket.socket(fileno=fds[0])
                threading.Thread(target=_serve_vcpu, args=(channel, vcpu), daemon=True).start()
            elif method == "map_memory":
                gpa, size, offset, readonly = args
                memory[gpa] = mmap.mmap(fds[0], size, mmap.MAP_SHARED, offset=offset)
                os.close(fds[0])
                host = ctypes.addressof(ctypes.c_char.from_buffer(memory[gpa]))
                vm.map_memory(gpa, size, host, readonly)
            elif method == "unmap_memory":
                vm.unmap_memory(*args)
                del memory[args[0]]  # unmapped when unicorn's last reference goes
            else:
                vm.memory_changed(*args)
            reply: tuple[int | None, object] = (None, result)
        except Exception as error:  # every call gets its answer: a silent worker hangs the daemon's caller
            reply = (_errno_of(error), None)
        sock.send(pickle.dumps(reply))


def _zygote(inner: str, control: socket.socket) -> None:
    """Fork one worker per "spawn" request, with the backend already imported."""
    backend = load(inner)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # workers are reaped automatically
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the daemon decides when we stop
    while True:
        message, fds, _, _ = socket.recv_fds(control, 64, 1)
        if not message:
            return
        vm_sock = socket.socket(fileno=fds[0])
        pid = os.fork()
        if pid == 0:
            control.close()
            vm_sock.send(str(os.getpid()).encode())
            _serve_vm(vm_sock, backend)
        vm_sock.close()


if __name__ == "__main__":
    _zygote(sys.argv[1], socket.socket(fileno=int(sys.argv[2])))
