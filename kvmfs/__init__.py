"""kvmfs: the KVM API as a FUSE filesystem."""
