"""The ``kvmfs`` command: mount, unmount, and a few things to do with a mount."""

from __future__ import annotations

import argparse
import ctypes
import errno
import logging
import os
import subprocess
import sys
import tempfile
import time

from kvmfs import abi
from kvmfs.backends import BACKENDS

LAYOUT = """\
layout of a mount:
  MOUNT/kvm            answers /dev/kvm's ioctls; KVM_CREATE_VM returns a VM number N
  MOUNT/vm<N>/         appears for each live VM (mode 0700, owned by its creator)
  MOUNT/vm<N>/vm       answers VM ioctls; KVM_CREATE_VCPU(I) returns I
  MOUNT/vm<N>/vcpu<I>  answers vcpu ioctls; mmap it for struct kvm_run

Ioctl numbers and structs are <linux/kvm.h>'s. A VM lives while its vm file,
any of its vcpu files, or (until the vm file is first opened) the kvm handle
that created it is open; then vm<N> disappears. VM numbers are never reused.
"""

MOUNT_TIMEOUT = 10.0


class CliError(Exception):
    """A message for the user; the command exits 1."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="kvmfs",
        description="The KVM API as a filesystem: a FUSE daemon whose files answer KVM's ioctls.",
        epilog=LAYOUT,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    mount = commands.add_parser(
        "mount",
        help="mount kvmfs (returns once mounted)",
        epilog=LAYOUT,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    mount.add_argument("mountpoint")
    mount.add_argument("--foreground", "-f", action="store_true", help="serve in this process until unmounted")
    mount.add_argument("--debug", action="store_true", help="log every FUSE request (implies --foreground)")
    mount.add_argument(
        "--isolation",
        choices=["process", "thread"],
        default="process",
        help="run each VM's guest in a worker process of its own (default), or in daemon threads",
    )
    mount.add_argument(
        "--backend",
        choices=sorted(BACKENDS),
        default="unicorn",
        help="what runs the guests: unicorn (default), or kvm, a passthrough to this machine's /dev/kvm",
    )
    mount.add_argument("--log", metavar="FILE", help="where the background daemon writes warnings (default: nowhere)")
    umount = commands.add_parser("umount", help="unmount a kvmfs mount")
    umount.add_argument("mountpoint")
    listing = commands.add_parser("ls", help="list a mount's VMs and vcpus with each vcpu's last exit")
    listing.add_argument("mountpoint")
    hello = commands.add_parser("hello", help="run the hello-world guest through a mount, in each CPU mode")
    hello.add_argument("mountpoint")
    bench = commands.add_parser("bench", help="measure a mount against /dev/kvm, bare unicorn and raw FUSE")
    bench.add_argument("mountpoint")
    bench.add_argument("--quick", action="store_true", help="fewer iterations")
    args = parser.parse_args(argv)
    try:
        if args.command == "mount":
            return _mount(args.mountpoint, args)
        if args.command == "umount":
            return _umount(args.mountpoint)
        if args.command == "ls":
            return _list(args.mountpoint)
        if args.command == "hello":
            from kvmfs import hello as hello_vmm

            return hello_vmm.main(args.mountpoint)
        from kvmfs import bench as benchmark

        return benchmark.main(args.mountpoint, quick=args.quick)
    except CliError as error:
        print(f"kvmfs: {error}", file=sys.stderr)
        return 1


def _mount(mountpoint: str, args: argparse.Namespace) -> int:
    mountpoint = os.path.abspath(mountpoint)
    _check_mountpoint(mountpoint)
    if args.foreground or args.debug:
        return _serve(mountpoint, args.debug, args.isolation, args.backend)
    log = args.log
    # Start the daemon, wait until the mount answers, and leave it running. Its output goes
    # to the log file, or to an anonymous file shown here if it fails to start.
    command = [sys.executable, "-m", "kvmfs.cli", "mount", "--foreground", mountpoint]
    command += ["--isolation", args.isolation, "--backend", args.backend]
    output = open(log, "ab") if log else tempfile.TemporaryFile()  # noqa: SIM115 - the daemon's from now on
    with output:
        daemon = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=output, stderr=output, start_new_session=True
        )
    deadline = time.monotonic() + MOUNT_TIMEOUT
    while time.monotonic() < deadline:
        if daemon.poll() is not None:
            output.seek(0)
            told = output.read().decode(errors="replace").strip() if not log else f"see {log}"
            raise CliError(f"the daemon exited with status {daemon.returncode} before mounting {mountpoint}: {told}")
        if is_kvmfs_mount(mountpoint) and os.path.exists(os.path.join(mountpoint, "kvm")):
            print(f"kvmfs mounted at {mountpoint} (daemon pid {daemon.pid})")
            return 0
        time.sleep(0.02)
    daemon.terminate()
    raise CliError(f"timed out waiting for {mountpoint} to be mounted")


def _serve(mountpoint: str, debug: bool, isolation: str, backend_name: str) -> int:
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, format="kvmfs: %(message)s")
    from kvmfs import fs  # imports pyfuse3 (after the ioctl shim)
    from kvmfs.backends import load
    from kvmfs.backends.process import ProcessBackend
    from kvmfs.objects import System

    backend = ProcessBackend(backend_name) if isolation == "process" else load(backend_name)
    try:
        fs.serve(System(backend), mountpoint, debug=debug)
    except RuntimeError as error:  # pyfuse3: fuse_session_mount failed
        raise CliError(f"cannot mount {mountpoint}: {error} (is /dev/fuse there, and are you root?)") from None
    return 0


def _check_mountpoint(mountpoint: str) -> None:
    try:
        os.statvfs(mountpoint)  # goes to the daemon, if there is a mount: a dead one says ENOTCONN
    except FileNotFoundError:
        raise CliError(f"{mountpoint} does not exist: create it with `mkdir -p {mountpoint}`") from None
    except OSError as error:
        if error.errno == errno.ENOTCONN:
            raise CliError(
                f"{mountpoint} is a stale FUSE mount (its daemon is gone): run `kvmfs umount {mountpoint}` first"
            ) from None
        raise CliError(f"cannot use {mountpoint}: {error.strerror}") from None
    if is_kvmfs_mount(mountpoint):
        raise CliError(f"kvmfs is already mounted at {mountpoint}: run `kvmfs umount {mountpoint}` first")
    if os.path.ismount(mountpoint):
        raise CliError(f"{mountpoint} is already a mount point: unmount it or choose another directory")
    if not os.path.isdir(mountpoint):
        raise CliError(f"{mountpoint} is not a directory")


def is_kvmfs_mount(mountpoint: str) -> bool:
    with open("/proc/self/mounts") as mounts:
        return any(line.split()[1] == mountpoint and line.split()[2] == "fuse.kvmfs" for line in mounts if line.strip())


EXIT_NAMES = {value: name[len("KVM_EXIT_") :] for name, value in vars(abi).items() if name.startswith("KVM_EXIT_")}


def describe_exit(kvm_run: abi.kvm_run) -> str:
    """One line for the exit a vcpu's kvm_run holds, as a VMM would log it."""
    reason = kvm_run.exit_reason
    text = EXIT_NAMES.get(reason, f"exit {reason}")
    if reason == abi.KVM_EXIT_IO:
        io = kvm_run.io
        direction = "out" if io.direction == abi.KVM_EXIT_IO_OUT else "in"
        text += f" {direction} port {io.port:#x} size {io.size} count {io.count}"
    elif reason == abi.KVM_EXIT_MMIO:
        mmio = kvm_run.mmio
        text += f" {'write' if mmio.is_write else 'read'} {mmio.phys_addr:#x} len {mmio.len}"
    return text


def _list(mountpoint: str) -> int:
    """Reads only files: the VM directories and each vcpu file's kvm_run (its first bytes)."""
    names = sorted((name for name in os.listdir(mountpoint) if name.startswith("vm")), key=lambda n: int(n[2:]))
    for name in names:
        vm_dir = os.path.join(mountpoint, name)
        try:
            vcpus = sorted((n for n in os.listdir(vm_dir) if n.startswith("vcpu")), key=lambda n: int(n[4:]))
        except PermissionError:
            print(f"{name}  (owner uid {os.stat(vm_dir).st_uid}: not yours)")
            continue
        print(f"{name}  (owner uid {os.stat(vm_dir).st_uid}, {len(vcpus)} vcpus)")
        for vcpu in vcpus:
            with open(os.path.join(vm_dir, vcpu), "rb") as file:
                kvm_run = abi.kvm_run.from_buffer_copy(file.read(ctypes.sizeof(abi.kvm_run)))
            print(f"  {vcpu:<8} last exit: {describe_exit(kvm_run)}")
    return 0


def _umount(mountpoint: str) -> int:
    mountpoint = os.path.abspath(mountpoint)
    if not is_kvmfs_mount(mountpoint):
        raise CliError(f"{mountpoint} is not a kvmfs mount")
    result = subprocess.run(["fusermount3", "-u", mountpoint], capture_output=True, text=True)
    if result.returncode != 0:
        if "busy" in result.stderr:
            raise CliError(
                f"{mountpoint} is busy: close the files open in it (`fuser -vm {mountpoint}` lists who), "
                f"or detach it now with `umount -l {mountpoint}`"
            )
        # A stale mount whose daemon died: a lazy unmount always works for root.
        result = subprocess.run(["umount", "-l", mountpoint], capture_output=True, text=True)
        if result.returncode != 0:
            raise CliError(f"cannot unmount {mountpoint}: {result.stderr.strip()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
