"""Watching a guest: what exited to pykvm, what KVM did in the kernel, and which
guest instruction caused each exit.

One concern, data flowing one way: the vCPU run loop fills a
:class:`~pykvm.observe.stats.VcpuStats` per vCPU and, when a tracer is set,
calls it after each exit; everything else here only *reads* those numbers and
the guest's state (docs/architecture.md, "observe/"). Nothing in this package
changes what the guest sees, so a run with or without it behaves the same.
"""
