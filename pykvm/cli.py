"""The `pykvm` command. Thin: it parses options into a MachineConfig, hands it
to the library, and turns typed errors into one-line messages and exit codes."""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import sys
import time
from pathlib import Path

from . import layout, sandbox
from .errors import PykvmError
from .guestimage import cli as guest_cli
from .distro import cli as image_cli
from .api.firecracker import cli as firecracker_cli
from .warm import cli as cache_cli

EXIT_USAGE = 2


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command_args = None
    if "--" in argv:
        split = argv.index("--")
        argv, command_args = argv[:split], argv[split + 1:]
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "handler"):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    args.command_args = command_args
    try:
        return args.handler(args)
    except PykvmError as error:
        print(f"pykvm: error: {first_line(error)}", file=sys.stderr)
        return exit_status(error)
    except KeyboardInterrupt:
        print("pykvm: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 141
    except Exception as error:  # a bug in pykvm: still one line, the traceback on request
        if os.environ.get("PYKVM_DEBUG"):
            raise
        print(f"pykvm: internal error: {type(error).__name__}: {first_line(error)} "
              "(set PYKVM_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1


def exit_status(error: PykvmError) -> int:
    """One convention (README, "exit statuses"): 2 when what the user handed pykvm is
    wrong (an option, the configuration, an image, a snapshot to restore, a --device
    that is not KVM), else the error's own status (1: pykvm or KVM failed)."""
    from .snapshot.state import SnapshotError

    if isinstance(error, SnapshotError):
        return EXIT_USAGE
    return error.exit_code


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


class VersionAction(argparse.Action):
    """--version, with pykvm.__version__ read only when asked (it costs start-up time)."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, help="show pykvm's version and exit")

    def __call__(self, parser, namespace, values, option_string=None):
        from . import __version__
        print(f"pykvm {__version__}")
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pykvm", description="A userspace virtual machine monitor in Python on top of KVM.")
    parser.add_argument("--version", action=VersionAction)
    commands = parser.add_subparsers(metavar="COMMAND")

    guest_cli.add_parser(commands)
    cache_cli.add_parser(commands)
    firecracker_cli.add_parser(commands)
    image_cli.add_parser(commands)
    check = commands.add_parser("check", help="say whether this host can run pykvm (like kvm-ok)")
    check.add_argument("--device", default="/dev/kvm", help="the KVM device (default /dev/kvm)")
    check.set_defaults(handler=cmd_check)

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
    devices = run.add_argument_group("devices (virtio over PCI)")
    devices.add_argument("--disk", action="append", default=[], metavar="PATH[,ro][,serial=ID]",
                         help="a virtio-blk disk backed by a raw image (repeatable; ro: read-only; "
                              "serial: the ID the guest reads)")
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
    output = run.add_argument_group("observing")
    output.add_argument("--stats", action="store_true",
                        help="print exit counts per reason, device and port, the time split, "
                             "and KVM's own in-kernel counters, at exit (stderr)")
    output.add_argument("-v", "--verbose", action="store_true",
                        help="with -- CMD: show the guest's boot log on stderr")
    add_observing_options(output)
    snapshots = run.add_argument_group("snapshots and control (pykvm/snapshot, pykvm/control.py)")
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

    ctl = commands.add_parser(
        "ctl", help="talk to a running pykvm through its --api-sock",
        usage="pykvm ctl SOCKET ACTION [ARGS]",
        description="Send one request to `pykvm run --api-sock SOCKET` and print the JSON "
                    "response. ACTION: status, pause, resume, snapshot DIR, stats, stop.")
    ctl.add_argument("socket", metavar="SOCKET", help="the path given to --api-sock")
    ctl.add_argument("words", nargs="+", metavar="ACTION [ARGS]", help="what to do")
    ctl.set_defaults(handler=cmd_ctl)

    stat = commands.add_parser(
        "stat", help="the --stats table of a running pykvm, live, through its --api-sock")
    stat.add_argument("socket", metavar="SOCKET", help="the path given to --api-sock")
    stat.add_argument("-i", "--interval", type=float, default=0,
                      help="print it again every SECONDS until interrupted")
    stat.set_defaults(handler=cmd_stat)

    run_in = commands.add_parser(
        "exec", help="run a command in a running guest (through its --api-sock and --agent)",
        usage="pykvm exec --api-sock SOCKET [options] -- CMD [ARGS...]",
        description="Run a command in the guest of `pykvm run --agent --api-sock SOCKET`. Its "
                    "stdout and stderr go to pykvm's own, and pykvm exits with its status "
                    "(128+N if signal N killed it, 127 if it was not found, 124 on --timeout). "
                    "One word after -- is a shell command line (/bin/sh -c); several are the "
                    "exact argv.")
    run_in.add_argument("--api-sock", required=True, metavar="SOCKET",
                        help="the path given to `pykvm run --api-sock`")
    run_in.add_argument("-t", "--timeout", type=float, metavar="SECONDS",
                        help="kill the command in the guest after SECONDS; exit 124")
    run_in.add_argument("-i", "--stdin", action="store_true",
                        help="send pykvm's stdin to the command (read to its end first; up "
                             "to 48 KiB: copy bigger input in with `pykvm cp`)")
    run_in.add_argument("-e", "--env", action="append", default=[], metavar="NAME=VALUE",
                        help="set an environment variable for the command (repeatable)")
    run_in.add_argument("-w", "--cwd", metavar="DIR", help="the working directory (default /)")
    run_in.set_defaults(handler=cmd_exec)

    copy = commands.add_parser(
        "cp", help="copy a file or directory into or out of a running guest",
        usage="pykvm cp --api-sock SOCKET SRC DST",
        description="Copy between this host and the guest of `pykvm run --agent --api-sock "
                    "SOCKET`. Guest paths are written guest:PATH, e.g. `pykvm cp --api-sock s "
                    "./dir guest:/root/dir` or `pykvm cp --api-sock s guest:/var/log/x .`. "
                    "Directories travel as tar streams (the guest's busybox tar).")
    copy.add_argument("--api-sock", required=True, metavar="SOCKET",
                      help="the path given to `pykvm run --api-sock`")
    copy.add_argument("source", metavar="SRC")
    copy.add_argument("destination", metavar="DST")
    copy.set_defaults(handler=cmd_cp)
    return parser


# --- pykvm check ---------------------------------------------------------------------------
KEY_CAPABILITIES = ("IRQCHIP", "PIT2", "USER_MEMORY", "IOEVENTFD", "IRQFD", "IRQ_ROUTING",
                    "SIGNAL_MSI", "IMMEDIATE_EXIT", "SET_TSS_ADDR", "MP_STATE", "VCPU_EVENTS",
                    "READONLY_MEM", "SET_GUEST_DEBUG", "BINARY_STATS_FD")
REQUIRED_CAPABILITIES = ("IRQCHIP", "PIT2", "USER_MEMORY", "IOEVENTFD", "IRQFD", "IMMEDIATE_EXIT")
HOST_KIND_TEXT = {
    "kvm_intel": "Intel VT-x",
    "kvm_amd": "AMD-V",
    "kvm_pvm": "PVM: KVM for nested use without VT-x/AMD-V (guest ring 0 is emulated)",
}


def cmd_check(args) -> int:
    from . import __version__
    from .kvm import Kvm
    from .quirks import for_host

    print(f"pykvm {__version__}")
    try:
        kvm = Kvm(args.device)
    except PykvmError as error:
        print(f"{args.device}: {error}")
        print("KVM acceleration can NOT be used")
        return 1
    with kvm:
        print(f"{args.device}: present, opened read/write")
        print(f"KVM API version: {kvm.api_version}")
        print(f"host kind: {kvm.host_kind} ({HOST_KIND_TEXT.get(kvm.host_kind, 'unknown module')})")
        caps = kvm.capabilities()
        print("capabilities: " + ", ".join(
            f"{name} {'yes' if caps.get(name) else 'no'}" for name in KEY_CAPABILITIES))
        print(f"vCPUs: {caps.get('NR_VCPUS', 0)} recommended, {caps.get('MAX_VCPUS', 0)} maximum; "
              f"memory slots: {caps.get('NR_MEMSLOTS', 0)}")
        missing = [name for name in REQUIRED_CAPABILITIES if not caps.get(name)]
        quirks = for_host(kvm.host_kind)
        if quirks.summary:
            print(f"quirks pykvm works around on this host ({quirks.name}):")
            for line in quirks.summary:
                print(f"  - {line}")
        else:
            print("quirks: none (hardware virtualization, everything native)")
        smoke = smoke_test(kvm)
        print(f"VM smoke test: {smoke or 'created a VM with 1 vCPU and ran it to its first exit'}")
    from .net.passt import user_networking_status
    why_not = user_networking_status()
    print("user networking (--net user, no root): "
          + ("available" if why_not is None else f"NOT available: {why_not}"))
    if missing or smoke:
        if missing:
            print(f"missing capabilities pykvm needs: {', '.join(missing)}")
        print("KVM acceleration can NOT be used")
        return 1
    print("KVM acceleration can be used")
    return 0


def smoke_test(kvm) -> str | None:
    """Create a VM, run one `out` instruction, and destroy it; None when all went well."""
    from .memory import GuestMemory
    from .vstate.vm import Vm
    from .boot.modes import set_mode

    class Probe:
        name = "probe"

        def __init__(self):
            self.value = None

        def write(self, offset, size, value):
            self.value = value
            vm.request_stop("exit", 0, "probe done")

        def read(self, offset, size):
            return 0

    try:
        with GuestMemory.anonymous(layout.MIN_MEM_SIZE + 0xF000) as memory, \
                Vm(kvm, memory) as vm:
            probe = Probe()
            vm.add_pio_device(0x80, 1, probe)
            memory.write(layout.FLAT_LOAD_ADDR, bytes([0xB0, 0x2A, 0xE6, 0x80, 0xF4]))  # mov al,42; out 0x80,al
            vm.create_vcpus(1)
            set_mode(vm.vcpus[0], memory, "real", layout.FLAT_LOAD_ADDR)
            stop = vm.run(timeout=10)
            if probe.value != 42:
                return f"the test guest did not reach its port write ({stop})"
    except PykvmError as error:
        return f"failed: {first_line(error)}"
    return None


# --- pykvm run -------------------------------------------------------------------------------
def cmd_run(args) -> int:
    from .machine import Machine, MachineConfig, default_linux_guest, parse_size
    if args.disk or args.image:   # virtio and networking: only for runs that use them
        from .devices.virtio import DiskSpec
    if args.image or args.image_kernel:
        from .distro.boot import apply_image
        apply_image(args)             # the image is /dev/vda, root= on the command line
    if args.net:
        from .net.plumbing import NetSpec

    sandbox.configure(enabled=not args.no_seccomp)
    if args.restore is not None:
        check_restore_options(args)
    elif args.trust_snapshot:
        from .errors import ConfigError
        raise ConfigError("--trust-snapshot goes with --restore DIR")
    if args.api_sock_group is not None:
        from .control import group_id
        from .errors import ConfigError
        if args.api_sock is None:
            raise ConfigError("--api-sock-group widens --api-sock: give --api-sock PATH too")
        group_id(args.api_sock_group)       # an unknown group is refused before the boot
    share_copies, live_shares = [], []
    if args.restore is not None:
        # a snapshot's shares are copies (a VM with a live one cannot be saved)
        share_copies = [str(Path(text.split(",")[0]).absolute()) for text in args.share]
    elif args.share or args.vhost_user_fs:
        from .devices.virtio.fs import FsSpec
        from .share import parse_shares
        share_copies, live_shares = parse_shares(
            args.share, warn=lambda line: print(line, file=sys.stderr))
        live_shares += [FsSpec.parse_socket(text) for text in args.vhost_user_fs]
    config = MachineConfig(mem_size=parse_size(args.mem), cpus=args.cpus, flat=args.flat,
                           entry=args.entry, kernel=args.kernel, initrd=args.initrd,
                           append=args.append, kvm_device=args.device, stats=args.stats,
                           verbose=args.verbose, extract_kernel=not args.no_extract,
                           disks=[DiskSpec.parse(text) for text in args.disk],
                           console=args.console, rng=args.rng,
                           nets=[NetSpec.parse(text) for text in args.net],
                           agent=args.agent or bool(share_copies),
                           shares=share_copies, live_shares=live_shares,
                           rootfs=str(Path(args.rootfs).resolve()) if args.rootfs else "",
                           workdir=os.getcwd() if args.rootfs else "")
    if args.command_args is not None:
        if args.flat:
            from .errors import ConfigError
            raise ConfigError("-- CMD runs a command in a Linux guest; it cannot go with --flat")
        config.command = guest_command_line(args.command_args)
    if config.flat is None and config.kernel is None and args.restore is None:
        config.kernel, default_initrd = default_linux_guest()
        config.initrd = config.initrd or default_initrd
    if config.command is not None and args.restore is None:
        from .warm.run import run_command     # the agent and the boot cache (pykvm/warm)
        status = run_command(args, config)
        if status is not None:
            return status
    progress = sys.stderr.isatty()
    started = time.monotonic()
    observers = Observers(args)
    # Until the stop handlers below are in place, SIGTERM unwinds like Ctrl-C does, so
    # what the machine set up on the host (TAPs, bridges) is released.
    signal.signal(signal.SIGTERM, _terminate_during_setup)
    try:
        if args.restore is not None:
            from .snapshot import restore_machine
            machine = restore_machine(
                args.restore, stdin=sys.stdin.buffer, tracer=observers.tracer,
                trust=args.trust_snapshot, kvm_device=args.device,
                disks=config.disks if args.disk else None,
                nets=config.nets if args.net else None,
                shares=config.shares if args.share else None)
            config = machine.config
            config.stats, config.verbose = args.stats, args.verbose
        else:
            machine = Machine(config, stdin=None if config.command is not None
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


RESTORE_CONFLICTS = (("kernel", None), ("initrd", None), ("append", ""), ("flat", None),
                     ("entry", "real"), ("no_extract", False), ("mem", "512M"), ("cpus", 1),
                     ("console", "serial"), ("rng", False), ("agent", False),
                     ("vhost_user_fs", []), ("rootfs", None))


def check_restore_options(args) -> None:
    """--restore takes the machine from the snapshot: options that would build another
    one are refused rather than ignored. --disk, --share and --net are the host side of
    the snapshot's devices (pykvm/snapshot/resources.py)."""
    from .errors import ConfigError

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
    from .control import ControlServer
    return ControlServer(path, machine, group=group)


# --- pykvm ctl ---------------------------------------------------------------------------------
def cmd_ctl(args) -> int:
    import json

    from .control import parse_command, request

    response = request(args.socket, parse_command(args.words))
    print(json.dumps(response, indent=1))
    return 0 if response.get("ok") else 1


def cmd_stat(args) -> int:
    """The --stats table of a running VM, through its control socket, once or every N s."""
    from .control import request
    from .observe.report import format_report
    from .observe.stats import from_answer

    while True:
        response = request(args.socket, {"action": "stats"})
        if not response.get("ok"):
            print(f"pykvm: error: {response.get('error', 'the VM did not answer')}",
                  file=sys.stderr)
            return 1
        stats = from_answer(response.get("vcpus"))
        print(format_report(stats, {"state": response.get("state", "?")}), flush=True)
        if not args.interval:
            return 0
        time.sleep(args.interval)


# --- pykvm exec and pykvm cp ------------------------------------------------------------------
GUEST_PREFIX = "guest:"
CONTROL_MARGIN = 120.0     # seconds the socket waits beyond a command's own timeout


def cmd_exec(args) -> int:
    import base64

    from .control import ControlError, request
    from .errors import ConfigError

    words = args.command_args
    if not words:
        raise ConfigError("pykvm exec: give the command after --")
    message: dict = {"action": "exec"}
    if len(words) == 1:
        message["command"] = words[0]
    else:
        message["argv"] = words
    if args.stdin:
        message["stdin"] = base64.b64encode(sys.stdin.buffer.read()).decode()
    if args.env:
        env = {}
        for item in args.env:
            name, equals, value = item.partition("=")
            if not name or not equals:
                raise ConfigError(f"--env {item!r}: use NAME=VALUE")
            env[name] = value
        message["env"] = env
    if args.cwd:
        message["cwd"] = args.cwd
    if args.timeout is not None:
        if args.timeout <= 0:
            raise ConfigError("--timeout must be a positive number of seconds")
        message["timeout"] = args.timeout
    wait = (args.timeout if args.timeout is not None else 7 * 86400.0) + CONTROL_MARGIN
    response = request(args.api_sock, message, timeout=wait)
    if not response.get("ok"):
        raise ControlError(response.get("error") or "the exec request failed")
    for stream, key in ((sys.stdout.buffer, "stdout"), (sys.stderr.buffer, "stderr")):
        stream.write(base64.b64decode(response.get(key) or ""))
        stream.flush()
    if response.get("timed_out"):
        print(f"pykvm: {response.get('error') or 'the command timed out'}", file=sys.stderr)
        return 124
    status = response.get("status")
    return status if isinstance(status, int) else 1


def cmd_cp(args) -> int:
    from .control import ControlError, request
    from .errors import ConfigError

    source, destination = args.source, args.destination
    into_guest = destination.startswith(GUEST_PREFIX)
    if into_guest == source.startswith(GUEST_PREFIX):
        raise ConfigError("pykvm cp: exactly one of SRC and DST is a guest:PATH")
    if into_guest:
        message = {"action": "copy_in", "host_path": os.path.abspath(source),
                   "guest_path": destination[len(GUEST_PREFIX):]}
    else:
        message = {"action": "copy_out", "guest_path": source[len(GUEST_PREFIX):],
                   "host_path": os.path.abspath(destination)}
    response = request(args.api_sock, message, timeout=3600 + CONTROL_MARGIN)
    if not response.get("ok"):
        raise ControlError(response.get("error") or "the copy failed")
    return 0


def add_observing_options(group) -> None:
    """--trace, --symbols, --stats-interval, --stats-plot, --gdb (pykvm/observe/, pykvm/gdb/)."""
    from .observe.trace_filter import FILTER_HELP

    group.add_argument("--trace", nargs="?", const="-", metavar="FILE",
                       help="one line per exit to pykvm (time, vCPU, reason, port/address, "
                            "size, value, device, time taken, the guest instruction and its "
                            "symbol) to FILE, or to stderr without one")
    group.add_argument("--trace-filter", action="append", metavar="TERMS",
                       help="only trace these exits (implies --trace). " + FILTER_HELP)
    group.add_argument("--symbols", metavar="FILE",
                       help="name guest addresses in the trace as func+0xoff: an ELF file "
                            "(vmlinux, a tutorial guest's .elf) or a System.map")
    group.add_argument("--stats-interval", type=float, metavar="SECONDS",
                       help="print the --stats table to stderr every SECONDS while the guest runs")
    group.add_argument("--stats-plot", metavar="FILE",
                       help="draw the statistics into FILE.svg or FILE.png at exit "
                            "(needs matplotlib: pip install 'pykvm[plot]')")
    group.add_argument("--gdb", metavar="PATH|tcp:PORT",
                       help="serve gdb on the Unix socket PATH (yours only); the VM starts "
                            "paused until gdb connects (gdb FILE.elf -ex 'target remote PATH')."
                            " tcp:PORT or HOST:PORT serve TCP instead, which any local user "
                            "can reach (a warning says so)")


class Observers:
    """What `pykvm run` attaches to a machine to watch it: pykvm.observe's wiring
    (tracer, KVM's counters, periodic stats, the plot) and the gdb stub. Released on
    every exit path."""

    def __init__(self, args):
        from .observe.wiring import Observation, ObserveOptions

        self.args = args
        self.stub = self.gdb = None
        if args.gdb is not None:
            from .gdb.listen import GdbAddress
            self.gdb = GdbAddress.parse(args.gdb)
        self.watch = Observation(ObserveOptions(
            trace=args.trace, trace_filter=tuple(args.trace_filter or ()), symbols=args.symbols,
            stats=args.stats, stats_interval=args.stats_interval, stats_plot=args.stats_plot))
        self.tracer = self.watch.tracer

    def attach(self, machine) -> None:
        self.watch.attach(machine.vm)
        if self.args.gdb is not None:
            from .gdb.stub import GdbStub
            self.stub = GdbStub(machine.vm, self.gdb)
            self.stub.attach()
            where = self.stub.address
            if where.tcp:
                print(f"pykvm: warning: the gdb stub on TCP {where.describe()} has no "
                      "authentication: any local user can take over the guest",
                      file=sys.stderr, flush=True)
            print(f"pykvm: the VM waits for gdb on {where.describe()} "
                  f"(gdb -ex 'target remote {where.gdb_target()}')", file=sys.stderr, flush=True)

    def finish(self) -> None:
        self.watch.finish()

    def plot(self, wall_s: float) -> None:
        path = self.watch.plot(wall_s)
        if path is not None:
            print(f"pykvm: statistics drawn in {path}", file=sys.stderr)

    def __enter__(self) -> "Observers":
        return self

    def __exit__(self, *exc) -> None:
        if self.stub is not None:
            self.stub.close()
        self.watch.close()


def format_mem(size: int) -> str:
    from .machine import format_size
    return format_size(size)


def milestones(progress) -> str:
    names = {layout.PROGRESS_INIT_STARTED: "init", layout.PROGRESS_COMMAND_STARTED: "command",
             layout.PROGRESS_SHELL_STARTED: "shell"}
    return ", ".join(f"{names.get(code, code)} {at:.3f}" for code, at in progress) or "none"


def guest_command_line(words: list[str]) -> str:
    """`-- uname -r` runs uname; a single word with spaces is a shell command line."""
    from .errors import ConfigError

    if not words:
        raise ConfigError("nothing after --: give the command to run in the guest")
    if len(words) == 1:
        return words[0]
    return shlex.join(words)


def _terminate_during_setup(signum, frame):
    raise SystemExit(128 + signum)


def install_stop_signals(machine) -> None:
    """SIGINT/SIGTERM stop the VM gracefully; a second SIGINT within a second forces it."""
    last_interrupt = [0.0]

    def on_signal(signum, frame):
        now = time.monotonic()
        if signum == signal.SIGINT and now - last_interrupt[0] < 1.0:
            machine.close()
            os._exit(130)
        last_interrupt[0] = now
        name = signal.Signals(signum).name
        machine.request_stop("signal", 128 + signum, f"stopped by {name}")

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)


def report_stop(stop, config) -> int:
    if stop is None:
        print("pykvm: error: the VM did not stop", file=sys.stderr)
        return 1
    if stop.kind in ("error", "crash"):
        print(f"pykvm: error: {stop.message}", file=sys.stderr)
        return stop.status or 1
    if stop.kind in ("poweroff", "halt") or (config.command is None and stop.kind != "exit"):
        # A guest that powers itself off (ACPI S5; without ACPI Linux halts with interrupts
        # off instead) has finished, with a command or without: status 0.
        print(f"pykvm: {stop.message}", file=sys.stderr)
    elif config.command is not None and stop.kind != "exit":
        print(f"pykvm: the guest stopped before the command finished: {stop.message}",
              file=sys.stderr)
        return stop.status or 1
    return stop.status
