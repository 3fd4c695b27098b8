"""Firecracker's ``--config-file``: the resources as one JSON object, one key per
resource, each value the body its API request takes (Firecracker's
``docs/getting-started.md``, "Configuring the microVM without sending API requests";
``vmm_config/mod.rs``'s ``VmmConfig``), then InstanceStart.

The file is read bounded (MAX_CONFIG_FILE), an unknown key or one pykvm does not
implement is refused, and each resource goes through the same handler as its API
request, so the checks are the API's; the MMDS config names NICs, so it comes after
them.

Why a module of its own: it is a second way in to the handlers of
pykvm/api/firecracker/vmm.py, not part of the microVM's life.
"""

from __future__ import annotations

from .resources import ApiFault

MAX_CONFIG_FILE = 1 << 20
CONFIG_KEYS = ("boot-source", "drives", "machine-config", "network-interfaces", "logger",
               "metrics", "balloon", "vsock", "mmds-config", "entropy", "cpu-config")
NOT_YET_KEYS = ("cpu-config",)


def apply_config_file(vmm, path: str) -> None:
    """Apply the resources of the Firecracker --config-file ``path`` to ``vmm`` (the
    caller then starts it)."""
    from ...control import ControlError, parse_request
    try:
        with open(path, "rb") as stream:
            data = stream.read(MAX_CONFIG_FILE + 1)
    except OSError as error:
        raise ApiFault(f"--config-file {path}: cannot read: {error.strerror}") from None
    if len(data) > MAX_CONFIG_FILE:
        raise ApiFault(f"--config-file {path}: larger than {MAX_CONFIG_FILE >> 20} MiB")
    try:
        config = parse_request(data)
    except ControlError as error:
        raise ApiFault(f"--config-file {path}: {error}") from None
    if not isinstance(config, dict):
        raise ApiFault(f"--config-file {path}: not a JSON object")
    for key in config:
        if key not in CONFIG_KEYS:
            raise ApiFault(f"--config-file {path}: unknown field `{str(key)[:40]}`, "
                           f"expected one of {', '.join(CONFIG_KEYS)}")
    for key in NOT_YET_KEYS:
        if config.get(key) is not None:
            raise ApiFault(f"--config-file {path}: {key} is not supported by pykvm yet")
    for key, method in (("logger", vmm.put_logger), ("metrics", vmm.put_metrics),
                        ("machine-config", vmm.put_machine_config),
                        ("boot-source", vmm.put_boot_source),
                        ("balloon", vmm.balloon.put), ("entropy", vmm.entropy.put),
                        ("vsock", vmm.vsock.put)):
        if config.get(key) is not None:
            method(config[key])
    for key, method, name in (("drives", vmm.put_drive, "drive_id"),
                              ("network-interfaces", vmm.put_network_interface,
                               "iface_id")):
        items = config.get(key) or []
        if not isinstance(items, list):
            raise ApiFault(f"--config-file {path}: {key} must be a list")
        for item in items:
            method(item.get(name, "") if isinstance(item, dict) else "", item)
    if config.get("mmds-config") is not None:        # names the NICs: after them
        vmm.mmds.put_config(config["mmds-config"])
