"""The microVM behind Firecracker's API: resources accumulated before the start, a
pykvm Machine after it, and Firecracker's states "Not started" -> "Running" <-> "Paused".

As in Firecracker (``rpc_interface.rs``: ``PrebootApiController`` then
``RuntimeApiController``), a request is valid in one phase only: configuring the
machine, its boot source, drives, NICs, logger and metrics, InstanceStart and
snapshot load before the start; PATCH /vm, snapshot create, PATCH of a drive or NIC
and SendCtrlAltDel after it. A request in the wrong phase is refused with
Firecracker's own fault message.

The machine is built (InstanceStart, snapshot load) and run on the process's main
thread (:meth:`Vmm.serve_main`): the API server's threads run under the sandbox's
``control`` role, and a vCPU thread inherits its creator's filter. Requests are
served one at a time (``_lock``), as Firecracker's single API thread serves them.
Beside it: the machine's resources (machine_resources.py), Firecracker's snapshot
files (snapshot_file.py), ``--config-file`` (config_file.py).
"""

from __future__ import annotations

import concurrent.futures
import os
import queue
import shutil
import threading
from pathlib import Path

from ... import layout
from ...errors import PykvmError
from . import APP_NAME, FIRECRACKER_API_VERSION
from . import rate_limits
from .balloon import BalloonApi
from .mmds import MmdsApi
from .entropy import EntropyApi
from .vsock import VsockApi
from .logs import Log, MetricsSink
from .machine_resources import MachineResources
from .resources import (DEFAULT_MACHINE, ApiFault, BootSource, Drive, InstanceActionInfo,
                        Logger, MachineConfiguration, Metrics, NetworkInterface,
                        SnapshotCreateParams, SnapshotLoadParams, VmState)
from .snapshot_file import move_file, network_overrides, unwrap_state, workdir_beside, wrap_state

NOT_STARTED, RUNNING, PAUSED = "Not started", "Running", "Paused"
AFTER_START = "The requested operation is not supported after starting the microVM."
BEFORE_START = "The requested operation is not supported before starting the microVM."
METRICS_INTERVAL = 60.0       # seconds between unasked metrics lines (Firecracker's too)
# Firecracker's devices are virtio-mmio, announced on the kernel command line, so its
# users' command lines say pci=off (firectl, Kata): pykvm's are too here, by default.
TRANSPORT = "mmio"
I8042_WORDS = ("i8042.noaux", "i8042.nomux", "i8042.nopnp", "i8042.dumbkbd")


class Vmm(MachineResources):
    """One microVM. ``log`` is the VMM's :class:`~.logs.Log`; ``stdin``/``stdout`` the
    serial console's host side (Firecracker's own stdin and stdout)."""

    def __init__(self, instance_id: str, log: Log, *, kvm_device: str = "/dev/kvm",
                 stdin=None, stdout=None):
        self.instance_id = instance_id
        self.log = log
        self.kvm_device = kvm_device
        self.stdin, self.stdout = stdin, stdout
        self.machine_config = DEFAULT_MACHINE
        self.boot_source: BootSource | None = None
        self.drives: dict[str, Drive] = {}
        self.nets: dict[str, NetworkInterface] = {}
        self.logger: Logger | None = None
        self.metrics_config: Metrics | None = None
        self.metrics: MetricsSink | None = None
        self.machine = None
        self.balloon = BalloonApi(self)       # /balloon, /balloon/statistics (balloon.py)
        self.entropy = EntropyApi(self)       # /entropy (entropy.py)
        self.vsock = VsockApi(self)           # /vsock (vsock.py)
        self.mmds = MmdsApi(self)             # /mmds, /mmds/config (mmds.py)
        self._lock = threading.RLock()
        self._tasks: queue.Queue = queue.Queue()
        self._ended = threading.Event()

    # --- state ----------------------------------------------------------------------------------
    @property
    def state(self) -> str:
        if self.machine is None:
            return NOT_STARTED
        return PAUSED if self.machine.vm.state.value == "paused" else RUNNING

    def _before_start(self) -> None:
        if self.machine is not None:
            raise ApiFault(AFTER_START)

    def _after_start(self):
        if self.machine is None:
            raise ApiFault(BEFORE_START)
        if self.machine.vm.stop_requested:
            raise ApiFault("The microVM is stopping.")
        return self.machine

    # --- GET -------------------------------------------------------------------------------------
    def instance_info(self) -> dict:
        return {"app_name": APP_NAME, "id": self.instance_id, "state": self.state,
                "vmm_version": FIRECRACKER_API_VERSION}

    def vm_config(self) -> dict:
        """GET /vm/config: everything configured, Firecracker's FullVmConfiguration."""
        with self._lock:
            return {"balloon": self.balloon.to_json(),
                    "drives": [drive.to_json() for drive in self._ordered_drives()],
                    "boot-source": self.boot_source.to_json() if self.boot_source else None,
                    "cpu-config": None,
                    "logger": self.logger.to_json() if self.logger else None,
                    "machine-config": self.machine_config.to_json(),
                    "metrics": self.metrics_config.to_json() if self.metrics_config else None,
                    "mmds-config": self.mmds.to_json(),
                    "network-interfaces": [nic.to_json() for nic in self.nets.values()],
                    "vsock": self.vsock.to_json(), "entropy": self.entropy.to_json()}

    def put_logger(self, body) -> None:
        record = Logger.from_json(body)
        with self._lock:
            self._before_start()
            self.log.configure(record.log_path, record.level, record.show_level,
                               record.show_log_origin)
            self.logger = record

    def put_metrics(self, body) -> None:
        record = Metrics.from_json(body)
        with self._lock:
            self._before_start()
            if self.metrics is not None:
                raise ApiFault("Reinitialization of metrics not allowed.")
            self.metrics = MetricsSink(record.metrics_path)
            self.metrics_config = record
            threading.Thread(target=self._flush_periodically, name="fc_metrics",
                             daemon=True).start()

    def _flush_periodically(self) -> None:
        """Firecracker writes a metrics line every METRICS_INTERVAL seconds, unasked."""
        while not self._ended.wait(METRICS_INTERVAL):
            with self._lock:
                if self.metrics is not None:
                    self.flush_metrics()

    # --- actions --------------------------------------------------------------------------------
    def action(self, body) -> None:
        kind = InstanceActionInfo.from_json(body).action_type
        with self._lock:
            if kind == "InstanceStart":
                self._before_start()
                self._on_main(self._start)
                self.log.info("InstanceStart: the microVM runs")
            elif kind == "FlushMetrics":
                self.flush_metrics()
            else:       # SendCtrlAltDel: the keys, through the i8042 (devices/ps2_keyboard.py)
                from ...devices.ps2_keyboard import CTRL_ALT_DEL
                if not self._after_start().i8042.press_keys(CTRL_ALT_DEL):
                    raise ApiFault("Failed to send CTRL+ALT+DEL: the guest's keyboard is not "
                                   "taking keys (its driver disabled scanning, or the "
                                   "previous keys are still unread)")
                self.log.info("SendCtrlAltDel: the keys were pressed")

    def flush_metrics(self) -> None:
        if self.metrics is None:
            raise ApiFault("Failed to write metrics: the metrics system is not initialized "
                           "(PUT /metrics first)")
        extra = {"vmm": {"state": self.state}}
        if self.machine is not None:
            extra["vcpu"] = {f"vcpu{v.id}": sum(v.stats.as_dict()["exits"].values())
                             for v in self.machine.vm.vcpus}
        self.metrics.flush(extra)

    def patch_vm(self, body) -> None:
        wanted = VmState.from_json(body).state
        with self._lock:
            vm = self._after_start().vm
            if wanted == "Paused":
                vm.pause()
                self.log.info("The microVM is paused")
            else:
                vm.resume()
                self.log.info("The microVM is resumed")

    # --- snapshots: Firecracker's two files over pykvm's directory ----------------------------------
    def snapshot_create(self, body) -> None:
        """state.json and memory.bin are written into a private directory beside
        ``mem_file_path`` (pykvm/snapshot: O_EXCL, O_NOFOLLOW), then renamed onto the two
        paths the caller named; the caller is the host user, whose files they are."""
        from ...snapshot import MEMORY_FILE, STATE_FILE, save_snapshot
        params = SnapshotCreateParams.from_json(body)
        with self._lock:
            machine = self._after_start()
            if self.state != PAUSED:
                raise ApiFault("Create snapshot error: the microVM must be paused first "
                               "(PATCH /vm {\"state\": \"Paused\"})")
            workdir = workdir_beside(params.mem_file_path, "Create snapshot error")
            try:
                save_snapshot(machine, workdir)
                interfaces = [(n.iface_id, n.host_dev_name) for n in self.nets.values()]
                wrap_state(workdir / STATE_FILE, interfaces)
                os.replace(workdir / MEMORY_FILE, params.mem_file_path)
                move_file(workdir / STATE_FILE, params.snapshot_path)
            except (OSError, PykvmError) as error:
                raise ApiFault(f"Create snapshot error: {_text(error)}") from None
            finally:
                shutil.rmtree(workdir, ignore_errors=True)
            self.log.info(f"Snapshot of the microVM written to {params.snapshot_path} and "
                          f"{params.mem_file_path}")

    def snapshot_load(self, body) -> None:
        params = SnapshotLoadParams.from_json(body)
        with self._lock:
            self._before_start()
            if self.boot_source or self.drives or self.nets or self.vsock.config or \
                    self.machine_config != DEFAULT_MACHINE:
                raise ApiFault("Loading a microVM snapshot not allowed after configuring "
                               "boot-specific resources.")
            self._on_main(lambda: self._load(params))

    def _load(self, params: SnapshotLoadParams) -> None:
        """On the main thread: the two files linked into a private directory as pykvm's
        snapshot layout, restored (host resources the snapshot's: the caller trusts
        the files it names, as Firecracker does), the directory removed."""
        from ...snapshot import MEMORY_FILE, STATE_FILE, restore_machine
        memory = os.path.realpath(params.memory_path)
        workdir = workdir_beside(memory, "Load snapshot error")
        try:
            try:
                os.link(memory, workdir / MEMORY_FILE)
            except OSError:
                shutil.copyfile(memory, workdir / MEMORY_FILE)
            interfaces = unwrap_state(params.snapshot_path, workdir / STATE_FILE)
            nets = network_overrides(interfaces, params.network_overrides)
            machine = restore_machine(workdir, stdin=self.stdin, stdout=self.stdout,
                                      paused=not params.resume_vm, trust=True,
                                      kvm_device=self.kvm_device, nets=nets)
        except (OSError, PykvmError) as error:
            raise ApiFault(f"Load snapshot error: {_text(error)}") from None
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        self._describe_loaded(machine.config)
        for iface_id, host_dev_name in interfaces:
            tap = next((o.host_dev_name for o in params.network_overrides
                        if o.iface_id == iface_id), host_dev_name)
            self.nets[iface_id] = NetworkInterface(iface_id=iface_id, host_dev_name=tap)
        self.machine = machine
        self.log.info(f"Loaded the microVM snapshot {params.snapshot_path}")

    def _describe_loaded(self, config) -> None:
        """What GET /vm/config shows of a loaded snapshot: its machine, kernel and disks
        (a disk's id is its virtio serial, as InstanceStart made it)."""
        self.machine_config = MachineConfiguration(vcpu_count=config.cpus,
                                                   mem_size_mib=config.mem_size // layout.MiB)
        self.balloon.describe_loaded(config)
        self.entropy.describe_loaded(config)
        self.vsock.describe_loaded(config)
        if config.kernel is not None:
            self.boot_source = BootSource(
                kernel_image_path=str(config.kernel), boot_args=config.append or None,
                initrd_path=str(config.initrd) if config.initrd else None)
        rooted = any(word == "root=/dev/vda" or word.startswith("root=PARTUUID=")
                     for word in config.append.split())
        for index, disk in enumerate(config.disks):
            drive_id = disk.serial or f"drive{index}"
            self.drives[drive_id] = Drive(drive_id=drive_id, path_on_host=disk.path or None,
                                          socket=disk.socket or None,
                                          is_root_device=rooted and index == 0,
                                          is_read_only=disk.read_only)

    # --- the start --------------------------------------------------------------------------------
    def machine_config_for_start(self):
        """The pykvm MachineConfig of what was configured (called at InstanceStart)."""
        from ...machine import MachineConfig
        if self.boot_source is None:
            raise ApiFault("Cannot start microvm without kernel configuration.")
        drives = self._ordered_drives()
        disks = [d.disk_spec() for d in drives]
        nets = [n.net_spec() for n in self.nets.values()]
        words = (self.boot_source.boot_args or "").split()
        words += i8042_quick_probe(words)
        root = next((d for d in drives if d.is_root_device), None)
        if root is not None:
            words += [f"root=PARTUUID={root.partuuid}" if root.partuuid else "root=/dev/vda",
                      "ro" if root.read_only else "rw"]
        source = self.boot_source
        return MachineConfig(mem_size=self.machine_config.mem_size_mib * layout.MiB,
                             cpus=self.machine_config.vcpu_count,
                             kernel=Path(source.kernel_image_path),
                             initrd=Path(source.initrd_path) if source.initrd_path else None,
                             append=" ".join(words), kvm_device=self.kvm_device,
                             disks=disks, nets=nets, transport=TRANSPORT,
                             keyboard=True,     # SendCtrlAltDel types on it
                             **self.entropy.machine_fields(), **self.balloon.machine_fields(),
                             **self.vsock.machine_fields())

    def _ordered_drives(self) -> list[Drive]:
        """The root device first (it is /dev/vda), the others in the order they came."""
        drives = list(self.drives.values())
        return sorted(drives, key=lambda d: not d.is_root_device)

    def _start(self) -> None:
        from ...machine import build_for_boot
        config = self.machine_config_for_start()
        for drive, disk in zip(self._ordered_drives(), config.disks):
            if drive.rate_limiter is not None and not disk.serial:   # qcow2: vhost-user
                rate_limits.block_throttle(None, drive.drive_id)     # refused
        try:
            self.machine = build_for_boot(config, stdin=self.stdin, stdout=self.stdout)
        except PykvmError as error:
            raise ApiFault(f"Start microvm error: {_text(error)}") from None
        rate_limits.apply_at_start(self._ordered_drives(), list(self.nets.values()),
                                   self.machine.virtio)
        if self.machine.virtio is not None:
            self.mmds.attach(list(self.nets), self.machine.virtio.nets)

    # --- the main thread ----------------------------------------------------------------------------
    def _on_main(self, work) -> None:
        """Run ``work`` on the main thread (:meth:`serve_main`); its ApiFault is raised here."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._tasks.put((work, future))
        future.result()

    def serve_main(self):
        """On the main thread: build what InstanceStart or a snapshot load asks for, then
        run the machine until it stops; returns its Stop (None when :meth:`end` came
        first). Firecracker's process ends with its VM: so does the caller."""
        while not self._ended.is_set():
            try:
                work, future = self._tasks.get(timeout=0.2)
            except queue.Empty:
                continue
            try:
                work()
            except BaseException as error:    # handed to the request that asked for it
                future.set_exception(error if isinstance(error, PykvmError) else
                                     ApiFault(f"internal error: {type(error).__name__}: "
                                              f"{error}"))
                continue
            future.set_result(None)
            if self.machine is not None:
                return self._run()
        return None

    def start_here(self):
        """On the main thread: InstanceStart now (--config-file), then run until the stop."""
        with self._lock:
            self._before_start()
            self._start()
        return self._run()

    def _run(self):
        self.log.info("Running the microVM")
        try:
            stop = self.machine.run()
        finally:
            if self.metrics is not None:
                self.flush_metrics()
        self.log.info(f"The microVM stopped: {stop.message if stop else 'no reason'}")
        return stop

    def end(self) -> None:
        """Stop the VM if it runs and let :meth:`serve_main` return."""
        self._ended.set()
        if self.machine is not None and not self.machine.vm.stop_requested:
            self.machine.request_stop("signal", 0, "the VMM was asked to end")

    def apply_config_file(self, path: str) -> None:
        """The resources of a Firecracker --config-file (config_file.py), then the
        caller's InstanceStart (:meth:`start_here`)."""
        from .config_file import apply_config_file
        apply_config_file(self, path)

    def close(self) -> None:
        self._ended.set()
        if self.machine is not None:
            self.machine.close()
        with self._lock:        # the metrics thread flushes under it: never to a closed fd
            if self.metrics is not None:
                self.metrics.close()
                self.metrics = None
        self.log.close()



def i8042_quick_probe(words: list[str]) -> list[str]:
    """Firecracker's recommended i8042 words (docs/api_requests/actions.md, SendCtrlAltDel:
    ``i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd``) that the user's boot_args do not
    set, in either spelling (``i8042.noaux`` or ``i8042.noaux=VALUE``): without them Linux
    probes a mouse port and a multiplexer the i8042 does not have, which takes seconds of
    emulated boot on kvm_pvm hosts (docs/hosts.md). The keyboard, and so Ctrl-Alt-Del,
    works with all four."""
    present = {word.split("=", 1)[0] for word in words}
    return [word for word in I8042_WORDS if word not in present]


def _text(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


__all__ = ["Vmm", "NOT_STARTED", "RUNNING", "PAUSED", "AFTER_START", "BEFORE_START"]
