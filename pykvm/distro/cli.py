"""``pykvm image debian``: build (or find cached) a Debian root filesystem image and
write it to ``-o``. The recipe and the caching are debian.py's; failures are typed
errors that pykvm/cli/ prints as one line."""

from __future__ import annotations

import sys
from pathlib import Path

from ..command_group import add_group
from . import DEBIAN_DEFAULT_SUITE, DEBIAN_KERNEL_PACKAGE


def add_parser(commands) -> None:
    """Add ``image`` and its distributions to pykvm's subcommands."""
    kinds = add_group(
        commands, "image", "DISTRIBUTION",
        help="build a distribution root filesystem image (pykvm run --image)",
        description="Build a raw ext4 root filesystem image of a distribution with its own "
                    "tools, cached in ${PYKVM_CACHE:-~/.cache/pykvm}/images.")
    deb = kinds.add_parser(
        "debian", help="a minimal Debian (mmdebstrap --variant=minbase, mke2fs -d)",
        description="A minimal Debian made by mmdebstrap from the mirror in this machine's "
                    "apt sources, as an ext4 image made by mke2fs -d (no loop mounts). "
                    "Building needs root and takes a few minutes; the same request again is "
                    "a copy from the cache. Boot it with `pykvm run --image FILE`.")
    deb.add_argument("-o", "--output", type=Path, required=True, metavar="FILE",
                     help="the image to write (a sparse raw ext4 file system)")
    deb.add_argument("--suite", default=DEBIAN_DEFAULT_SUITE,
                     help=f"the Debian suite (default {DEBIAN_DEFAULT_SUITE})")
    deb.add_argument("--size", default="2G",
                     help="the file system's size, e.g. 2G, 512M (default 2G; sparse)")
    deb.add_argument("--packages", default="", metavar="A,B,...",
                     help="more packages to install (comma-separated)")
    deb.add_argument("--kernel", action="store_true",
                     help=f"install {DEBIAN_KERNEL_PACKAGE} and copy its vmlinuz and "
                          "initramfs beside FILE (FILE.vmlinuz, FILE.initrd.img: "
                          "pykvm run --image-kernel); slow to boot where guest ring 0 is "
                          "emulated")
    deb.add_argument("--force", action="store_true", help="replace FILE if it exists")
    deb.add_argument("--rebuild", action="store_true",
                     help="build anew even when cached (e.g. to pick up the mirror's updates)")
    deb.set_defaults(handler=cmd_debian)


def request_of(args):
    """The DebianImage the arguments ask for (debian.py imported only by this command)."""
    from ..machine import parse_size
    from . import debian

    return debian.DebianImage(suite=args.suite, size=parse_size(args.size),
                              packages=debian.parse_packages(args.packages),
                              kernel=args.kernel, mirror=debian.host_mirror())


def cmd_debian(args) -> int:
    from . import debian

    image = request_of(args)
    debian.check_target(args.output, args.force)     # before minutes of building
    say = lambda line: print(f"pykvm image: {line}", file=sys.stderr, flush=True)  # noqa: E731
    built = debian.build(image, rebuild=args.rebuild, say=say)
    for path in debian.export(built, args.output, force=args.force):
        say(f"wrote {path}")
    say(f"boot it: pykvm run --image {args.output} [-- CMD]")
    return 0
