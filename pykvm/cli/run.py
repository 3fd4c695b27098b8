"""`pykvm run`: boot a guest (a Linux kernel, the default guest, a flat binary, or a
snapshot) and run it until it stops; with ``-- CMD`` run one command in it.

The options become a :class:`~pykvm.machine.MachineConfig` (or a restore from
pykvm/snapshot); the machine, the observers (observers.py), the control socket
(pykvm/control/) and the stop signals (stop.py) are set up around one
``machine.run()``. A command run goes to pykvm/warm first, which restores a cached
boot when it can.
"""

from __future__ import annotations

import os
import shlex
import signal
import sys
import time
from pathlib import Path

from .. import layout, sandbox
from .observers import Observers, add_observing_options
from .stop import install_stop_signals, report_stop, terminate_during_setup


def add_parser(commands) -> None:
    run = commands.add_parser(
        "run", help="boot a guest",
        usage="pykvm run [options] [-- CMD [ARGS...]]",
        description="Boot a Linux kernel (default: the guest built by `make guest`) or a flat "
                    "binary. With `-- CMD`, run one command in the Linux guest, print its output "
                    "and exit with its status.")
    boot = run.add_argument_group("what to boot")
    boot.add_argument("-k", "--kernel", type=Path, help="Linux kernel: bzImage or ELF vmlinux")
    boot.add_argument("-i", "--initrd", type=Path, help="initramfs (cpio, optionally compressed)")
    boot.add_argument("-p", "--append", default="", help="extra kernel command line")
    boot.add_argument("--clock-slowdown", type=int, default=0, metavar="N",
                      help="the Linux guest's clock runs N times slower than real time, and "
                           "its timer ticks N times further apart (default 1; 10 for Debian's "
                           "kernels where guest ring 0 is emulated: docs/hosts.md)")
    boot.add_argument("--flat", type=Path, help="a flat binary loaded at 0x10000 (tutorial guests)")
    boot.add_argument("--entry", default="real", choices=("real", "protected", "long"),
                      help="CPU mode a --flat guest starts in (default real)")
    boot.add_argument("--cold", action="store_true",
                      help="with -- CMD: boot from scratch, neither restoring a cached boot "
                           "nor caching this one (pykvm cache list)")
    boot.add_argument("--no-extract", action="store_true",
                      help="enter a bzImage through its own decompressor instead of loading the "
                           "extracted vmlinux")
    machine = run.add_argument_group("the machine")
    machine.add_argument("-m", "--mem", default="512M",
                         help="guest RAM, e.g. 512M, 2G (a bare number is MiB; default 512M)")
    machine.add_argument("-c", "--cpus", type=int, default=1, help="vCPUs (default 1)")
    machine.add_argument("--device", default="/dev/kvm", help="the KVM device (default /dev/kvm)")
    machine.add_argument("--no-seccomp", action="store_true",
                         help="do not confine vCPU and device threads with seccomp filters "
                              "(pykvm/sandbox; a forbidden call otherwise ends pykvm with "
                              "status 159)")
    devices = run.add_argument_group("devices (virtio over PCI, or MMIO with --transport mmio)")
    devices.add_argument("--transport", choices=("pci", "mmio"), default="pci",
                         help="how the guest reaches its virtio devices: pci (default) or mmio "
                              "(virtio-mmio, announced on the kernel command line; the guest "
                              "gets pci=off, as under Firecracker)")
    devices.add_argument("--virtio-poll-us", type=int, default=32, metavar="US",
                         help="after serving a virtio queue, poll its ring this long at most "
                              "(adaptive, µs; 0: off) before sleeping (default 32)")
    devices.add_argument("--disk", action="append", default=[], metavar="PATH[,ro][,serial=ID]",
                         help="a virtio-blk disk (repeatable; ro: read-only; serial: the ID the "
                              "guest reads). A raw image is served by pykvm; a qcow2 image (by "
                              "content), or PATH,backend=vhost-user, by a qemu-storage-daemon "
                              "pykvm starts and stops; vhost-user=SOCKET[,ro] attaches a running "
                              "vhost-user-blk back end; format=raw|qcow2 skips the probe")
    devices.add_argument("--console", choices=("serial", "virtio"), default="serial",
                         help="the guest console: serial (ttyS0, default) or virtio (hvc0)")
    devices.add_argument("--rng", action="store_true",
                         help="a virtio-rng device fed from the host's random source")
    devices.add_argument("--agent", action="store_true",
                         help="the guest agent's channel (a virtio-serial port; the default "
                              "guest starts pykvm-agent on it): run commands and copy files "
                              "with `pykvm exec` / `pykvm cp` through --api-sock")
    devices.add_argument("--share", action="append", default=[], metavar="DIR[,ro][,tag=T]",
                         help="share the host directory DIR live at /mnt/share (then "
                              "/mnt/share1, ...) through virtio-fs and a virtiofsd pykvm "
                              "starts and stops; ro: read-only. DIR,copy: a read-only ext2 "
                              "copy instead (can be snapshotted; implies --agent)")
    devices.add_argument("--rootfs", metavar="DIR",
                         help="boot with the host directory DIR (e.g. /) as the guest's root "
                              "over virtio-fs, read-only under a tmpfs overlay; the current "
                              "directory is shared read-write at its own path and -- CMD runs "
                              "there")
    devices.add_argument("--image", metavar="FILE[,ro]",
                         help="boot the root filesystem image FILE (pykvm image debian) as "
                              "/dev/vda: the default guest's /init mounts it and runs the "
                              "command, shell or agent in it (ro: read-only, writes go to "
                              "nowhere but /tmp and /run)")
    devices.add_argument("--image-kernel", action="store_true",
                         help="with --image FILE: boot the image's own kernel and initramfs "
                              "(FILE.vmlinuz, FILE.initrd.img: pykvm image --kernel) instead "
                              "of pykvm's; minutes where guest ring 0 is emulated; no -- CMD")
    devices.add_argument("--vhost-user-fs", action="append", default=[],
                         metavar="SOCKET,tag=T",
                         help="a virtio-fs device served by a virtiofsd you started on SOCKET")
    devices.add_argument("--net", action="append", default=[],
                         metavar="user[,OPTS]|passt=SOCKET|tap[=NAME][,OPTS]",
                         help="a virtio-net NIC (repeatable). user[,mac=MAC][,fwd=tcp:H:G]..."
                              "[,map-gw=off]: no root needed, through a passt pykvm starts "
                              "(DHCP for the default guest; the gateway address reaches the "
                              "host's loopback; fwd: host port H to guest port G, tcp or udp); "
                              "passt=SOCKET: a passt you started. tap: on a TAP: NAME is created, or "
                              "attached if it exists (default: a new pykvmN); bridge: enslave "
                              "it to BR, created if missing; host-ip: the host's address on "
                              "BR (or on the TAP); netns: all of it inside namespace NS; mac: "
                              "the guest's (default: stable per machine and NIC). What pykvm "
                              "created or added is removed when it exits")
    devices.add_argument("--vsock", metavar="CID[,uds=PATH]",
                         help="a virtio-vsock device, the guest's CID (3 or more), its host "
                              "side Firecracker's: connect to PATH and write 'CONNECT PORT\\n' "
                              "to reach guest port PORT (answered 'OK LOCALPORT\\n'); the "
                              "guest reaching host port P connects to PATH_P. Without uds=, "
                              "PATH is in a private directory pykvm names on stderr")
    output = run.add_argument_group("observing")
    output.add_argument("--stats", action="store_true",
                        help="print exit counts per reason, device and port, the time split, "
                             "and KVM's own in-kernel counters, at exit (stderr)")
    output.add_argument("-v", "--verbose", action="store_true",
                        help="with -- CMD: show the guest's boot log on stderr")
    add_observing_options(output)
    snapshots = run.add_argument_group("snapshots and control (pykvm/snapshot, pykvm/control/)")
    snapshots.add_argument("--restore", type=Path, metavar="DIR",
                           help="resume the guest saved in the snapshot directory DIR (the "
                                "machine comes from the snapshot: no boot or device options). "
                                "Host resources are yours: --disk, --share, --net give one "
                                "per device of the snapshot, in its order, or the snapshot's "
                                "own are used with --trust-snapshot")
    snapshots.add_argument("--trust-snapshot", action="store_true",
                           help="with --restore: use the disk images, shared directories and "
                                "TAPs the snapshot names (only for a snapshot you took "
                                "yourself; a read-only disk stays read-only)")
    snapshots.add_argument("--api-sock", metavar="PATH",
                           help="serve JSON requests (pause, resume, snapshot, stop, status, "
                                "stats) on the Unix socket PATH; see `pykvm ctl`")
    snapshots.add_argument("--api-sock-group", metavar="GROUP",
                           help="let members of GROUP use the --api-sock too (the socket is "
                                "made 0660 and GROUP's); by default only your own uid and root")
    run.set_defaults(handler=cmd_run)


def cmd_run(args) -> int:
    from ..machine import MachineConfig, build_for_boot, default_linux_guest, parse_size
    if args.disk or args.image:   # virtio and networking: only for runs that use them
        from ..devices.virtio import DiskSpec
    if args.image or args.image_kernel:
        from ..distro.boot import apply_image
        apply_image(args)             # the image is /dev/vda, root= on the command line
    if args.net:
        from ..net.plumbing import NetSpec

    sandbox.configure(enabled=not args.no_seccomp)
    if args.restore is not None:
        check_restore_options(args)
    elif args.trust_snapshot:
        from ..errors import ConfigError
        raise ConfigError("--trust-snapshot goes with --restore DIR")
    if args.api_sock_group is not None:
        from ..control import group_id
        from ..errors import ConfigError
        if args.api_sock is None:
            raise ConfigError("--api-sock-group widens --api-sock: give --api-sock PATH too")
        group_id(args.api_sock_group)       # an unknown group is refused before the boot
    share_copies, live_shares = [], []
    if args.restore is not None:
        # a snapshot's shares are copies (a VM with a live one cannot be saved)
        share_copies = [str(Path(text.split(",")[0]).absolute()) for text in args.share]
    elif args.share or args.vhost_user_fs:
        from ..devices.virtio.fs import FsSpec
        from ..share import parse_shares
        share_copies, live_shares = parse_shares(
            args.share, warn=lambda line: print(line, file=sys.stderr))
        live_shares += [FsSpec.parse_socket(text) for text in args.vhost_user_fs]
    config = MachineConfig(mem_size=parse_size(args.mem), cpus=args.cpus, flat=args.flat,
                           entry=args.entry, kernel=args.kernel, initrd=args.initrd,
                           append=args.append, clock_slowdown=args.clock_slowdown,
                           kvm_device=args.device, stats=args.stats,
                           verbose=args.verbose, extract_kernel=not args.no_extract,
                           disks=[DiskSpec.parse(text) for text in args.disk],
                           console=args.console, rng=args.rng,
                           nets=[NetSpec.parse(text) for text in args.net],
                           agent=args.agent or bool(share_copies),
                           shares=share_copies, live_shares=live_shares,
                           rootfs=str(Path(args.rootfs).resolve()) if args.rootfs else "",
                           workdir=os.getcwd() if args.rootfs else "",
                           transport=args.transport, virtio_poll_us=args.virtio_poll_us)
    if args.vsock:
        from ..vsock import VsockSpec
        vsock = VsockSpec.parse(args.vsock)
        config.vsock_cid, config.vsock_uds = vsock.guest_cid, vsock.uds_path
    if args.command_args is not None:
        if args.flat:
            from ..errors import ConfigError
            raise ConfigError("-- CMD runs a command in a Linux guest; it cannot go with --flat")
        config.command = guest_command_line(args.command_args)
    if config.flat is None and config.kernel is None and args.restore is None:
        config.kernel, default_initrd = default_linux_guest()
        config.initrd = config.initrd or default_initrd
    elif config.command is not None and config.initrd is None and args.restore is None:
        from ..machine.boot import default_initramfs
        config.initrd = default_initramfs()     # its /init runs the command, any kernel's
    if config.command is not None and args.restore is None:
        from ..warm.run import run_command     # the agent and the boot cache (pykvm/warm)
        status = run_command(args, config)
        if status is not None:
            return status
    progress = sys.stderr.isatty()
    started = time.monotonic()
    observers = Observers(args)
    # Until the stop handlers below are in place, SIGTERM unwinds like Ctrl-C does, so
    # what the machine set up on the host (TAPs, bridges) is released.
    signal.signal(signal.SIGTERM, terminate_during_setup)
    try:
        if args.restore is not None:
            from ..snapshot import restore_machine
            machine = restore_machine(
                args.restore, stdin=sys.stdin.buffer, tracer=observers.tracer,
                trust=args.trust_snapshot, kvm_device=args.device,
                disks=config.disks if args.disk else None,
                nets=config.nets if args.net else None,
                shares=config.shares if args.share else None)
            config = machine.config
            config.stats, config.verbose = args.stats, args.verbose
        else:
            machine = build_for_boot(config, stdin=None if config.command is not None
                                     else sys.stdin.buffer, tracer=observers.tracer)
    except BaseException:
        observers.__exit__(None, None, None)
        raise
    with machine, observers, control_socket(args.api_sock, machine, args.api_sock_group):
        if args.api_sock:
            machine.vm.timing = True    # `pykvm stat` may ask for the time split live
        observers.attach(machine)
        if progress and machine.vm.quirks.summary:
            print(f"pykvm: host is {machine.kvm.host_kind}: "
                  f"{machine.vm.quirks.summary[0]}", file=sys.stderr)
        if progress and args.restore is not None:
            print(f"pykvm: resuming the guest saved in {args.restore}", file=sys.stderr)
        elif progress and config.kernel:
            print(f"pykvm: booting {config.kernel} with {format_mem(config.mem_size)}, "
                  f"{config.cpus} vCPU(s)...", file=sys.stderr)
        for nic in (machine.virtio.nets if progress and machine.virtio else []):
            print(f"pykvm: {nic.name}: {nic.describe()}", file=sys.stderr)
        if machine.vsock is not None and (progress or not config.vsock_uds):
            print(f"pykvm: virtio-vsock: guest CID {machine.vsock.guest_cid}, host socket "
                  f"{machine.vsock.uds_path}", file=sys.stderr)
        install_stop_signals(machine)
        stop = machine.run()
        observers.finish()
        if config.stats:
            sys.stderr.write(observers.watch.report({
                "boot milestones (s)": milestones(machine.progress),
                "wall time (s)": f"{time.monotonic() - started:.3f}",
            }) + "\n")
        observers.plot(time.monotonic() - started)
    return report_stop(stop, config)


RESTORE_CONFLICTS = (("kernel", None), ("initrd", None), ("append", ""), ("clock_slowdown", 0),
                     ("flat", None),
                     ("entry", "real"), ("no_extract", False), ("mem", "512M"), ("cpus", 1),
                     ("console", "serial"), ("rng", False), ("agent", False),
                     ("vhost_user_fs", []), ("rootfs", None), ("vsock", None))


def check_restore_options(args) -> None:
    """--restore takes the machine from the snapshot: options that would build another
    one are refused rather than ignored. --disk, --share and --net are the host side of
    the snapshot's devices (pykvm/snapshot/resources.py)."""
    from ..errors import ConfigError

    given = [f"--{name.replace('_', '-')}" for name, default in RESTORE_CONFLICTS
             if getattr(args, name, default) != default]
    if args.command_args is not None:
        given.append("-- CMD")
    if given:
        raise ConfigError(f"--restore takes the machine from the snapshot; drop {', '.join(given)}")


def control_socket(path, machine, group=None):
    """The --api-sock server for ``machine`` (a context manager), or nothing."""
    import contextlib

    if path is None:
        return contextlib.nullcontext()
    from ..control import ControlServer
    return ControlServer(path, machine, group=group)


def format_mem(size: int) -> str:
    from ..machine import format_size
    return format_size(size)


def milestones(progress) -> str:
    names = {layout.PROGRESS_INIT_STARTED: "init", layout.PROGRESS_COMMAND_STARTED: "command",
             layout.PROGRESS_SHELL_STARTED: "shell"}
    return ", ".join(f"{names.get(code, code)} {at:.3f}" for code, at in progress) or "none"


def guest_command_line(words: list[str]) -> str:
    """`-- uname -r` runs uname; a single word with spaces is a shell command line."""
    from ..errors import ConfigError

    if not words:
        raise ConfigError("nothing after --: give the command to run in the guest")
    if len(words) == 1:
        return words[0]
    return shlex.join(words)
