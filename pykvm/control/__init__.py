"""The control socket: a running machine answers JSON requests on a Unix socket.

``pykvm run --api-sock PATH`` serves it; ``pykvm ctl PATH ACTION [ARGS]`` is its client.
One request per line, one response per line, any number per connection:

    {"action": "status"}                         -> {"ok": true, "state": "running", ...}
    {"action": "pause"} / {"action": "resume"}   -> {"ok": true, "state": "paused"|"running"}
    {"action": "snapshot", "path": "DIR"}        -> {"ok": true, "snapshot": {sizes, seconds}}
    {"action": "stats"}                          -> {"ok": true, "vcpus": [per-vCPU exit counts]}
    {"action": "stop"}                           -> {"ok": true, "state": "stopping"}
    {"action": "exec", "command": "CMD"}         -> {"ok": true, "status": N, "stdout": b64,
     (or "argv": [...]; optional "stdin": b64,      "stderr": b64, "seconds": S}; a timeout:
      "env": {}, "cwd", "timeout": S)               "timed_out": true, "status" of the kill
    {"action": "copy_in", "host_path": P, "guest_path": G}  -> {"ok": true}  (file or dir;
    {"action": "copy_out", "guest_path": G, "host_path": P} -> {"ok": true}   host paths are
                                                    this host's: pykvm reads/writes them)
    anything wrong                               -> {"ok": false, "error": "one line"}

A request may carry an ``"id"``, echoed in its response. A snapshot of a running VM
pauses it for the snapshot and resumes it after; a paused VM stays paused.

Firecracker's REST API itself (HTTP on a Unix socket, its resources and states) is
``pykvm firecracker`` / ``pykvm-firecracker``: pykvm/api/firecracker, docs/firecracker.md.
Loading a snapshot is not a request here: a snapshot is loaded into a fresh process
(``pykvm run --restore DIR``).
"""

from ..lazy import lazy_exports

# What each module holds, imported when first named (pykvm/lazy.py): the gdb stub and the
# Firecracker API need only access.py, `pykvm ctl` only client.py.
_EXPORTS = {
    **{name: ".protocol" for name in ("ACTIONS", "UNLOCKED_ACTIONS", "MAX_REQUEST", "MAX_DEPTH",
                                      "MAX_INT_DIGITS", "MAX_RESPONSE", "ControlError",
                                      "RequestTooLong", "LineReader", "send_line",
                                      "parse_request", "nesting_depth")},
    **{name: ".access" for name in ("MAX_CONNECTIONS", "listen_unix", "remove_socket_file",
                                    "group_id", "peer_refusal", "refuse")},
    **{name: ".server" for name in ("ControlServer", "IDLE_TIMEOUT")},
    **{name: ".client" for name in ("request", "parse_command")},
}
__all__ = list(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
