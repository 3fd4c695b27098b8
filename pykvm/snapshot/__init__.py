"""Snapshots: a paused machine into a directory (state.json + sparse memory.bin), and a
machine rebuilt from one that resumes the guest where it was. The schema is in
README.md next to this file; the state protocol in :mod:`pykvm.snapshot.state`.

``restore_machine`` is the machine builder's ``build_from_snapshot``
(pykvm/machine/builder.py), under the name this package has always given it: this
package reads, checks and applies a snapshot; the builder assembles the machine."""

from ..lazy import lazy_exports

_EXPORTS = {name: ".snapshot" for name in ("FORMAT", "MEMORY_FILE", "STATE_FILE", "VERSION",
                                           "SnapshotInfo", "load_state", "save_snapshot")}
_EXPORTS["restore_machine"] = "..machine.builder"
_EXPORTS.update(SnapshotError=".state", Stateful=".state")
__all__ = list(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
