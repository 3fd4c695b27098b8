"""Devices the guest sees: each one a register model behind a bus range.

Devices know nothing about KVM (rust-vmm's vm-superio style): they are given an
:class:`~pykvm.bus.IrqLine` to raise and callables or streams to talk to the
host, and the VM decides where on which bus they sit.
"""
