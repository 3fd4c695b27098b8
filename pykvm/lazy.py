"""Package exports imported on first use (PEP 562 module ``__getattr__``).

A `pykvm run` of a flat guest needs neither snapshots, virtio nor networking, yet
importing one submodule of a package runs the package's ``__init__`` first: with
eager re-exports there, the VMM's start-up paid for every module of the package
(bench/startup.py measures it). A package lists its exports here instead and each
is imported when first named (``from pykvm.snapshot import restore_machine`` works
unchanged).
"""

from __future__ import annotations

import importlib
import sys
from typing import Callable


def lazy_exports(package: str, exports: dict[str, str]) -> Callable[[str], object]:
    """The ``__getattr__`` of ``package`` for ``exports``: name -> relative submodule."""
    def __getattr__(name: str) -> object:
        submodule = exports.get(name)
        if submodule is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(submodule, package), name)
        setattr(sys.modules[package], name, value)   # the next lookup is a plain one
        return value
    return __getattr__
