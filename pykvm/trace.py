"""Temporary: only pykvm/gdbstub.py still imports ``cpu_bits`` from here.

The tracer moved to pykvm/observe/ (disasm.py holds cpu_bits); gdbstub.py was being
changed by another engineer at the time of the move, so its one import line
could not be edited then. Delete this file once it imports
``pykvm.observe.disasm.cpu_bits``. Nothing else may import it.
"""

from .observe.disasm import cpu_bits

__all__ = ["cpu_bits"]
