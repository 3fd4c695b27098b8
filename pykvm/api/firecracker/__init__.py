"""Firecracker's personality: its REST API over HTTP/1.1 on a Unix socket and its
command line, driving a pykvm :class:`~pykvm.machine.Machine` (docs/firecracker.md).

    resources.py  the request bodies: frozen dataclasses parsed strictly from JSON
    vmm.py        the microVM state machine ("Not started" -> "Running" <-> "Paused")
    logs.py       PUT /logger and PUT /metrics: Firecracker's line formats
    http.py       the HTTP server on AF_UNIX: routes, status codes, bounds, peer checks
    cli.py        ``pykvm-firecracker`` / ``pykvm firecracker``: Firecracker's flags
"""

# The Firecracker release whose API (src/api_server/swagger/firecracker.yaml) is the
# reference for the subset pykvm implements.
FIRECRACKER_API_VERSION = "1.7.0"
APP_NAME = "Firecracker"
# the logger's levels, Firecracker's names: here so that the command line's parser (built
# by every pykvm run) need not import resources.py, the largest module of this package
LEVELS = ("Off", "Error", "Warning", "Info", "Debug", "Trace")
