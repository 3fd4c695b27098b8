"""A PC-like machine: a typed configuration (config.py), the machine it describes
(machine.py), and the builder that makes one for a boot or from a snapshot
(builder.py; the guest loading is boot.py). The CLI, the Firecracker API, the warm
cache, the pytest plugin and tests all go through :func:`build_for_boot` and
:func:`build_from_snapshot`."""

from ..lazy import lazy_exports

_EXPORTS = {
    **{name: ".config" for name in ("MachineConfig", "DiskSpec", "NetSpec", "DEFAULT_MEM",
                                    "parse_size", "format_size")},
    **{name: ".boot" for name in ("LINUX_CONSOLE_CMDLINE", "default_guest_dir",
                                  "default_linux_guest")},
    **{name: ".builder" for name in ("build_for_boot", "build_from_snapshot")},
    "Machine": ".machine", "ConsoleRouter": ".router",
}
__all__ = list(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
