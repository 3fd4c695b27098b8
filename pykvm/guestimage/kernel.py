"""The default guest's kernel: Debian's linux-source, configured as ``tinyconfig``
plus kernel.fragment, built out of tree, checked, and cached under a key of its own.

The kernel key covers the fragment, the source package's version, the make
environment and the source of the functions below that configure, build and check
the kernel (:func:`kernel_key`), so a change to init.c, agent.c or the initramfs
recipe never costs a kernel build. ``--kernel-source`` stands a tree or a tarball
in for the package (:func:`custom_source`).
"""

from __future__ import annotations

import hashlib
import inspect
import os
import shutil
import struct
import tarfile
import tempfile
from pathlib import Path

from ..errors import GuestBuildError
from ..layout import KERNEL_LOAD_ADDR
from .host import SOURCE_PACKAGE, BuildFailed, progress, run

HERE = Path(__file__).resolve().parent
FRAGMENT = HERE / "kernel.fragment"
KERNEL_FILES = (("arch/x86/boot/bzImage", "bzImage"), ("vmlinux", "vmlinux"),
                ("System.map", "System.map"), (".config", "config"))
SOURCE_TARBALL = Path("/usr/src/linux-source-6.1.tar.xz")
# --kernel-source: the source's version in the key reads "custom-<digest>"
CUSTOM_SOURCE_PREFIX = "custom-"

# Fixed build stamps so that `uname -v` and the image bytes do not depend on when or where.
KERNEL_MAKE_ENV = {
    "ARCH": "x86_64",
    "KBUILD_BUILD_TIMESTAMP": "2024-01-01 00:00:00 UTC",
    "KBUILD_BUILD_USER": "pykvm",
    "KBUILD_BUILD_HOST": "pykvm",
    "KBUILD_BUILD_VERSION": "1",
}


def kernel_key(versions: dict[str, str]) -> str:
    """What the kernel alone depends on: the fragment, the source package's version and
    the code below that configures, builds and checks it (not init.c, agent.c or the
    initramfs code: changing those must not cost a kernel build)."""
    digest = hashlib.sha256(FRAGMENT.read_bytes() + b"\0")
    digest.update(f"{SOURCE_PACKAGE}={versions[SOURCE_PACKAGE]}\0".encode())
    digest.update(repr(sorted(KERNEL_MAKE_ENV.items())).encode() + repr(KERNEL_FILES).encode())
    for function in (source_tree, parse_config, missing_options, configure_kernel, build_kernel,
                     check_vmlinux, kernel_or_build):
        digest.update(inspect.getsource(function).encode())
    return digest.hexdigest()


def source_tree(root: Path, version: str) -> Path:
    """Debian's kernel source, extracted once per package version."""
    tree = root / "src" / f"{SOURCE_PACKAGE}_{version}"
    if (tree / "Makefile").exists():
        return tree
    progress(f"extracting {SOURCE_TARBALL} (once per version, about a minute)")
    tree.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=tree.parent) as scratch:
        run(["tar", "-xf", str(SOURCE_TARBALL), "-C", scratch])
        (Path(scratch) / SOURCE_PACKAGE).rename(tree)
    return tree


def parse_config(text: str) -> dict[str, str]:
    """CONFIG_X -> value; '# CONFIG_X is not set' reads as 'n'."""
    values = {}
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("CONFIG_") and "=" in line:
            name, _, value = line.partition("=")
            values[name] = value
        elif line.startswith("# CONFIG_") and line.endswith(" is not set"):
            values[line[2:-len(" is not set")]] = "n"
    return values


def missing_options(fragment: str, config: str) -> list[str]:
    """Every fragment setting that the final .config does not have."""
    final = parse_config(config)
    return [f"{name}: wanted {wanted}, got {final.get(name, 'n (absent)')}"
            for name, wanted in parse_config(fragment).items()
            if final.get(name, "n") != wanted]


def configure_kernel(src: Path, build: Path, log: Path) -> None:
    progress("configuring: tinyconfig + kernel.fragment (allnoconfig merge)")
    make = ["make", "-C", str(src), f"O={build}"]
    run([*make, "tinyconfig"], log=log, env=KERNEL_MAKE_ENV)
    # -n: symbols neither tinyconfig nor the fragment name stay off, instead of
    # taking Kconfig defaults that would pull in drivers nobody asked for.
    run([str(src / "scripts/kconfig/merge_config.sh"), "-n", "-O", str(build),
         str(build / ".config"), str(FRAGMENT)], cwd=src, log=log, env=KERNEL_MAKE_ENV)
    run([*make, "olddefconfig"], log=log, env=KERNEL_MAKE_ENV)
    missing = missing_options(FRAGMENT.read_text(), (build / ".config").read_text())
    if missing:
        raise BuildFailed("kernel.fragment options lost in the final .config "
                          "(an unmet dependency?):\n  " + "\n  ".join(missing))


def build_kernel(src: Path, build: Path, log: Path) -> str:
    progress(f"building bzImage with make -j{os.cpu_count()} (about 3.5 min from scratch; "
             f"log: {log})")
    run(["make", "-C", str(src), f"O={build}", f"-j{os.cpu_count()}", "bzImage"],
        log=log, env=KERNEL_MAKE_ENV)
    return run(["make", "-s", "-C", str(src), f"O={build}", "kernelrelease"],
               env=KERNEL_MAKE_ENV).strip()


def check_vmlinux(path: Path) -> None:
    """An x86-64 ELF whose entry and first segment sit where pykvm loads a vmlinux."""
    with open(path, "rb") as f:
        header = f.read(64)
        if header[:4] != b"\x7fELF" or header[4] != 2:
            raise BuildFailed(f"{path} is not an ELF64 file")
        machine, = struct.unpack_from("<H", header, 18)
        entry, phoff = struct.unpack_from("<QQ", header, 24)
        phentsize, phnum = struct.unpack_from("<HH", header, 54)
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    loads = [struct.unpack_from("<IIQQQ", table, i * phentsize)
             for i in range(phnum)]
    load_paddrs = [paddr for ptype, _, _, _, paddr in loads if ptype == 1]  # PT_LOAD
    if not load_paddrs:
        raise BuildFailed(f"{path} has no loadable segment")
    if machine != 62 or entry != KERNEL_LOAD_ADDR or min(load_paddrs) != KERNEL_LOAD_ADDR:
        raise BuildFailed(f"{path}: machine {machine}, entry {entry:#x}, first PT_LOAD at "
                          f"{min(load_paddrs):#x}; wanted x86-64 at {KERNEL_LOAD_ADDR:#x}")


def kernel_or_build(root: Path, versions: dict[str, str]) -> tuple[Path, str]:
    """The kernel cache directory for the current kernel key (built first if missing)
    and the kernel release. Holds bzImage, vmlinux, System.map, config, release."""
    kernel = root / f"kernel-{kernel_key(versions)[:16]}"
    if (kernel / "release").exists():
        progress(f"kernel cached in {kernel.name}: only the initramfs is built")
        return kernel, (kernel / "release").read_text().strip()
    source_version = versions[SOURCE_PACKAGE]
    src = source_tree(root, source_version)
    kernel_build = root / "build" / f"{SOURCE_PACKAGE}_{source_version}"
    kernel_build.mkdir(parents=True, exist_ok=True)
    log = kernel_build / "build.log"
    log.write_text("")
    configure_kernel(src, kernel_build, log)
    release = build_kernel(src, kernel_build, log)
    check_vmlinux(kernel_build / "vmlinux")
    with tempfile.TemporaryDirectory(dir=root, prefix=".kernel-") as scratch:
        staging = Path(scratch) / "kernel"
        staging.mkdir()
        for name, target in KERNEL_FILES:
            shutil.copyfile(kernel_build / name, staging / target)
        (staging / "release").write_text(release + "\n")
        staging.rename(kernel)
    return kernel, release


def custom_source(root: Path, source: Path) -> str:
    """Make ``--kernel-source`` (a Linux source tree, or a tarball of one) the tree that
    source_tree() finds, and return the version that stands for it in the keys:
    ``custom-`` and a digest of the tarball's bytes, or of a tree's path and top Makefile
    (a tree's other files are not read: after changing them, build with --force)."""
    source = source.expanduser().resolve()
    digest = hashlib.sha256()
    if source.is_dir():
        if not (source / "Makefile").is_file():
            raise GuestBuildError(f"{source}: not a Linux source tree (no Makefile)")
        digest.update(str(source).encode() + b"\0" + (source / "Makefile").read_bytes())
    elif source.is_file():
        with open(source, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    else:
        raise GuestBuildError(f"{source}: no such kernel source (a directory or a tarball)")
    version = CUSTOM_SOURCE_PREFIX + digest.hexdigest()[:16]
    tree = root / "src" / f"{SOURCE_PACKAGE}_{version}"
    if (tree / "Makefile").exists():
        return version
    tree.parent.mkdir(parents=True, exist_ok=True)
    if source.is_dir():
        tree.unlink(missing_ok=True)
        tree.symlink_to(source)         # built out of tree: the source is only read
        return version
    if not tarfile.is_tarfile(source):
        raise GuestBuildError(f"{source}: not a tar archive of a Linux source tree")
    progress(f"extracting {source}")
    with tempfile.TemporaryDirectory(dir=tree.parent) as scratch:
        run(["tar", "-xf", str(source), "-C", scratch])
        tops = [p for p in Path(scratch).iterdir() if (p / "Makefile").is_file()]
        if len(tops) != 1:
            raise GuestBuildError(f"{source}: wanted one top-level directory with a Makefile, "
                                  f"found {len(tops)}")
        tops[0].rename(tree)
    return version
