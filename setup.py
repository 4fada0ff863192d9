"""Builds the one C piece of kvmfs: the ioctl shim for pyfuse3 (see kvmfs/_ioctl.c)."""

import subprocess

from setuptools import Extension, setup


def pkg_config(*args: str) -> list[str]:
    return subprocess.run(["pkg-config", *args, "fuse3"], check=True, capture_output=True, text=True).stdout.split()


setup(
    ext_modules=[
        Extension(
            "kvmfs._ioctl",
            ["kvmfs/_ioctl.c"],
            extra_compile_args=pkg_config("--cflags"),
            extra_link_args=[*pkg_config("--libs"), "-ldl"],
        )
    ]
)
