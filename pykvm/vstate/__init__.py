"""The running VM: its vCPUs and their KVM_RUN loop (vcpu.py), what an exit leads to
(exits.py), the stop/pause channel the VM and its vCPUs share (control.py), the hook
list features attach to (hooks.py), the VM that owns them all (vm.py) and each vCPU's
CPUID (cpuid.py). Data flows one way: vm -> vcpu -> exits -> control/hooks; the vCPU
never imports the VM (docs/architecture.md)."""
