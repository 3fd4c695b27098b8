"""``pykvm image debian``: a raw ext4 image of a minimal Debian, made with Debian's tools.

How: ``mmdebstrap --variant=minbase`` (Debian's own bootstrapper, the package of that
name) installs the suite into a scratch directory, and ``mke2fs -t ext4 -d DIR`` (e2fsprogs)
turns that directory into a file system image: no loop mount, no mount at all. The
result is cached under ``${PYKVM_CACHE:-~/.cache/pykvm}/images/`` keyed by every input
(:meth:`DebianImage.key`), so a second request is a sparse copy of a finished image.

Where from: the mirror configured in this machine's apt sources (:func:`host_mirror`,
sources.list(5), both formats); with none, mmdebstrap's own default.

The kernel: ``--kernel`` installs Debian's ``linux-image-cloud-amd64`` (and its
initramfs-tools initramfs) in the image and copies both beside the output. Not the
default: ``pykvm run --image`` boots pykvm's own guest kernel, whose /init mounts the
image as root (pykvm/guestimage/init.c, ``root=``); a Debian kernel boots too
(``--image-kernel``) but takes minutes where guest ring 0 is emulated (docs/hosts.md).

Files are made safely (the project's rule for hostile local users): the output is
written to a fresh name made with O_CREAT|O_EXCL|O_NOFOLLOW in the output's directory
(opened without following a symlink) and renamed over the target; a symlink as the
target is refused, and an existing file is replaced only with ``--force``.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from ..errors import ConfigError, GuestBuildError
from . import DEBIAN_DEFAULT_SUITE, DEBIAN_KERNEL_PACKAGE

MiB = 1 << 20
GiB = 1 << 30
DEFAULT_SUITE = DEBIAN_DEFAULT_SUITE
DEFAULT_SIZE = 2 * GiB
MIN_SIZE = 256 * MiB        # minbase alone is ~150 MiB unpacked
MAX_SIZE = 1 << 40          # the image is sparse, but mke2fs still writes its metadata
KERNEL_PACKAGE = DEBIAN_KERNEL_PACKAGE
RECIPE_VERSION = 1          # bump when the recipe below changes what an image holds
ROOT_IMAGE, KERNEL, INITRD, MANIFEST = "root.img", "vmlinuz", "initrd.img", "manifest.json"
# Debian Policy 5.6.1 (package names) and the code names Debian uses for suites
PACKAGE_NAME = re.compile(r"[a-z0-9][a-z0-9+.-]+\Z")
SUITE_NAME = re.compile(r"[a-z][a-z0-9-]{0,31}\Z")
MAX_PACKAGES = 200
APT_SOURCES = (Path("/etc/apt/sources.list"), Path("/etc/apt/sources.list.d"))
# Inside the image: what the boot needs beyond minbase (the image's own kernel mounts
# / from fstab; a name for the prompt). $1 is the root directory (mmdebstrap(1), hooks).
CUSTOMIZE = ('printf "/dev/vda / ext4 defaults 0 1\\n" > "$1/etc/fstab"',
             'printf "pykvm\\n" > "$1/etc/hostname"')


@dataclass(frozen=True)
class DebianImage:
    """What to build: every field is part of the cache key."""

    suite: str = DEFAULT_SUITE
    size: int = DEFAULT_SIZE
    packages: tuple[str, ...] = ()
    kernel: bool = False           # install linux-image-cloud-amd64, copy it out
    mirror: str = ""               # "" : mmdebstrap's default

    def __post_init__(self) -> None:
        if not SUITE_NAME.match(self.suite):
            raise ConfigError(f"--suite {self.suite!r}: not a Debian suite name "
                              f"(e.g. bookworm, trixie)")
        if not MIN_SIZE <= self.size <= MAX_SIZE:
            raise ConfigError(f"--size {self.size}: must be between {MIN_SIZE // MiB} MiB "
                              f"and {MAX_SIZE // GiB} GiB")
        if len(self.packages) > MAX_PACKAGES:
            raise ConfigError(f"--packages: at most {MAX_PACKAGES} packages")
        for name in self.packages:
            if not PACKAGE_NAME.match(name):
                raise ConfigError(f"--packages: {name!r} is not a Debian package name")
        if self.mirror and (any(c.isspace() for c in self.mirror) or "://" not in self.mirror):
            raise ConfigError(f"mirror {self.mirror!r}: not a URI")

    def includes(self) -> list[str]:
        return sorted(set(self.packages) | ({KERNEL_PACKAGE} if self.kernel else set()))

    def key(self) -> str:
        """The cache key: the request, the recipe's version and mmdebstrap's (a new
        mmdebstrap may lay the tree out differently)."""
        text = json.dumps({"image": asdict(self), "recipe": RECIPE_VERSION,
                           "includes": self.includes(), "customize": CUSTOMIZE,
                           "mmdebstrap": tool_version()}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()

    def name(self) -> str:
        return f"debian-{self.suite}-{self.key()[:16]}"

    def mmdebstrap_command(self, target: Path) -> list[str]:
        command = ["mmdebstrap", "--variant=minbase", "--mode=root", "--format=directory"]
        if self.includes():
            command.append("--include=" + ",".join(self.includes()))
        command += [f"--customize-hook={hook}" for hook in CUSTOMIZE]
        command += [self.suite, str(target)]
        if self.mirror:
            command.append(self.mirror)
        return command


@dataclass(frozen=True)
class BuiltImage:
    """A finished image in the cache."""

    directory: Path

    @property
    def root(self) -> Path:
        return self.directory / ROOT_IMAGE

    @property
    def kernel(self) -> Path | None:
        path = self.directory / KERNEL
        return path if path.exists() else None

    @property
    def initrd(self) -> Path | None:
        path = self.directory / INITRD
        return path if path.exists() else None


def parse_packages(text: str) -> tuple[str, ...]:
    """--packages a,b,c (empty items ignored, duplicates removed, sorted: the key
    must not depend on the order they were typed in)."""
    return tuple(sorted({word.strip() for word in text.split(",") if word.strip()}))


def host_mirror(sources=APT_SOURCES) -> str:
    """The first Debian archive URI in this machine's apt sources (sources.list(5): the
    one-line ``deb URI SUITE ...`` form and deb822 ``.sources`` stanzas), skipping the
    security archive (it carries only updates); "" when there is none."""
    files: list[Path] = []
    for path in sources:
        if path.is_dir():
            files += sorted(p for p in path.iterdir()
                            if p.suffix in (".list", ".sources") and p.is_file())
        elif path.is_file():
            files.append(path)
    for path in files:
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        for uri in _deb_uris(text, deb822=path.suffix == ".sources"):
            if "security" not in uri and "://" in uri:
                return uri
    return ""


def _deb_uris(text: str, deb822: bool) -> list[str]:
    uris = []
    if deb822:
        for stanza in re.split(r"\n\s*\n", text):
            fields = {}
            for line in stanza.splitlines():
                if line.startswith("#") or ":" not in line or line[:1].isspace():
                    continue
                name, _, value = line.partition(":")
                fields[name.strip().lower()] = value.split()
            if "deb" in fields.get("types", []) and \
                    fields.get("enabled", ["yes"])[0].lower() != "no":
                uris += fields.get("uris", [])
        return uris
    for line in text.splitlines():
        words = re.sub(r"\[[^]]*\]", "", line.split("#", 1)[0]).split()
        if len(words) >= 3 and words[0] == "deb":
            uris.append(words[1])
    return uris


def tool_version() -> str:
    try:
        result = subprocess.run(["mmdebstrap", "--version"], capture_output=True, text=True,
                                timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise GuestBuildError(f"mmdebstrap is not available ({error}): "
                              "apt-get install mmdebstrap") from None
    return result.stdout.strip()


def cache_root() -> Path:
    base = os.environ.get("PYKVM_CACHE") or str(Path.home() / ".cache" / "pykvm")
    return Path(base) / "images"


def find(image: DebianImage, root: Path | None = None) -> BuiltImage | None:
    directory = (root or cache_root()) / image.name()
    return BuiltImage(directory) if (directory / MANIFEST).is_file() else None


def build(image: DebianImage, *, root: Path | None = None, rebuild: bool = False,
          say: Callable[[str], None] = lambda line: None) -> BuiltImage:
    """The image for ``image``, from the cache or built now (one builder per key at a
    time: a second one waits on the lock, then finds the first one's result)."""
    root = root or cache_root()
    found = find(image, root)
    if found is not None and not rebuild:
        say(f"cached: {found.root}")
        return found
    if os.geteuid() != 0:
        raise GuestBuildError("building an image needs root (mmdebstrap --mode=root makes "
                              "the tree's owners and device nodes as they must be)")
    root.mkdir(parents=True, exist_ok=True)
    lock_fd = os.open(root / f".{image.name()}.lock",
                      os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        found = find(image, root)
        if found is not None and not rebuild:
            say(f"cached: {found.root}")
            return found
        scratch = Path(tempfile.mkdtemp(prefix=".build-", dir=root))
        try:
            _build_into(image, scratch, say)
            final = root / image.name()
            if final.exists():
                shutil.rmtree(final)
            os.rename(scratch, final)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        return BuiltImage(final)
    finally:
        os.close(lock_fd)


def _build_into(image: DebianImage, scratch: Path, say: Callable[[str], None]) -> None:
    tree = scratch / "tree"
    what = f"{image.suite} (minbase" + (f", +{len(image.includes())} packages" if
                                         image.includes() else "") + ")"
    say(f"[1/3] mmdebstrap {what} from {image.mirror or 'the default mirror'}: "
        "a few minutes")
    _run(image.mmdebstrap_command(tree), "mmdebstrap")
    if image.kernel:
        say("[2/3] copying out the image's kernel and initramfs")
        _copy_boot_files(tree, scratch)
    else:
        say("[2/3] no kernel in the image (pykvm run --image boots pykvm's own)")
    say(f"[3/3] mke2fs -t ext4 -d: {image.size // MiB} MiB, sparse")
    _run(["mke2fs", "-q", "-F", "-t", "ext4", "-L", "pykvm-root", "-d", str(tree),
          str(scratch / ROOT_IMAGE), f"{image.size // 1024}k"], "mke2fs")
    shutil.rmtree(tree)
    manifest = {"image": asdict(image), "key": image.key(), "recipe": RECIPE_VERSION}
    (scratch / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")


def _run(command: list[str], what: str) -> None:
    """Run a build step with its output on our stderr (its own progress lines)."""
    try:
        result = subprocess.run(command, stdin=subprocess.DEVNULL, check=False)
    except OSError as error:
        raise GuestBuildError(f"cannot run {what}: {error}") from None
    if result.returncode != 0:
        raise GuestBuildError(f"{what} failed with status {result.returncode} "
                              f"(its messages are above)")


def _copy_boot_files(tree: Path, scratch: Path) -> None:
    boot = tree / "boot"
    for prefix, name in (("vmlinuz-", KERNEL), ("initrd.img-", INITRD)):
        found = sorted(p for p in boot.iterdir() if p.name.startswith(prefix)
                       and not p.is_symlink() and p.is_file())
        if not found:
            raise GuestBuildError(f"the image has no /boot/{prefix}*: "
                                  f"did {KERNEL_PACKAGE} install?")
        shutil.copyfile(found[-1], scratch / name)


def beside(output: Path) -> tuple[Path, Path]:
    """Where ``pykvm image`` puts the kernel and initramfs for image ``output``:
    root.img -> root.vmlinuz, root.initrd.img (``pykvm run --image-kernel`` looks there)."""
    return output.with_suffix("." + KERNEL), output.with_suffix("." + INITRD)


def export(built: BuiltImage, output: Path, force: bool = False) -> list[Path]:
    """Copy the image (sparsely) and, if it has them, its kernel and initramfs to
    ``output`` and beside it; returns what was written."""
    pairs = [(built.root, output)]
    kernel_path, initrd_path = beside(output)
    if built.kernel and built.initrd:
        pairs += [(built.kernel, kernel_path), (built.initrd, initrd_path)]
    for _, target in pairs:
        check_target(target, force)
    for source, target in pairs:
        write_copy(source, target)
    return [target for _, target in pairs]


def check_target(target: Path, force: bool) -> None:
    try:
        info = os.lstat(target)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(info.st_mode):
        raise ConfigError(f"{target} is a symbolic link: refusing to write through it")
    if not stat.S_ISREG(info.st_mode):
        raise ConfigError(f"{target} exists and is not a regular file")
    if not force:
        raise ConfigError(f"{target} exists (use --force to replace it)")


def write_copy(source: Path, target: Path) -> None:
    """Copy ``source`` to ``target`` under a fresh temporary name in target's directory
    (O_EXCL|O_NOFOLLOW relative to a directory fd opened with O_NOFOLLOW), then rename
    (which replaces a name, never follows it): a reader never sees half an image."""
    directory = target.parent
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    temporary = None
    try:
        src_fd = os.open(source, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            for attempt in range(100):
                name = f".{target.name}.{os.getpid()}.{attempt}.tmp"
                try:
                    dst_fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                                     | os.O_CLOEXEC, 0o644, dir_fd=dir_fd)
                except FileExistsError:
                    continue
                temporary = name
                break
            else:
                raise ConfigError(f"cannot make a temporary file in {directory}")
            try:
                sparse_copy(src_fd, dst_fd)
                os.fsync(dst_fd)
            finally:
                os.close(dst_fd)
        finally:
            os.close(src_fd)
        os.rename(temporary, target.name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        temporary = None
    finally:
        if temporary is not None:
            try:
                os.unlink(temporary, dir_fd=dir_fd)
            except OSError:
                pass
        os.close(dir_fd)


def sparse_copy(src_fd: int, dst_fd: int, chunk: int = 8 * MiB) -> None:
    """Copy the data extents only (lseek SEEK_DATA/SEEK_HOLE), so a 2 GiB image with
    200 MiB in it costs 200 MiB of disk and time."""
    size = os.fstat(src_fd).st_size
    offset = 0
    while offset < size:
        try:
            offset = os.lseek(src_fd, offset, os.SEEK_DATA)
        except OSError:         # ENXIO: only a hole is left
            break
        end = os.lseek(src_fd, offset, os.SEEK_HOLE)
        while offset < end:
            length = min(chunk, end - offset)
            data = os.pread(src_fd, length, offset)
            if not data:
                break
            os.pwrite(dst_fd, data, offset)
            offset += len(data)
    os.ftruncate(dst_fd, size)
