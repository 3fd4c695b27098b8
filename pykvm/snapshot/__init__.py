"""Snapshots: a paused machine into a directory (state.json + sparse memory.bin), and a
machine rebuilt from one that resumes the guest where it was. The schema is in
README.md next to this file; the state protocol in :mod:`pykvm.snapshot.state`."""

from .snapshot import (FORMAT, MEMORY_FILE, STATE_FILE, VERSION, SnapshotInfo, load_state,
                       restore_machine, save_snapshot)
from .state import SnapshotError, Stateful

__all__ = ["FORMAT", "VERSION", "STATE_FILE", "MEMORY_FILE", "SnapshotError", "SnapshotInfo",
           "Stateful", "load_state", "restore_machine", "save_snapshot"]
