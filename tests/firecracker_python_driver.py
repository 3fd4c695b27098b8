"""Run by tests/kvm/test_firecracker_python.py with the python of the `firecracker-python`
venv (tests/firecracker_python.py), inside a throwaway network namespace: that client,
as its users call it, creates, starts, pauses, resumes, snapshots and deletes a microVM
whose VMM binary is pykvm-firecracker. It imports nothing of pykvm.

What the client does that a test must keep on this machine, and how (all through
its own names, nothing of pykvm's behaviour is faked):
- its package __init__ creates /var/lib/firecracker on import: the package is loaded
  without running __init__, and MicroVMConfig's paths point into the test's directory;
- MicroVM() asks three public web services for the host's public IP (get_public_ip):
  replaced by 127.0.0.1, so no packet leaves the namespace;
- MicroVM() connects to a Docker daemon (docker.from_env): replaced by None (only its
  Docker-image rootfs builder uses it);
- its NAT rules need the nftables Python module (Debian's python3-nftables, which the
  client finds in /usr/lib/python3/dist-packages); they touch only the namespace.

Prints one JSON object per step: {"step": ..., "result": ...} or {"step": ..., "error": ...}.
"""

import importlib
import json
import os
import sys
import types


def load_client(package_dir: str):
    """The `firecracker` package without running its __init__ (which creates
    /var/lib/firecracker and checks /usr/local/bin/firecracker)."""
    package = types.ModuleType("firecracker")
    package.__path__ = [package_dir]
    sys.modules["firecracker"] = package
    return importlib.import_module("firecracker.config")


def main() -> int:
    settings = json.loads(sys.argv[1])
    import importlib.util
    spec = importlib.util.find_spec("firecracker")
    config = load_client(os.path.dirname(spec.origin))
    defaults = config.MicroVMConfig.__init__

    def init(self, *args, **kwargs):      # a dataclass: its defaults live in __init__
        defaults(self, *args, **kwargs)
        self.data_path = settings["data_path"]
        self.snapshot_path = settings["snapshot_path"]
        self.binary_path = settings["binary_path"]

    config.MicroVMConfig.__init__ = init
    utils = importlib.import_module("firecracker.utils")
    utils.get_public_ip = lambda timeout=5: "127.0.0.1"
    microvm = importlib.import_module("firecracker.microvm")
    microvm.get_public_ip = utils.get_public_ip
    microvm.docker.from_env = lambda *args, **kwargs: None

    def step(name, action):
        try:
            result = action()
        except Exception as error:       # the client's own exceptions: reported, not raised
            print(json.dumps({"step": name, "error": f"{type(error).__name__}: {error}"}),
                  flush=True)
            return None
        print(json.dumps({"step": name, "result": result}), flush=True)
        return result

    vm = microvm.MicroVM(name="pykvm_test", kernel_file=settings["kernel"],
                         initrd_file=settings["initrd"], base_rootfs=settings["rootfs"],
                         vcpu=1, memory=settings["memory_mib"])
    ok = step("create", vm.create) is not None
    if ok:
        step("state", lambda: vm._vmm.get_vmm_state(vm._microvm_id))
        step("pause", vm.pause)
        step("state", lambda: vm._vmm.get_vmm_state(vm._microvm_id))
        step("resume", vm.resume)
        step("config", lambda: vm.config()["machine-config"])
        step("snapshot", lambda: vm.snapshot(action="create"))
        step("snapshot_files", lambda: sorted(os.listdir(os.path.join(
            settings["snapshot_path"], vm._microvm_id))))
        step("list", lambda: [item["id"] for item in vm.list()])
    step("delete", vm.delete)
    return 0


if __name__ == "__main__":
    sys.exit(main())
