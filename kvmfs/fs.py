"""The filesystem: KVM's object hierarchy as files, served with pyfuse3 on trio.

    MOUNT/kvm            the system: /dev/kvm's ioctls         (0666)
    MOUNT/vm<N>/         one directory per live VM              (0700, the creator's)
    MOUNT/vm<N>/vm       the VM: VM ioctls                      (0600)
    MOUNT/vm<N>/vcpu<I>  one inode per vcpu: vcpu ioctls, mmap  (0600)

This layer only translates: inodes and handles to objects, FUSE requests to
calls on kvmfs.objects, and answers back. Quick ioctls are answered in the trio
thread; blocking ones (KVM_RUN) and those that touch the caller's memory run in
a worker thread, and a FUSE interrupt (the client got a signal) kicks the vcpu.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import itertools
import json
import logging
import mmap
import os
import signal
import stat
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from kvmfs import ioctl_shim  # before pyfuse3: it adds the ioctl operation

from kvmfs.ioctl_shim import IoctlRequest  # isort: skip

import pyfuse3
import trio

from kvmfs import abi, procmem
from kvmfs.objects import (
    SYSTEM_IOCTLS,
    VCPU_IOCTLS,
    VCPU_MMAP_SIZE,
    VM_IOCTLS,
    Handler,
    Ioctl,
    KvmError,
    Reply,
    System,
    SystemHandle,
    Vcpu,
    Vm,
)
from kvmfs.vcpu_thread import VcpuThread

log = logging.getLogger(__name__)
_libc = ctypes.CDLL(None, use_errno=True)

ROOT_INODE = pyfuse3.ROOT_INODE
KVM_INODE = ROOT_INODE + 1
CACHE_TIMEOUT = 300.0  # entries are invalidated explicitly when a VM dies
STATS_XATTR = b"user.kvmfs.stats"
STOP_RETRY = 0.01  # seconds between kicks of a vcpu whose client was signalled


@dataclass(eq=False)
class Node:
    """One inode: ``kind`` is root, kvm, vmdir, vm or vcpu."""

    inode: int
    kind: str
    vm: Vm | None = None
    vcpu: Vcpu | None = None


@dataclass(eq=False)
class VmHandle:
    """An open ``vm`` file: holds its VM."""

    vm: Vm


@dataclass(eq=False)
class DaemonView:
    """The daemon's own open of a vcpu file, made to map its kvm_run (see ``_kvm_run_view``)."""

    vcpu: Vcpu


@dataclass(eq=False)
class VcpuHandle:
    """An open vcpu file: holds its VM, as the kernel's vcpu file holds the VM file."""

    vcpu: Vcpu


Handle = SystemHandle | VmHandle | VcpuHandle | DaemonView


def _never_crash(operation: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """pyfuse3 ends the whole mount when a handler raises anything but FUSEError: turn a kvmfs
    bug into EIO for the one request (and a log line) instead."""

    @functools.wraps(operation)
    async def guarded(*args: object) -> T:
        try:
            return await operation(*args)
        except pyfuse3.FUSEError:
            raise
        except Exception:
            log.exception("%s failed", operation.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return guarded


T = TypeVar("T")


class KvmFs(pyfuse3.Operations):
    """pyfuse3 operations for one mount."""

    supports_dot_lookup = False
    enable_writeback_cache = False

    def __init__(self, system: System, mountpoint: str) -> None:
        super().__init__()
        self.system = system
        self.mountpoint = os.path.abspath(mountpoint)
        self.nodes: dict[int, Node] = {
            ROOT_INODE: Node(ROOT_INODE, "root"),
            KVM_INODE: Node(KVM_INODE, "kvm"),
        }
        self.handles: dict[int, Handle] = {}
        self.vm_nodes: dict[Vm, dict[str, Node]] = {}  # per VM: "" → its directory, "vm", "vcpu<I>"
        self._inodes = itertools.count(KVM_INODE + 1)  # never reused within a mount
        self._handles = itertools.count(1)
        self._vcpu_threads: dict[Vcpu, VcpuThread] = {}
        self._nursery: trio.Nursery | None = None
        self._views: dict[Vcpu, mmap.mmap] = {}  # the daemon's own locked mapping of each vcpu file
        ioctl_shim.install(self._on_ioctl)

    async def serve(self) -> None:
        """Run the FUSE loop; ioctls answered later run as tasks of the same nursery."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._stop_on_signal)
            await pyfuse3.main()
            for vm in list(self.system.vms.values()):  # no guest may keep a worker thread busy
                for vcpu in vm.vcpus.values():
                    vcpu.kick()
            nursery.cancel_scope.cancel()

    async def _stop_on_signal(self) -> None:
        """SIGINT/SIGTERM end the FUSE loop; ``serve``'s caller unmounts."""
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
            async for _ in signals:
                pyfuse3.terminate()
                return

    # --- inodes and attributes -----------------------------------------------------------------

    def _attributes(self, node: Node) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = node.inode
        attr.entry_timeout = attr.attr_timeout = CACHE_TIMEOUT
        attr.st_uid = node.vm.owner_uid if node.vm else 0
        attr.st_gid = 0
        attr.st_nlink = 1
        if node.kind == "root":
            attr.st_mode, attr.st_nlink = stat.S_IFDIR | 0o755, 2
        elif node.kind == "vmdir":
            attr.st_mode, attr.st_nlink = stat.S_IFDIR | 0o700, 2
        elif node.kind == "kvm":
            attr.st_mode = stat.S_IFREG | 0o666
        else:
            attr.st_mode = stat.S_IFREG | 0o600
        attr.st_size = VCPU_MMAP_SIZE if node.kind == "vcpu" else 0
        attr.st_blksize = abi.PAGE_SIZE
        return attr

    def _node(self, inode: int) -> Node:
        node = self.nodes.get(inode)
        if node is None or (node.vm is not None and node.vm.dead):
            raise pyfuse3.FUSEError(errno.ENOENT)
        return node

    def _children(self, node: Node) -> dict[str, Node]:
        if node.kind == "root":
            children = {"kvm": self.nodes[KVM_INODE]}
            children.update((f"vm{vm.number}", self._vm_node(vm, "")) for vm in list(self.system.vms.values()))
            return children
        if node.kind == "vmdir":
            vm = node.vm
            assert vm is not None
            children = {"vm": self._vm_node(vm, "vm")}
            children.update((f"vcpu{i}", self._vm_node(vm, f"vcpu{i}")) for i in sorted(vm.vcpus))
            return children
        raise pyfuse3.FUSEError(errno.ENOTDIR)

    def _vm_node(self, vm: Vm, name: str) -> Node:
        """The node of a VM's directory (name ""), ``vm`` file or vcpu file, made on first use."""
        nodes = self.vm_nodes.setdefault(vm, {})
        node = nodes.get(name)
        if node is None:
            kind = "vmdir" if not name else "vm" if name == "vm" else "vcpu"
            vcpu = vm.vcpus[int(name[4:])] if kind == "vcpu" else None
            node = nodes[name] = Node(next(self._inodes), kind, vm, vcpu)
            self.nodes[node.inode] = node
        return node

    @_never_crash
    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        child = self._children(self._node(parent_inode)).get(name.decode(errors="replace"))
        if child is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attributes(child)

    @_never_crash
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attributes(self._node(inode))

    @_never_crash
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        if self._node(inode).kind not in ("root", "vmdir"):
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    @_never_crash
    async def readdir(self, inode: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        entries = sorted(self._children(self._node(inode)).items(), key=lambda item: item[1].inode)
        for name, child in entries:
            if child.inode > start_id and not pyfuse3.readdir_reply(
                token, name.encode(), self._attributes(child), child.inode
            ):
                return

    @_never_crash
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        data = pyfuse3.StatvfsData()
        data.f_bsize = data.f_frsize = abi.PAGE_SIZE
        data.f_files = len(self.nodes)
        data.f_namemax = 255
        return data

    @_never_crash
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        """``user.kvmfs.stats`` on the mount's root: the daemon's tables, for tests and the curious."""
        if inode != ROOT_INODE or name != STATS_XATTR:
            raise pyfuse3.FUSEError(errno.ENODATA)
        return json.dumps(self.stats()).encode()

    @_never_crash
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        return [STATS_XATTR] if inode == ROOT_INODE else []

    def stats(self) -> dict[str, int]:
        return {
            "vms": len(self.system.vms),
            "inodes": len(self.nodes),
            "handles": len(self.handles),
            "pending_ioctls": ioctl_shim.pending_count(),
            "kvm_run_views": len(self._views),
        }

    # --- open files ----------------------------------------------------------------------------

    @_never_crash
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        node = self._node(inode)
        handle: Handle
        if node.kind == "vcpu" and procmem.thread_group(ctx.pid) == os.getpid():
            assert node.vcpu is not None
            handle = DaemonView(node.vcpu)  # the daemon mapping kvm_run for itself: holds nothing
        elif node.kind == "kvm":
            handle = SystemHandle(self.system)
        elif node.kind == "vm":
            assert node.vm is not None
            node.vm.open_vm_file()
            handle = VmHandle(node.vm)
        elif node.kind == "vcpu":
            assert node.vm is not None and node.vcpu is not None
            node.vm.hold()
            handle = VcpuHandle(node.vcpu)
        else:
            raise pyfuse3.FUSEError(errno.EISDIR)
        fh = next(self._handles)
        self.handles[fh] = handle
        # Page-cache mode for vcpu files (MAP_SHARED of kvm_run needs it); the others have no data.
        return pyfuse3.FileInfo(fh=fh, direct_io=node.kind != "vcpu", keep_cache=True)

    @_never_crash
    async def read(self, fh: int, off: int, size: int) -> bytes:
        """Fills the page cache of a vcpu file before the daemon has mapped it (then it stays put)."""
        handle = self.handles[fh]
        if not isinstance(handle, VcpuHandle | DaemonView):
            return b""
        # Never short (but at the end): FUSE would take a short read for the file's end.
        return bytes(handle.vcpu.run_area[off : off + size])

    @_never_crash
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        """Writes to a vcpu file, and write-back of its mmap, already sit in the page cache that
        is kvm_run's home (``_kvm_run_view``): there is nothing more to store."""
        if not isinstance(self.handles[fh], VcpuHandle | DaemonView):
            raise pyfuse3.FUSEError(errno.EINVAL)
        if off + len(buf) > VCPU_MMAP_SIZE:
            raise pyfuse3.FUSEError(errno.ENOSPC)
        return len(buf)

    @_never_crash
    async def release(self, fh: int) -> None:
        handle = self.handles.pop(fh)
        if isinstance(handle, SystemHandle):
            dead = handle.release()
        elif isinstance(handle, DaemonView):
            dead = []
        else:
            vm = handle.vm if isinstance(handle, VmHandle) else handle.vcpu.vm
            dead = [vm] if vm.put() else []
        for vm in dead:
            await self._forget_vm(vm)

    async def _forget_vm(self, vm: Vm) -> None:
        """Drop a dead VM's inodes and make the kernel forget its directory entry."""
        for node in self.vm_nodes.pop(vm, {}).values():
            del self.nodes[node.inode]
        for vcpu in [vcpu for vcpu in self._vcpu_threads if vcpu.vm is vm]:
            self._vcpu_threads.pop(vcpu).stop()
        views = []
        for vcpu in [vcpu for vcpu in self._views if vcpu.vm is vm]:
            vcpu.run_area = (ctypes.c_char * VCPU_MMAP_SIZE)()  # release the view before unmapping it
            views.append(self._views.pop(vcpu))
        # Both can block on the kernel: never in the trio thread.
        await trio.to_thread.run_sync(_forget_in_kernel, f"vm{vm.number}".encode(), views)

    # --- ioctls ----------------------------------------------------------------------------------

    def _on_ioctl(self, request: IoctlRequest) -> None:
        """Route an ioctl to its object's dispatcher (system, VM or vcpu)."""
        handle = self.handles.get(request.fh)
        call = Ioctl(request.cmd, request.arg, request.in_data or b"", request.pid)
        if handle is None:
            request.fail(errno.EBADF)
        elif isinstance(handle, SystemHandle):
            self._system_ioctl(request, call, handle)
        elif isinstance(handle, DaemonView):
            request.fail(errno.EINVAL)
        elif isinstance(handle, VmHandle):
            self._object_ioctl(request, call, handle.vm, handle.vm, VM_IOCTLS, errno.ENOTTY)
        else:
            vcpu = handle.vcpu
            self._vcpu_ioctl(request, call, vcpu)

    def _system_ioctl(self, request: IoctlRequest, call: Ioctl, handle: SystemHandle) -> None:
        if call.cmd == abi.KVM_CREATE_VM:
            self._answer(request, lambda: self._create_vm(handle, call, request.uid))
            return
        handler = SYSTEM_IOCTLS.get(call.cmd)
        if handler is None:
            request.fail(errno.EINVAL)  # kvm_arch_dev_ioctl's answer to an unknown command
        else:
            self._start(request, call, self.system, handler)

    def _create_vm(self, handle: SystemHandle, call: Ioctl, uid: int) -> int:
        if call.arg != 0:  # only KVM_X86_DEFAULT_VM
            raise KvmError(errno.EINVAL)
        return self.system.create_vm(handle, uid, call.tid).number

    def _object_ioctl(
        self, request: IoctlRequest, call: Ioctl, vm: Vm, target: Vm, table: dict[int, Handler], unknown_errno: int
    ) -> None:
        handler = self._handler(request, call, vm, table, unknown_errno)
        if handler is not None:
            self._start(request, call, target, handler)

    def _handler(
        self, request: IoctlRequest, call: Ioctl, vm: Vm, table: dict[int, Handler], unknown_errno: int
    ) -> Handler | None:
        """The dispatcher's case for ``call``; None once the request is answered with an error."""
        try:
            vm.check_caller(call)
        except (KvmError, OSError) as error:
            request.fail(error.errno or errno.EIO)
            return None
        handler = table.get(call.cmd)
        if handler is None:
            request.fail(unknown_errno)
        return handler

    def _vcpu_ioctl(self, request: IoctlRequest, call: Ioctl, vcpu: Vcpu) -> None:
        """Quick ioctls of an idle vcpu are answered here; the rest by the vcpu's thread, in order."""
        handler = self._handler(request, call, vcpu.vm, VCPU_IOCTLS, errno.EINVAL)
        if handler is None:
            return
        thread = self._vcpu_threads.get(vcpu)
        if thread is None:
            thread = self._vcpu_threads[vcpu] = VcpuThread(f"vm{vcpu.vm.number}/vcpu{vcpu.vcpu_id}")
        if not handler.threaded and not thread.busy:
            self._answer(request, lambda: handler.function(vcpu, call))
            return
        function = handler.function
        if call.cmd == abi.KVM_RUN:
            function = self._run
            request.watch_interrupt(lambda: self._start_task(self._stop_run, request, vcpu))
        thread.submit(lambda: self._answer_safely(request, lambda: function(vcpu, call)))

    def _start_task(self, task: Callable[..., Awaitable[None]], *args: object) -> None:
        assert self._nursery is not None
        self._nursery.start_soon(task, *args)

    async def _stop_run(self, request: IoctlRequest, vcpu: Vcpu) -> None:
        """The client of a KVM_RUN got a signal: kick the vcpu until the run has answered EINTR.

        Kicking again covers a run that had not entered the guest yet when the first kick came.
        """
        while not request.answered:
            await trio.to_thread.run_sync(vcpu.kick)  # a backend's kick may wait for the run to stop
            await trio.sleep(STOP_RETRY)

    def _start(self, request: IoctlRequest, call: Ioctl, target: object, handler: Handler) -> None:
        """Answer now if the case is quick; else from a worker thread."""
        if not handler.threaded:
            self._answer(request, lambda: handler.function(target, call))
            return
        self._start_task(self._answer_later, request, call, target, handler)

    async def _answer_later(self, request: IoctlRequest, call: Ioctl, target: object, handler: Handler) -> None:
        try:
            outcome = await trio.to_thread.run_sync(_outcome, lambda: handler.function(target, call))
            self._answer(request, outcome)
        finally:
            if not request.answered:
                request.fail(errno.EIO)

    def _answer_safely(self, request: IoctlRequest, compute: Callable[[], Reply]) -> None:
        """``_answer`` for a vcpu thread: a kvmfs bug is EIO for this request, never a dead thread."""
        try:
            self._answer(request, compute)
        except Exception:
            log.exception("ioctl %#x failed", request.cmd)
            if not request.answered:
                request.fail(errno.EIO)

    def _answer(self, request: IoctlRequest, compute: Callable[[], Reply]) -> None:
        """Compute an ioctl's reply and send it; a KvmError is the ioctl's errno."""
        try:
            reply = compute()
        except KvmError as error:
            request.fail(error.errno)
            return
        except OSError as error:  # the caller's memory: EFAULT and friends
            request.fail(error.errno or errno.EIO)
            return
        if isinstance(reply, tuple):
            result, struct = reply
            out = bytes(struct)
        else:
            result, out = reply, request.in_data or bytes(request.out_size)
        request.reply(result, out[: request.out_size] if request.out_size else None)

    def _run(self, vcpu: Vcpu, call: Ioctl) -> Reply:
        """KVM_RUN (worker thread), with kvm_run living in the vcpu file's page cache."""
        if vcpu not in self._views:
            self._kvm_run_view(vcpu)
        return VCPU_IOCTLS[abi.KVM_RUN].function(vcpu, call)

    def _kvm_run_view(self, vcpu: Vcpu) -> None:
        """Map the vcpu file into the daemon, lock it in memory, and make it the vcpu's kvm_run.

        Every client mmap of the file shares these page-cache pages: exits the backend
        writes are visible to clients at once, and what clients write (IN data, MMIO
        read data, immediate_exit) is read straight from there — no copying per run,
        from any client thread. Locked, the pages never fault, so nothing here ever
        waits on a FUSE request to this daemon. Runs in a worker thread: the open and
        the first touch of each page are FUSE requests the trio thread must answer.
        """
        fd = os.open(self._vcpu_path(vcpu), os.O_RDWR | os.O_CLOEXEC)
        try:
            view = mmap.mmap(fd, VCPU_MMAP_SIZE, mmap.MAP_SHARED)
        finally:
            os.close(fd)
        # from_address, not from_buffer: no Python object may pin the mapping once the VM is gone
        # (a traceback holding a frame that held kvm_run would); _forget_vm unmaps it explicitly.
        area = (ctypes.c_char * VCPU_MMAP_SIZE).from_address(_address_of(view))
        if _libc.mlock(ctypes.c_void_p(ctypes.addressof(area)), ctypes.c_size_t(VCPU_MMAP_SIZE)) != 0:
            raise OSError(ctypes.get_errno(), "mlock of kvm_run failed")
        vcpu.run_area = area
        self._views[vcpu] = view

    def _vcpu_path(self, vcpu: Vcpu) -> str:
        return f"{self.mountpoint}/vm{vcpu.vm.number}/vcpu{vcpu.vcpu_id}"


def _address_of(view: mmap.mmap) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(view))


def _forget_in_kernel(name: bytes, views: list[mmap.mmap]) -> None:
    """Invalidate a dead VM's directory entry, then unmap the daemon's views of its kvm_runs."""
    try:
        pyfuse3.invalidate_entry(ROOT_INODE, name)
    except OSError as error:  # ENOENT: the kernel had no such entry cached
        if error.errno != errno.ENOENT:
            log.warning("invalidating %s: %s", name.decode(), error)
    for view in views:
        view.close()


def _outcome(compute: Callable[[], Reply]) -> Callable[[], Reply]:
    """Run ``compute`` in the worker thread; hand its result or error back as a callable."""
    try:
        reply = compute()
    except (KvmError, OSError) as error:
        caught = error
        return lambda: (_ for _ in ()).throw(caught)
    return lambda: reply


def mount_options() -> set[str]:
    return {"fsname=kvmfs", "subtype=kvmfs", "allow_other", "default_permissions"}


def serve(system: System, mountpoint: str, *, debug: bool = False) -> None:
    """Mount, serve until unmounted or signalled, and clean up."""
    operations = KvmFs(system, mountpoint)
    options = mount_options()
    if debug:
        options.add("debug")
    pyfuse3.init(operations, mountpoint, options)
    try:
        trio.run(operations.serve)
    finally:
        pyfuse3.close(unmount=True)
