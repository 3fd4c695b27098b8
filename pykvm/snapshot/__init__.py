"""Snapshots: a paused machine into a directory (state.json + sparse memory.bin), and a
machine rebuilt from one that resumes the guest where it was. The schema is in
README.md next to this file; the state protocol in :mod:`pykvm.snapshot.state`."""

from ..lazy import lazy_exports

_EXPORTS = {name: ".snapshot" for name in ("FORMAT", "MEMORY_FILE", "STATE_FILE", "VERSION",
                                           "SnapshotInfo", "load_state", "restore_machine",
                                           "save_snapshot")}
_EXPORTS.update(SnapshotError=".state", Stateful=".state")
__all__ = list(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
