"""pykvm: a userspace virtual machine monitor in Python on top of Linux KVM."""

__version__ = "0.1.0"
