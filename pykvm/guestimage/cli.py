"""``pykvm guest build|path|clean``: the default Linux guest from the command line.

``build`` makes it (or finds it cached) and prints its kernel and initramfs paths,
``path`` prints them without building (what ``pykvm run`` boots without --kernel), and
``clean`` removes the build trees and older builds (``--all``: the guest too). Failures
are GuestBuildError, which pykvm/cli/ prints as one line.
"""

from __future__ import annotations

from pathlib import Path

from ..command_group import add_group
from ..errors import GuestBuildError

NOT_BUILT = "the default guest is not built: run `pykvm guest build`"


def add_parser(commands) -> None:
    """Add ``guest`` and its actions to pykvm's subcommands."""
    actions = add_group(
        commands, "guest", "ACTION", help="build, locate or remove the default Linux guest",
        description="The default Linux guest: a small Linux 6.1 and an initramfs with "
                    "busybox, pykvm's /init and its agent, built from sources that ship "
                    "with pykvm and cached in ${PYKVM_CACHE:-~/.cache/pykvm}.")

    make = actions.add_parser(
        "build", help="build it (a no-op when cached); prints its kernel and initramfs",
        description="Build the default guest from Debian 12's linux-source-6.1 and "
                    "busybox-static (as root, missing packages are installed with apt-get). "
                    "About 4 minutes of compiling from scratch; seconds when only /init or "
                    "the agent changed; a second when cached.")
    make.add_argument("--kernel-source", type=Path, metavar="PATH",
                      help="a Linux source tree or tarball to build instead of Debian's "
                           "linux-source-6.1 (its version should be close to 6.1: every "
                           "kernel.fragment option must survive)")
    make.add_argument("--force", action="store_true",
                      help="rebuild even when cached (the kernel incrementally)")
    make.set_defaults(handler=cmd_build)

    path = actions.add_parser("path", help="print the kernel and initramfs paths "
                                           "(exit 1 when not built)")
    which = path.add_mutually_exclusive_group()
    for flag, text in (("--kernel", "only the kernel"), ("--initrd", "only the initramfs"),
                       ("--dir", "only the directory")):
        which.add_argument(flag, dest="which", action="store_const", const=flag[2:], help=text)
    path.set_defaults(handler=cmd_path, which=None)

    clean = actions.add_parser(
        "clean", help="remove build trees and older builds (--all: the guest too)",
        description="Remove the extracted kernel source, the kernel object tree and builds "
                    "other than the current guest from the cache. Boot snapshots stay.")
    clean.add_argument("--all", action="store_true", dest="everything",
                       help="remove the current guest as well")
    clean.set_defaults(handler=cmd_clean)


def _print_paths(which: str | None) -> None:
    from ..machine import default_guest_dir, default_linux_guest

    if default_guest_dir() is None:
        raise GuestBuildError(NOT_BUILT)
    kernel, initrd = default_linux_guest()
    paths = {"kernel": [kernel], "initrd": [initrd], "dir": [default_guest_dir()],
             None: [kernel, initrd]}[which]
    for path in paths:
        if path is None:
            raise GuestBuildError(f"the default guest has no initramfs.cpio: {NOT_BUILT}")
        print(path)


def cmd_build(args) -> int:
    from .build import build_or_reuse

    result = build_or_reuse(args.force, args.kernel_source)
    print(result / "vmlinux")
    print(result / "initramfs.cpio")
    return 0


def cmd_path(args) -> int:
    _print_paths(args.which)
    return 0


def cmd_clean(args) -> int:
    from .cache import clean

    done = clean(args.everything)
    kept = f"; kept {done.kept}" if done.kept is not None else ""
    print(f"removed {len(done.removed)} entries ({done.freed / 2**20:.0f} MiB){kept}")
    return 0
