"""`pykvm run --gdb PATH`: a GDB Remote Serial Protocol stub for the guest (GDB manual,
Appendix E "GDB Remote Serial Protocol").

    pykvm run --flat guests/tutorial/build/03-long-mode.bin --entry protected --gdb /tmp/g.sock
    gdb guests/tutorial/build/03-long-mode.elf -ex 'target remote /tmp/g.sock'

The VM starts paused, before the first guest instruction, and waits for gdb.
Whoever connects owns the guest (and can read and write all its memory), so by
default the stub serves a Unix socket: mode 0600, and every connection's
SO_PEERCRED must be this uid or root (:func:`pykvm.control.peer_refusal`). TCP
has no such check; it is served only when asked for explicitly (``--gdb
tcp:PORT`` on 127.0.0.1, or ``--gdb HOST:PORT``), and the CLI warns then.
Each vCPU is a gdb thread (id = vCPU number + 1).

What gdb can do, and how each is done with KVM:

- registers (``g``/``G``/``p``/``P``): KVM_GET/SET_REGS, SREGS and FPU on the
  vCPU's own thread (``Vcpu.call``); the layout is gdb's amd64 one, described
  by the target.xml sent through ``qXfer:features:read`` (plus cr0, cr2, cr3,
  cr4 and efer, read-only, as ``$cr3`` etc.);
- memory (``m``/``M``): through the guest's own page tables. Addresses are what
  the guest's code uses: linear addresses in 64-bit mode, and offsets from CS's
  base outside it (so a real-mode guest linked at 0 matches its ELF symbols);
- software breakpoints (``Z0``): an ``int3`` written into guest memory, the
  original byte kept (and shown by ``m``). A hit arrives as KVM_EXIT_DEBUG
  (#BP, with KVM_GUESTDBG_USE_SW_BP) on VT-x/AMD-V; on kvm_pvm, guest ring-0
  ``int3`` ends in an emulation-failure exit instead (the run loop offers it to
  :class:`pykvm.gdb.traps.BreakpointHook` before the host's quirks), and in real mode
  KVM's emulator runs ``int3`` through the guest's IVT without exiting at all,
  so each Z0 also takes a free debug register (DR0-3) when there is one;
- hardware breakpoints (``Z1``): DR0-3 and DR7 through KVM_SET_GUEST_DEBUG
  (KVM_GUESTDBG_USE_HW_BP), reported as KVM_EXIT_DEBUG (#DB);
- single step (``s``): KVM_GUESTDBG_SINGLESTEP, reported as KVM_EXIT_DEBUG (#DB);
- continue (``c``), kill (``k``), detach (``D``), Ctrl-C (0x03: pause the VM).

Measured on kvm_pvm: in guest ring 0 (all tutorial guests) single step and
hardware breakpoints work; in guest ring 3 neither is reported, and ``int3``
goes to the guest's own IDT, so gdb cannot stop ring-3 code there except with
Ctrl-C.

One module per concern, imported one way (stub -> traps -> breakpoints; stub ->
protocol, registers, listen; nothing here imports the stub):

- protocol.py: packet framing, checksums, escapes, acks; sizes bounded (the peer is
  untrusted);
- registers.py: the x86-64 register tables, target.xml, register bytes;
- listen.py: :class:`GdbAddress`, the listening socket and the peer check;
- breakpoints.py: int3 bytes and debug registers (Z0/Z1);
- traps.py: the exit hooks on the vCPU threads that turn hits and steps into stops;
- stub.py: :class:`GdbStub`, the packet dispatcher and vCPU control.

Import from the module (``from pykvm.gdb.stub import GdbStub``,
``from pykvm.gdb.listen import GdbAddress``): this package imports nothing, so
parsing ``--gdb`` does not load the stub.
"""
