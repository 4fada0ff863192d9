"""`kvmfs hello MOUNT`: a small VMM that runs the hello-world guest through a kvmfs mount.

The guest prints "Hello, world!" one byte at a time with `out` to the serial
port (0x3f8); the VMM loops on KVM_RUN and copies each KVM_EXIT_IO's byte to
stdout until the guest halts. It does so in each CPU mode (kvmfs.guests): real
mode, 32-bit protected mode and 64-bit long mode set up by the VMM with
KVM_SET_SREGS, and a boot-loader guest that goes real → protected → long itself.
Nothing here is kvmfs-specific beyond the path: pass /dev/kvm's directory's
`kvm` and it runs on KVM.
"""

from __future__ import annotations

import os
import sys

from kvmfs.client import Kvm
from kvmfs.guests import MODES, run_hello

DESCRIPTIONS = {
    "real": "real mode",
    "protected": "32-bit protected mode (segments from KVM_SET_SREGS, no GDT)",
    "long": "64-bit long mode (4-level paging built by the VMM)",
    "boot": "boot loader: real → protected → long by the guest itself",
}


def main(mountpoint: str) -> int:
    path = os.path.join(mountpoint, "kvm")
    with Kvm.open(path) as kvm:
        print(f"running the hello-world guest through {path}")
        for mode in MODES:
            output = run_hello(kvm, mode).decode(errors="replace")
            print(f"  {DESCRIPTIONS[mode]:<60} {output}", end="" if output.endswith("\n") else "\n")
            if output != "Hello, world!\n":
                print(f"kvmfs hello: the {mode} guest printed {output!r}", file=sys.stderr)
                return 1
    return 0
