"""The state protocol: how a part of a machine saves and restores itself.

Every stateful part of a machine (a vCPU, the VM's in-kernel devices, each device on
the port-I/O and MMIO buses, the PCI bus and its functions, each virtqueue, the
host's quirks) has its state as ONE frozen dataclass, next to the part's own code
(Firecracker's per-device ``persist.rs`` with its ``*State`` structs; vm-virtio's
``QueueState``), and two methods:

    save_state(self) -> XState          what the part holds now (the VM is paused)
    restore_state(self, state: XState)  put it back, on a part built from the same
                                        configuration that has not run yet

A device that keeps state does this (pykvm/devices/acpi_pm.py is the shortest one)::

    from ..snapshot.schema import U16
    from ..snapshot.state import ComponentState

    @dataclass(frozen=True)
    class AcpiPmState(ComponentState, tag="acpi-pm"):
        status: U16
        enable: U16
        control: U16

    class AcpiPm:
        def save_state(self) -> AcpiPmState:
            return AcpiPmState(self.status, self.enable, self.control)

        def restore_state(self, state: AcpiPmState) -> None:
            self.status, self.enable = state.status, state.enable
            ...

The rules:

* **The annotations are the schema** (schema.py): ``U8``/``U16``/``U32``/``U64`` or
  ``Annotated[int, Bounds(lo, hi)]``, ``bool``, ``float``, ``str`` (bounded),
  ``blob(n)`` for bytes (at most n; ``blob(n, exact=True)``: exactly n), a ctypes struct
  of <linux/kvm.h> (checked field by field against its C types), ``tuple[X, ...]``,
  ``dict[str, X]``, ``X | None``, a nested record or another part's ``XState``, or
  ``ComponentState | None`` for "whatever state the part in this slot has" (a virtio
  function's device: found by its tag among the registered states, never by a module
  path). A state read from a file is decoded against these before any part sees it;
  unknown and missing keys are refused. Cross-field rules go in :meth:`check`, which
  raises SnapshotError (ValueError for a value out of its range is fine too).
* **The tag is forever.** It is what state.json says instead of a module path
  (``"tag": "serial"``), so classes may move and be renamed freely. Never reuse a tag
  for a different layout: a changed layout is a new format version (document.py) with
  a migration of the old one (migrate.py) or a clear refusal.
* **restore_state trusts the types, not the meaning.** Every field has the type and
  range its annotation says; whether it fits *this* part (the same device id, as many
  queues, the GSIs it was wired to) is the part's to check, with SnapshotError (or a
  PykvmError). Any other exception out of a restore is a bug in pykvm and propagates
  as one: the orchestration names the part, it does not hide the traceback.
* **Parts never write files** or know where their state goes: the orchestration in
  snapshot.py collects them (``encode``) into state.json and decodes them back.
* Where a slot may hold any part's state (a PCI function, a virtio device), hand it
  over with :func:`restore_part`: it checks the state is the kind that part's
  ``restore_state`` is annotated to take.
* A part that keeps state but cannot be snapshotted yet (a vhost-user device: its
  queues live in another process) raises a PykvmError from save_state, one line.

A device is found for a snapshot because it is :class:`Stateful` (has both methods)
and sits on a bus (snapshot.py's ``legacy_devices``) or in a PCI slot; give it a
stable ``name`` (the key is ``name@base``).
"""

from __future__ import annotations

import functools
import typing
from typing import Protocol, runtime_checkable

from ..errors import SnapshotError  # noqa: F401 - the protocol's error, re-exported
from .blob import b64, unb64  # noqa: F401 - the helpers parts use, here with the protocol
from .cstructs import struct_from_json, struct_to_json  # noqa: F401
from .schema import STATE_TAGS, Tagged, decode, encode  # noqa: F401


class ComponentState(Tagged):
    """The base of every part's state record (a frozen dataclass). Subclass it with
    ``class XState(ComponentState, tag="x")``: the tag is registered once (schema.py's
    STATE_TAGS); two classes with one tag are a bug found at import."""

    def check(self) -> None:
        """Rules between fields (the annotations check each field alone): raise
        SnapshotError or ValueError. Runs when the state is decoded from a file."""

    def to_json(self) -> dict:
        """This state as state.json holds it: ``{"tag": ..., field: value, ...}``."""
        return encode(self)

    @classmethod
    def from_json(cls, data, where: str):
        """``data`` (parsed JSON, or already this record) decoded and checked as this
        record: SnapshotError with ``where`` in its one line if it is not one."""
        return data if isinstance(data, cls) else decode(cls, data, where)


@runtime_checkable
class Stateful(Protocol):
    """A part the snapshot orchestration saves and restores (see the module's text)."""

    def save_state(self) -> ComponentState: ...

    def restore_state(self, state: ComponentState) -> None: ...


def restore_part(part, state: ComponentState, where: str) -> None:
    """``part.restore_state(state)`` if ``state`` is the kind that part restores (its
    ``restore_state`` annotation says which): where a slot may hold any part's state
    (a PCI slot, a virtio transport's device), a state of another kind is refused
    with one line instead of reaching code written for another record."""
    expected = _restored_type(type(part))
    if not isinstance(state, expected):
        raise SnapshotError(f"state.json: {where}: {getattr(state, 'tag', None) or 'no'} state "
                            f"given to a {getattr(part, 'name', type(part).__name__)}")
    part.restore_state(state)


def decode_for(part, data, where: str) -> ComponentState:
    """``data`` (parsed JSON) decoded as the state ``part`` restores (its
    ``restore_state`` annotation), checked: SnapshotError naming ``where`` if not."""
    return decode(_restored_type(type(part)), data, where)


@functools.cache
def _restored_type(kind: type) -> type:
    hint = typing.get_type_hints(kind.restore_state).get("state", ComponentState)
    return hint if isinstance(hint, type) else ComponentState
