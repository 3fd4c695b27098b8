"""The host side of a virtual NIC, plumbed with pyroute2: what `--net` asks for.

    --net tap[=NAME][,mac=MAC][,bridge=BR][,host-ip=CIDR][,netns=NS]
    --net user[,mac=MAC][,fwd=tcp:HOSTPORT:GUESTPORT]...[,fwd=udp:...][,map-gw=off]
    --net passt=SOCKET[,mac=MAC]

(``user`` and ``passt=`` need no privileges: their host end is passt, started
and stopped by pykvm/net/passt.py; the rest of this module is the TAP's.)

For each NIC, :func:`open_nic` opens the TAP (creating it, or attaching to an
existing one of that name), then, with pyroute2's IPRoute, enslaves it to the
bridge BR (creating BR if there is none), puts the host address CIDR on the
bridge (or on the TAP when there is no bridge), and brings the links up. With
``netns=NS`` all of it happens inside the named network namespace NS
(/run/netns/NS, as made by `ip netns add`): the TAP is created there and never
appears in pykvm's own namespace.

Every change is recorded as it succeeds, and :meth:`NicBackend.close` undoes
exactly those, newest first, in the namespace where they were made: a TAP pykvm
created goes away with its fd, a bridge pykvm created is deleted once no other
port is left on it, an address pykvm added is removed, a pre-existing TAP is
taken out of the bridge, brought down again if pykvm brought it up, and its
offloads are reset. Links and addresses that were there before are left as they
were. A failure half-way through undoes what was done so far.

The guest's MAC: ``mac=`` or a stable default, :func:`default_mac` -- locally
administered, derived by hashing the machine's identity and the NIC's index, so
the same configuration gets the same MAC on every run.
"""

from __future__ import annotations

import errno
import os
import threading

from ..errors import ConfigError
# The --net record and its parsers live with the machine's config; re-exported here, as
# are the MAC helpers (mac.py) and the namespace helpers (netns.py) this module used to hold.
from ..machine.config import NET_USAGE, USER_OPTIONS, NetSpec, parse_cidr  # noqa: F401
from .mac import default_mac, format_mac, machine_key, parse_mac  # noqa: F401
from .netns import NETNS_DIR, entered_netns, open_netns  # noqa: F401
from .tap import Tap, TapError

IFF_UP = 0x1


def check_specs(specs: list[NetSpec]) -> None:
    """Conflicts between NICs: the same TAP twice, the same MAC twice."""
    seen_taps, seen_macs = set(), set()
    for spec in specs:
        if spec.tap and "%" not in spec.tap:
            where = (spec.netns, spec.tap)
            if where in seen_taps:
                raise ConfigError(f"--net: TAP {spec.tap} is given twice")
            seen_taps.add(where)
        if spec.mac:
            if spec.mac in seen_macs:
                raise ConfigError(f"--net: MAC {format_mac(spec.mac)} is given twice")
            seen_macs.add(spec.mac)


# --- one NIC's host side ------------------------------------------------------------------------
def _netlink_error(what: str, error: BaseException) -> ConfigError:
    code = getattr(error, "code", None)
    text = os.strerror(code) if isinstance(code, int) and code > 0 else str(error)
    if code == errno.EPERM:
        text += " (network configuration needs root or CAP_NET_ADMIN)"
    return ConfigError(f"{what}: {text}")


def _link(ipr, name: str):
    found = ipr.link_lookup(ifname=name)
    return ipr.get_links(found[0])[0] if found else None


def link_kind(message) -> str:
    info = message.get_attr("IFLA_LINKINFO")
    kind = info.get_attr("IFLA_INFO_KIND") if info is not None else None
    if kind == "tun":
        data = info.get_attr("IFLA_INFO_DATA")
        tun_type = data.get_attr("IFLA_TUN_TYPE") if data is not None else None
        return {1: "tun", 2: "tap"}.get(tun_type, "tap")
    return kind or ("loopback" if message.get_attr("IFLA_IFNAME") == "lo" else "device")


def tun_flags(message) -> int | None:
    """The IFF_* flags a TUN/TAP link was last attached with, from its link info."""
    from .tap import IFF_MULTI_QUEUE, IFF_NO_PI, IFF_TAP, IFF_TUN, IFF_VNET_HDR

    info = message.get_attr("IFLA_LINKINFO")
    data = info.get_attr("IFLA_INFO_DATA") if info is not None else None
    if data is None or data.get_attr("IFLA_TUN_TYPE") is None:
        return None
    flags = IFF_TAP if data.get_attr("IFLA_TUN_TYPE") == 2 else IFF_TUN
    flags |= 0 if data.get_attr("IFLA_TUN_PI") else IFF_NO_PI
    flags |= IFF_VNET_HDR if data.get_attr("IFLA_TUN_VNET_HDR") else 0
    flags |= IFF_MULTI_QUEUE if data.get_attr("IFLA_TUN_MULTI_QUEUE") else 0
    return flags


class NicBackend:
    """One NIC's host end: the open :class:`Tap` and the changes made around it."""

    def __init__(self, spec: NetSpec, mac: bytes):
        self.spec = spec
        self.mac = mac
        self.tap: Tap | None = None
        self.mtu = 1500
        self.bridge_created = False
        self._undo: list[tuple[str, object]] = []
        self._lock = threading.Lock()
        self._ns_fd = open_netns(spec.netns)

    @property
    def fd(self) -> int:
        return self.tap.fd

    @property
    def name(self) -> str:
        return self.tap.name

    def describe(self) -> str:
        parts = [f"TAP {self.tap.name}{'' if self.tap.created else ' (existing)'}",
                 f"MAC {format_mac(self.mac)}"]
        if self.spec.bridge:
            parts.append(f"bridge {self.spec.bridge}{' (created)' if self.bridge_created else ''}")
        if self.spec.host_ip:
            parts.append(f"host {self.spec.host_ip}")
        if self.spec.netns:
            parts.append(f"netns {self.spec.netns}")
        return ", ".join(parts)

    # --- set-up -----------------------------------------------------------------------------
    def setup(self) -> None:
        if self.spec.tap is None and not self.spec.bridge and not self.spec.host_ip:
            self._setup_new_tap()
            return
        try:
            from pyroute2 import IPRoute
            from pyroute2.netlink.exceptions import NetlinkError
        except ImportError:
            raise ConfigError("--net needs pyroute2 (pip install pyroute2)") from None

        spec = self.spec
        with entered_netns(self._ns_fd):
            try:
                with IPRoute() as ipr:
                    existing = None
                    if spec.tap and "%" not in spec.tap:
                        existing = _link(ipr, spec.tap)
                        if existing is not None and link_kind(existing) != "tap":
                            raise TapError(f"{spec.tap} is in use by a non-TAP link "
                                           f"({link_kind(existing)}): choose another TAP name")
                    self.tap = Tap(spec.tap)
                    self._undo.append(("close-tap", None))
                    if not self.tap.created and existing is not None:
                        self.tap.restore_flags = tun_flags(existing)
                    tap_link = ipr.get_links(self.tap.ifindex)[0]
                    self.mtu = tap_link.get_attr("IFLA_MTU") or 1500
                    target = self.tap.ifindex
                    if spec.bridge:
                        target = self._bridge(ipr, tap_link)
                    if spec.host_ip:
                        self._address(ipr, target)
                    if not tap_link["flags"] & IFF_UP:
                        ipr.link("set", index=self.tap.ifindex, state="up")
                        if not self.tap.created:
                            self._undo.append(("down", self.tap.ifindex))
            except NetlinkError as error:
                self.close()
                raise _netlink_error(f"--net {self._label()}", error) from None
            except BaseException:
                self.close()
                raise

    def _setup_new_tap(self) -> None:
        """`--net tap` (a new TAP, no bridge, no address): created and set up with ioctls,
        without pyroute2 (~19 MiB resident for the VM's life: bench/memory.py)."""
        with entered_netns(self._ns_fd):
            try:
                self.tap = Tap(None)
                self._undo.append(("close-tap", None))
                self.mtu = self.tap.bring_up() or 1500
            except BaseException:
                self.close()
                raise

    def _label(self) -> str:
        return self.tap.name if self.tap is not None else (self.spec.tap or "tap")

    def _bridge(self, ipr, tap_link) -> int:
        name = self.spec.bridge
        bridge = _link(ipr, name)
        if bridge is None:
            ipr.link("add", ifname=name, kind="bridge")
            bridge = _link(ipr, name)
            self.bridge_created = True
            self._undo.append(("delete-bridge", bridge["index"]))
        elif link_kind(bridge) != "bridge":
            raise ConfigError(f"--net {self._label()}: {name} exists and is a "
                              f"{link_kind(bridge)} link, not a bridge")
        index = bridge["index"]
        if not bridge["flags"] & IFF_UP:
            ipr.link("set", index=index, state="up")
            if not self.bridge_created:
                self._undo.append(("down", index))
        previous = tap_link.get_attr("IFLA_MASTER") or 0
        if previous != index:
            ipr.link("set", index=self.tap.ifindex, master=index)
            if not self.tap.created:
                self._undo.append(("master", previous))
        return index

    def _address(self, ipr, index: int) -> None:
        interface = self.spec.host_ip
        address, prefix = str(interface.ip), interface.network.prefixlen
        for message in ipr.get_addr(index=index):
            if message.get_attr("IFA_ADDRESS") == address and message["prefixlen"] == prefix:
                return   # already there: not ours to remove
        ipr.addr("add", index=index, address=address, prefixlen=prefix)
        self._undo.append(("address", (index, address, prefix)))

    # --- clean-up ----------------------------------------------------------------------------
    def close(self) -> None:
        """Undo what set-up did, newest first; safe to call twice and from any thread."""
        with self._lock:
            if self._ns_fd < 0:
                return
            problems = []
            try:
                with entered_netns(self._ns_fd):
                    self._run_undo(problems)
            except Exception as error:   # noqa: BLE001 - keep cleaning what can be cleaned
                problems.append(str(error))
                self._close_tap()
            os.close(self._ns_fd)
            self._ns_fd = -1
            if problems:
                import sys
                print(f"pykvm: --net {self._label()}: clean-up: {'; '.join(problems)}",
                      file=sys.stderr)

    def _run_undo(self, problems: list[str]) -> None:
        ipr = NetlinkError = None   # pyroute2 only when a step needs netlink
        try:
            while self._undo:
                action, argument = self._undo.pop()
                if action == "close-tap":
                    self._close_tap()     # also puts back a kept TAP's offloads and flags
                    continue
                if ipr is None:
                    from pyroute2 import IPRoute
                    from pyroute2.netlink.exceptions import NetlinkError
                    ipr = IPRoute()
                try:
                    if action == "down":
                        ipr.link("set", index=argument, state="down")
                    elif action == "master":
                        ipr.link("set", index=self.tap.ifindex, master=argument)
                    elif action == "address":
                        index, address, prefix = argument
                        ipr.addr("del", index=index, address=address, prefixlen=prefix)
                    elif action == "delete-bridge":
                        others = [link for link in ipr.get_links()
                                  if link.get_attr("IFLA_MASTER") == argument
                                  and (self.tap is None or link["index"] != self.tap.ifindex)]
                        if not others:
                            ipr.link("del", index=argument)
                except NetlinkError as error:
                    if error.code not in (errno.ENODEV, errno.EADDRNOTAVAIL, errno.ENOENT):
                        problems.append(f"{action}: {os.strerror(error.code)}")
        finally:
            if ipr is not None:
                ipr.close()

    def _close_tap(self) -> None:
        if self.tap is not None:
            self.tap.close()

    def __enter__(self) -> "NicBackend":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_nic(spec: NetSpec, mac: bytes):
    """Open and plumb one NIC's TAP (a NicBackend), or for ``user``/``passt=`` connect
    its passt (a passt.UserNic); ConfigError (one line) on bad input."""
    if spec.mode != "tap":
        from .passt import open_user_nic
        return open_user_nic(spec, mac)
    backend = NicBackend(spec, mac)
    backend.setup()
    return backend
